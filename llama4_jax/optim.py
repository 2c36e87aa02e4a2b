"""AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask."""

import jax
import ml_collections as mlc
import optax
from flax import nnx


def learning_rate_schedule(optim: mlc.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to optim.lr, then cosine decay to lr * min_lr_ratio."""
  warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim.lr * optim.min_lr_ratio)


def weight_decay_mask(params: nnx.State, optim: mlc.ConfigDict):
  """True for parameters that get weight decay; norms and embeddings are opt-in."""

  def decays(path, _):
    names = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
    if 'scale' in names:  # RMSNorm scales
      return optim.decay_norms
    if names and names[0] == 'embed':
      return optim.decay_embeddings
    return True

  return jax.tree.map_with_path(decays, params)


def make_optimizer(optim: mlc.ConfigDict, total_steps: int, params: nnx.State
                   ) -> optax.GradientTransformation:
  parts = []
  if optim.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.clip_norm))
  parts.append(optax.adamw(
      learning_rate_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
      weight_decay=optim.weight_decay, mask=weight_decay_mask(params, optim)))
  return optax.chain(*parts)
