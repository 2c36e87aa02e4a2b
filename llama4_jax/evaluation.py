"""Scoring token sequences: mean next-token NLL, perplexity, token counts."""

import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax import losses


def token_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Consecutive non-overlapping windows of seq_len + 1 tokens; the remainder is dropped."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f'expected a 1-D array of token ids, got shape {tokens.shape}')
  n = len(tokens) // (seq_len + 1)
  if n == 0:
    raise ValueError(f'{len(tokens)} tokens are fewer than one window of seq_len + 1 = '
                     f'{seq_len + 1}')
  return tokens[:n * (seq_len + 1)].reshape(n, seq_len + 1)


def windows_to_batches(windows: np.ndarray, batch_size: int) -> Iterable[dict[str, np.ndarray]]:
  """Batches of inputs/targets/weights; the last batch is padded with weight-0 rows."""
  for start in range(0, len(windows), batch_size):
    rows = windows[start:start + batch_size]
    weights = np.ones((len(rows), rows.shape[1] - 1), np.float32)
    if len(rows) < batch_size:
      pad = batch_size - len(rows)
      rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), rows.dtype)])
      weights = np.concatenate([weights, np.zeros((pad, weights.shape[1]), np.float32)])
    yield {'inputs': rows[:, :-1].astype(np.int32), 'targets': rows[:, 1:].astype(np.int32),
           'weights': weights}


@jax.jit
def _loss_sums(graphdef, state, batch):
  model = nnx.merge(graphdef, state)
  logits_BTV, _ = model(batch['inputs'], batch.get('segment_ids'))
  return losses.cross_entropy_sums(logits_BTV, batch['targets'], batch['weights'])


def evaluate_batches(model, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
  """Mean NLL (nats per predicted token), perplexity and token count over batches."""
  graphdef, state = nnx.split(model)
  total_nll, total_tokens = 0.0, 0.0
  for batch in batches:
    nll, count = _loss_sums(graphdef, state, {k: jnp.asarray(v) for k, v in batch.items()})
    total_nll += float(nll)
    total_tokens += float(count)
  if total_tokens == 0:
    raise ValueError('no tokens to evaluate')
  loss = total_nll / total_tokens
  return {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)), 'tokens': int(total_tokens)}
