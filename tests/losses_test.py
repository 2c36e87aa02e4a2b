"""The loss taken a chunk of positions at a time equals the whole loss, values and gradients."""

import functools

import jax
import jax.numpy as jnp
import pytest

from llama4_jax import losses

import numerics

B, T, D, V = 2, 16, 8, 32


def inputs():
  keys = jax.random.split(jax.random.key(0), 4)
  h_BTD = jax.random.normal(keys[0], (B, T, D))
  w_DV = jax.random.normal(keys[1], (D, V)) * 2
  targets_BT = jax.random.randint(keys[2], (B, T), 0, V)
  weights_BT = (jax.random.uniform(keys[3], (B, T)) > 0.3).astype(jnp.float32)  # packed/padded
  return h_BTD, w_DV, targets_BT, weights_BT


def loss_and_grads(chunk):
  h_BTD, w_DV, targets_BT, weights_BT = inputs()

  def loss(h_BTD, w_DV):
    nll, weight = losses.chunked_cross_entropy_sums(
        lambda h: h @ w_DV, h_BTD, targets_BT, weights_BT, chunk
    )
    return nll / weight

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h_BTD, w_DV)


@pytest.mark.parametrize('chunk', [1, 4, 8])
def test_chunked_loss_equals_the_whole(chunk):
  # Sums of D products per logit, a logsumexp over V, then the mean over B x T positions.
  check = functools.partial(numerics.assert_close, terms=D + V + B * T)
  jax.tree.map(check, loss_and_grads(chunk), loss_and_grads(0))


def test_chunk_must_divide_the_sequence():
  h_BTD, w_DV, targets_BT, weights_BT = inputs()
  with pytest.raises(ValueError, match='loss chunk of 5 positions does not divide .* 16'):
    losses.chunked_cross_entropy_sums(lambda h: h @ w_DV, h_BTD, targets_BT, weights_BT, 5)


def test_chunks_never_hold_the_whole_logits():
  """The compiled loss and gradient hold at most one chunk of logits, not [B, T, V]."""
  long_T, big_V = 128, 4096
  h = jnp.zeros((B, long_T, D))
  w = jnp.zeros((D, big_V))
  t = jnp.zeros((B, long_T), jnp.int32)
  ones = jnp.ones((B, long_T))

  def temporaries(chunk):
    def loss(h, w):
      return losses.chunked_cross_entropy_sums(lambda x: x @ w, h, t, ones, chunk)[0]

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  whole_logits = B * long_T * big_V * 4  # 4 MiB; the weight's gradient is 128 KiB
  assert temporaries(0) >= whole_logits
  assert 0 < temporaries(4) < whole_logits / 4
