"""A grouped SwiGLU for CPUs: each expert's rows in blocks, looped over, the padding skipped.

`grouped_swiglu(x_AD, sizes_E, wi_gate_EDF, wi_up_EDF, wo_EFD)` runs expert e's SwiGLU on the
e-th group of rows of x_AD (sizes_E[e] rows each, groups in order); rows past the groups
return zero. It is the dropless dispatch's grouped matmul on CPU (`moe_grouped_matmul=
'looped'`), where `jax.lax.ragged_dot` runs every expert on every row, and the blocked form
(`moe.blocked_dropless_dispatch`) pays for its static worst case: every expert's group padded
to whole blocks, plus as many empty blocks again, multiplied whatever the routing was.

Here each group is cut into as many blocks of `max_rows` rows as fit, and one rest block
holding what is left, rounded up to a multiple of `min_rows` (the only padding: fewer than
`min_rows` rows per expert). Blocks of one size are looped over with `lax.fori_loop`, for as
many as the routing made (a dynamic trip count), reading their rows and their expert's weights
in place, and one block's gate and up projections (one matmul against the two weights side by
side) and down projection run together while its rows are in cache. So the work is the
assignments' plus at most E * min_rows rows, whatever E is, and the blocks' expert weights
are never gathered into one [blocks, D, F] array.

The backward pass is hand-written (`jax.custom_vjp`): a loop cannot be differentiated in
reverse with a dynamic trip count, and JAX's transpose of the weights' indexing would add a
whole [E, D, F] gradient per block. It loops over the same blocks once, adding each block's
weight gradients to its expert's rows in place. The forward saves the gate and up
projections ([A, 2F]), as the unfused form's autodiff does.

Axis letters as moe.py's: A the rows (assignments), R the same padded by one block (a last
block may read past row A), n the planned blocks of one size.
"""

import functools

import jax
import jax.numpy as jnp

# Block rows: the largest blocks amortise the loop's per-block cost; the smallest bound the
# padding. Not tuned to one CPU: the cost barely depends on them. One MoE layer's forward +
# backward (16,384 rows, D=128, F=256, 4 to 64 experts) ran within the machines' noise with
# 512 / 32 against 256 / 32, 512 / 16 and 1024 / 32 on a 2-core AMD EPYC without AVX-512, and
# within 8% with 256 to 2048 / 16 to 64 on one with AVX-512 (PERFORMANCE.md, change 6).
MAX_ROWS = 512
MIN_ROWS = 32


def _block_plan(sizes_E, rows: int, max_rows: int, min_rows: int):
  """The blocks covering each group: [(block_rows, start_n, expert_n, valid_n or None, count)].

  Blocks of one size are listed in order of use; the first `count` of them are used (the
  rest of the static list is never visited). valid_n, for the rest blocks, is how many of a
  block's rows are in its group (None: all of them).
  """
  E = sizes_E.shape[0]
  start_E = jnp.cumsum(sizes_E) - sizes_E
  full_E = sizes_E // max_rows
  full_end_E = jnp.cumsum(full_E)
  block_n = jnp.arange(rows // max_rows)
  expert_n = jnp.minimum(jnp.searchsorted(full_end_E, block_n, side='right'), E - 1)
  start_n = start_E[expert_n] + (block_n - (full_end_E - full_E)[expert_n]) * max_rows
  plan = [(max_rows, start_n, expert_n, None, full_end_E[-1])] if block_n.size else []

  # The rest of each group (fewer than max_rows rows): one block, rounded up to min_rows.
  rest_E = sizes_E - full_E * max_rows
  rest_blocks_E = (rest_E + min_rows - 1) // min_rows
  most_rest = min(rows, max_rows - 1)
  for blocks in range(1, -(-most_rest // min_rows) + 1):
    has_E = rest_blocks_E == blocks
    order = jnp.argsort(~has_E, stable=True)
    start = (start_E + full_E * max_rows)[order]
    plan.append((blocks * min_rows, start, order, rest_E[order], jnp.sum(has_E)))
  return plan


def _each_block(plan, step, carry):
  """carry = step(carry, rows, start, expert, row_mask or None) over every planned block."""
  for rows, start_n, expert_n, valid_n, count in plan:

    def body(i, carry, rows=rows, start_n=start_n, expert_n=expert_n, valid_n=valid_n):
      mask = None if valid_n is None else (jnp.arange(rows) < valid_n[i])[:, None]
      return step(carry, rows, start_n[i], expert_n[i], mask)

    carry = jax.lax.fori_loop(0, count, body, carry)
  return carry


def _take(a, start, rows):
  return jax.lax.dynamic_slice_in_dim(a, start, rows)


def _put(a, block, start, mask):
  """a[start:start+rows] = block, leaving the rows outside the mask as they were."""
  if mask is not None:
    block = jnp.where(mask, block, _take(a, start, block.shape[0]))
  return jax.lax.dynamic_update_slice_in_dim(a, block, start, 0)


# Jitted so that the MoE layers of one shape share one trace and lowering of its loops (one per
# block size, forward and backward) instead of each layer paying for its own.
@functools.partial(jax.jit, static_argnames=('max_rows', 'min_rows'))
def grouped_swiglu(
    x_AD, sizes_E, wi_gate_EDF, wi_up_EDF, wo_EFD, max_rows=MAX_ROWS, min_rows=MIN_ROWS
):
  """y_AD: expert e's SwiGLU, wo(silu(x wi_gate) * x wi_up), on the e-th group of rows."""
  return _grouped_swiglu(x_AD, sizes_E, wi_gate_EDF, wi_up_EDF, wo_EFD, max_rows, min_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _grouped_swiglu(x_AD, sizes_E, wi_gate_EDF, wi_up_EDF, wo_EFD, max_rows, min_rows):
  return _forward(x_AD, sizes_E, wi_gate_EDF, wi_up_EDF, wo_EFD, max_rows, min_rows)[0]


def _forward(x_AD, sizes_E, wi_gate_EDF, wi_up_EDF, wo_EFD, max_rows, min_rows):
  A, D = x_AD.shape
  F = wi_gate_EDF.shape[2]
  plan = _block_plan(sizes_E, A, max_rows, min_rows)
  # Padded so that a last block reading past row A stays in bounds (dynamic_slice would
  # otherwise move it back, onto other rows).
  x_RD = jnp.pad(x_AD, ((0, max_rows), (0, 0)))
  # The gate and up projections as one matmul of twice the width: fewer, larger matmuls,
  # which XLA splits over the CPU's threads where one of each would run on one.
  wi_ED2F = jnp.concatenate([wi_gate_EDF, wi_up_EDF], axis=-1)

  def step(carry, rows, start, e, mask):
    gate_up_R2F, y_RD = carry
    gate_up = _take(x_RD, start, rows) @ wi_ED2F[e]
    y = (jax.nn.silu(gate_up[:, :F]) * gate_up[:, F:]) @ wo_EFD[e]
    return _put(gate_up_R2F, gate_up, start, mask), _put(y_RD, y, start, mask)

  zeros = lambda cols: jnp.zeros((A + max_rows, cols), x_AD.dtype)
  gate_up_R2F, y_RD = _each_block(plan, step, (zeros(2 * F), zeros(D)))
  return y_RD[:A], (x_RD, sizes_E, gate_up_R2F, wi_ED2F, wo_EFD)


def _backward(max_rows, min_rows, residuals, dy_AD):
  x_RD, sizes_E, gate_up_R2F, wi_ED2F, wo_EFD = residuals
  A = dy_AD.shape[0]
  F = wo_EFD.shape[1]
  plan = _block_plan(sizes_E, A, max_rows, min_rows)
  dy_RD = jnp.pad(dy_AD, ((0, max_rows), (0, 0)))

  def step(carry, rows, start, e, mask):
    dx_RD, d_wi_ED2F, d_wo_EFD = carry
    x, gate_up, dy = (_take(a, start, rows) for a in (x_RD, gate_up_R2F, dy_RD))
    if mask is not None:  # rows past the group belong to the next one
      dy = jnp.where(mask, dy, 0)
    gate, up = gate_up[:, :F], gate_up[:, F:]
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    dh = dy @ wo_EFD[e].T
    d_gate_up = jnp.concatenate([dh * up * sig * (1 + gate * (1 - sig)), dh * silu], axis=-1)
    return (
        _put(dx_RD, d_gate_up @ wi_ED2F[e].T, start, mask),
        d_wi_ED2F.at[e].add(x.T @ d_gate_up),
        d_wo_EFD.at[e].add((silu * up).T @ dy),
    )

  init = tuple(map(jnp.zeros_like, (x_RD, wi_ED2F, wo_EFD)))
  dx_RD, d_wi, d_wo = _each_block(plan, step, init)
  return dx_RD[:A], None, d_wi[..., :F], d_wi[..., F:], d_wo


_grouped_swiglu.defvjp(_forward, _backward)
