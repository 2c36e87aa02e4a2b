"""Token-level losses shared by training and evaluation."""

import jax
import jax.numpy as jnp


def target_log_probs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """log p(target) at every position, in float32 (without a [B, T, V] log-softmax)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return target_logit_BT - jax.nn.logsumexp(logits_BTV, axis=-1)


def cross_entropy_sums(
    logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted next-token NLL in nats, sum of weights), in float32."""
  weights_BT = weights_BT.astype(jnp.float32)
  return -jnp.sum(target_log_probs(logits_BTV, targets_BT) * weights_BT), jnp.sum(weights_BT)
