"""The CPU grouped SwiGLU against each group's SwiGLU written out, values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama4_jax.model import grouped_swiglu

import numerics

D, F = 6, 10
# Small blocks, so that a few dozen rows take every block size: full blocks of 8 rows, then one
# rest block of 2, 4, 6 or 8 rows, of which only the group's rows count.
MAX_ROWS, MIN_ROWS = 8, 2
# Row sums over D then F; the weight gradients also sum over a group's rows (at most 40).
TERMS = D + F + 40


def reference(x_AD, sizes_E, wi_gate_EDF, wi_up_EDF, wo_EFD):
  """Expert e's SwiGLU on its rows, group by group; zero past the groups."""
  expert_A = jnp.searchsorted(jnp.cumsum(sizes_E), jnp.arange(x_AD.shape[0]), side='right')
  in_group_A = expert_A < sizes_E.shape[0]
  e = jnp.minimum(expert_A, sizes_E.shape[0] - 1)
  gate = jnp.einsum('AD,ADF->AF', x_AD, wi_gate_EDF[e])
  up = jnp.einsum('AD,ADF->AF', x_AD, wi_up_EDF[e])
  y_AD = jnp.einsum('AF,AFD->AD', jax.nn.silu(gate) * up, wo_EFD[e])
  return jnp.where(in_group_A[:, None], y_AD, 0)


def loss_and_grads(fn, x_AD, sizes_E, weights):
  loss = lambda x, *w: jnp.sum(jnp.sin(fn(x, sizes_E, *w)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x_AD, *weights)


@pytest.mark.parametrize(
    'sizes,rows_past_groups',
    [
        ((8, 8, 8), 0),  # whole blocks only
        ((0, 13, 1, 0, 27), 5),  # empty groups; blocks of every rest size; one row alone
        ((40,), 0),  # one expert takes everything: five full blocks
        ((3, 5, 7), 5),  # rest blocks only (no group fills a block)
    ],
    ids=str,
)
def test_grouped_swiglu_matches_each_groups_swiglu(sizes, rows_past_groups):
  """Rows past the groups (assignments to other devices' experts, or to none) stay zero and
  take no gradient into the weights."""
  sizes_E = jnp.array(sizes)
  A = sum(sizes) + rows_past_groups
  keys = jax.random.split(jax.random.key(sum(sizes)), 4)
  E = len(sizes)
  x_AD = jax.random.normal(keys[0], (A, D))
  weights = [
      jax.random.normal(k, shape) * 0.4
      for k, shape in zip(keys[1:], [(E, D, F), (E, D, F), (E, F, D)])
  ]
  kernel = functools.partial(grouped_swiglu.grouped_swiglu, max_rows=MAX_ROWS, min_rows=MIN_ROWS)
  got = loss_and_grads(kernel, x_AD, sizes_E, weights)
  want = loss_and_grads(reference, x_AD, sizes_E, weights)
  jax.tree.map(functools.partial(numerics.assert_close, terms=TERMS), got, want)
  y = jax.jit(kernel)(x_AD, sizes_E, *weights)
  np.testing.assert_array_equal(y[sum(sizes) :], 0)


def test_block_plan_covers_each_group_once_with_padding_only_in_rest_blocks():
  sizes_E = jnp.array([0, 13, 1, 0, 27, 8])
  plan = grouped_swiglu._block_plan(sizes_E, int(sizes_E.sum()), MAX_ROWS, MIN_ROWS)
  covered, computed = [], 0
  for rows, start_n, expert_n, valid_n, count in plan:
    for i in range(int(count)):
      valid = rows if valid_n is None else int(valid_n[i])
      covered += [(int(expert_n[i]), int(start_n[i]) + r) for r in range(valid)]
      computed += rows
  starts = np.cumsum(sizes_E) - sizes_E
  want = [(e, int(starts[e]) + r) for e, size in enumerate(sizes_E) for r in range(int(size))]
  assert sorted(covered) == want
  # Padding: under MIN_ROWS per group with a rest, never a whole empty block.
  assert computed - int(sizes_E.sum()) < MIN_ROWS * int(jnp.sum(sizes_E % MAX_ROWS > 0))
