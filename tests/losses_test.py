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


def test_the_eval_step_takes_the_logits_in_chunks_too():
  """evaluation.make_eval_step with train.loss_chunk: the same sums, without [B, T, V] at once."""
  from flax import nnx

  from llama4_jax import evaluation
  from llama4_jax import model as model_lib

  cfg = model_lib.PRESETS['parity'].replace(vocab_size=16384)  # the logits dominate
  graphdef, params = nnx.split(model_lib.Llama4(cfg, rngs=nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.key(1), (B, 65), 3, cfg.vocab_size)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': jnp.ones((B, 64))}

  def sums_and_temporaries(loss_chunk):
    step = evaluation.make_eval_step(graphdef, loss_chunk=loss_chunk)
    compiled = step.lower(params, batch).compile()
    return step(params, batch), compiled.memory_analysis().temp_size_in_bytes

  (nll, weight), whole = sums_and_temporaries(0)
  (chunked_nll, chunked_weight), chunked = sums_and_temporaries(8)
  numerics.assert_close(chunked_nll, nll, terms=cfg.hidden_size + cfg.vocab_size + B * 64)
  assert chunked_weight == weight == B * 64
  whole_logits = B * 64 * cfg.vocab_size * 4
  assert whole >= whole_logits > 2 * chunked
  assert (
      evaluation.make_eval_step(graphdef, loss_chunk=48)(params, batch)[1] == weight
  )  # no divisor
