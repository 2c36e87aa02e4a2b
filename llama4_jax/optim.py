"""AdamW with warmup + cosine decay, global-norm clipping, a weight-decay mask, freezing."""

import jax
import ml_collections as mlc
import optax
from flax import nnx


def learning_rate_schedule(optim: mlc.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to optim.lr, then cosine decay to lr * min_lr_ratio."""
  warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=optim.lr,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=optim.lr * optim.min_lr_ratio,
  )


def schedule_step(opt_state) -> jax.Array:
  """The step the learning-rate schedule is at: the count of optax's schedule state. An update
  left out (a non-finite step, `trainer.update_if`) does not advance it, unlike the train step."""
  [count] = [
      value
      for path, value in optax.tree_utils.tree_get_all_with_path(opt_state, 'count')
      if path[-1].tuple_name == 'ScaleByScheduleState'
  ]
  return count


# train.freeze: which top-level parts of the model keep their initial values.
FREEZE_OPTIONS = ('', 'vision', 'language')
_VISION_PARTS = ('vision', 'projector')


def _names(path) -> list[str]:
  """A parameter's path as names, without the trailing `value` of an nnx.Variable's state."""
  names = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
  return names[:-1] if names and names[-1] == 'value' else names


def is_frozen(path, freeze: str) -> bool:
  """'vision' freezes the vision tower (the projector still learns); 'language'
  freezes everything but the vision tower and projector."""
  top = _names(path)[0]
  if freeze == 'vision':
    return top == 'vision'
  if freeze == 'language':
    return top not in _VISION_PARTS
  return False


def weight_decay_mask(params: nnx.State, optim: mlc.ConfigDict):
  """True for parameters that get weight decay; norms and embeddings are opt-in, biases never."""

  def decays(path, _):
    names = _names(path)
    if names[-1] in ('b', 'bias'):
      return False
    if 'scale' in names:  # RMSNorm / LayerNorm scales
      return optim.decay_norms
    if names and names[0] == 'embed':
      return optim.decay_embeddings
    return True

  return jax.tree.map_with_path(decays, params)


def make_optimizer(
    optim: mlc.ConfigDict, total_steps: int, params: nnx.State, freeze: str = ''
) -> optax.GradientTransformation:
  tx = _adamw(optim, total_steps, params)
  if not freeze:
    return tx
  # Frozen parameters get zero updates and no optimizer state.
  labels = jax.tree.map_with_path(
      lambda p, _: 'frozen' if is_frozen(p, freeze) else 'trained', params
  )
  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)


def _adamw(
    optim: mlc.ConfigDict, total_steps: int, params: nnx.State
) -> optax.GradientTransformation:
  parts = []
  if optim.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.clip_norm))
  parts.append(
      optax.adamw(
          learning_rate_schedule(optim, total_steps),
          b1=optim.b1,
          b2=optim.b2,
          eps=optim.eps,
          weight_decay=optim.weight_decay,
          mask=weight_decay_mask(params, optim),
      )
  )
  return optax.chain(*parts)
