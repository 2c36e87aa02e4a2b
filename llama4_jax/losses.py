"""Token-level losses shared by training and evaluation, whole or a chunk of positions at a time."""

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


def chunked_cross_entropy_sums(
    logits_fn, h_BTD: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy_sums` of `logits_fn(h_BTD)`, `chunk` positions at a time.

  The logits of one chunk ([B, chunk, V] in float32) are all that lives at once, in the forward
  and, recomputed, in the backward pass: at Scout's vocabulary of 202,048 the whole [B, T, V]
  is 6.6 GB per 8192-token sequence. `chunk` must divide T; 0 (or T) takes the whole sequence.
  """
  B, T, D = h_BTD.shape
  if not chunk or chunk >= T:
    return cross_entropy_sums(logits_fn(h_BTD), targets_BT, weights_BT)
  if T % chunk:
    raise ValueError(f'loss chunk of {chunk} positions does not divide the sequence of {T}')
  split = lambda x: x.reshape(B, T // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint  # the backward pass recomputes a chunk's logits instead of keeping them
  def chunk_sums(h_BCD, targets_BC, weights_BC):
    return cross_entropy_sums(logits_fn(h_BCD), targets_BC, weights_BC)

  def add_chunk(sums, chunk_inputs):
    nll, weight = chunk_sums(*chunk_inputs)
    return (sums[0] + nll, sums[1] + weight), None

  zero = jnp.zeros((), jnp.float32)
  sums, _ = jax.lax.scan(
      add_chunk, (zero, zero), (split(h_BTD), split(targets_BT), split(weights_BT))
  )
  return sums
