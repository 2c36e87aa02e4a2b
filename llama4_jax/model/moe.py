"""Llama 4 mixture of experts: sigmoid top-k router, routed SwiGLU experts, shared expert.

Every dispatch computes the same function (the reference semantics of HF):
routed(x) = sum over the k selected experts e of Expert_e(x * sigmoid(logit_e)).
They differ in how tokens reach their experts and what that costs:

  dense     every expert on every token (HF's way; E times the active cost).
            Kept as the reference for tests.
  dropless  tokens sorted by expert and multiplied group by group by a grouped
            matmul (`moe_grouped_matmul`; 'auto' follows the platform compiled
            for, `grouped_matmul_for`):
              looped    (CPU) each group cut into blocks looped over, as many as
                        the routing made (`grouped_swiglu.py`): cost flat in E;
              megablox  (TPU) the Pallas grouped matmul, grouped backward too;
              blocked   (GPU; any backend) groups padded to blocks of
                        `moe_block_size` rows, one batched einsum over a static
                        worst case of blocks;
              ragged    `jax.lax.ragged_dot` (dense on CPU and on this jaxlib's
                        GPU, an E-times-dense weight gradient on TPU).
            With fewer assignments than experts (decoding), each assignment
            gathers its expert's weights instead; with fewer tokens than a
            block, every expert runs on the few tokens (dense, exact).
  capacity  each expert takes at most C = ceil(capacity_factor * t * k / E)
            tokens into an [E, C, D] buffer; later assignments are dropped
            (their routed contribution is zero; the shared expert still applies).

Decoding on CPU uses an inference layout (`MoE.split_experts`) in which each
expert's weights are arrays of their own, and `switched_dispatch`: dropless, each group
of rows runs its expert under `lax.switch` without copying the expert's weights.

When the mesh splits the tokens, `_sharded_dispatch` runs the dispatch inside
`jax.shard_map`, so that each device sorts and multiplies only its own tokens.
With a mesh `expert` axis larger than one, expert weights are sharded over it:
tokens are all-gathered over the expert axis, each device runs its own
experts, and the partial outputs are reduce-scattered back (`psum_scatter`).
This is the only file with hand-written collectives.

Axis letters beyond layers.py's: t tokens (batch and sequence flattened), k experts
chosen per token, A assignments (t * k), C capacity per expert, R rows of a padded
layout, n blocks of b rows; in the sharded dispatch, g the tokens of a device's expert
group.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from llama4_jax import sharding
from llama4_jax.model import grouped_swiglu, layers

DISPATCHES = ('dropless', 'capacity', 'dense')
GROUPED_MATMULS = ('auto', 'looped', 'megablox', 'ragged', 'blocked')


# Dispatches: (x_tD, weights_tk, experts_tk, wi_gate_EDF, wi_up_EDF, wo_EFD) -> (y_tD, dropped)
# `dropped` is the number of (token, expert) assignments that were not computed.


def dense_dispatch(x_tD, weights_tk, experts_tk, wi_gate_EDF, wi_up_EDF, wo_EFD, **_):
  """Runs every expert on every token, as HF does: exact, but E times the cost.

  Unselected experts see a zero input and return exactly zero (no biases,
  silu(0) = 0), so the sum over experts equals the sum over the selected ones.
  Assignments to experts outside [0, E) are ignored (used by expert parallelism).
  """
  E = wi_gate_EDF.shape[0]
  score_tE = jnp.sum(
      jax.nn.one_hot(experts_tk, E, dtype=x_tD.dtype) * weights_tk[..., None], axis=1
  )
  x_EtD = x_tD[None] * score_tE.T[..., None]
  gate_EtF = jnp.einsum('EtD,EDF->EtF', x_EtD, wi_gate_EDF)
  up_EtF = jnp.einsum('EtD,EDF->EtF', x_EtD, wi_up_EDF)
  y_EtD = jnp.einsum('EtF,EFD->EtD', jax.nn.silu(gate_EtF) * up_EtF, wo_EFD)
  return jnp.sum(y_EtD, axis=0), jnp.zeros((), jnp.float32)


def _sort_assignments(experts_tk, num_experts):
  """Assignments (token, slot) sorted by expert; out-of-range experts sort last."""
  A = experts_tk.size
  expert_A = experts_tk.reshape(A)
  order_A = jnp.argsort(expert_A, stable=True)
  sizes_E = jnp.bincount(expert_A, length=num_experts)  # out-of-range ids are not counted
  return order_A, expert_A[order_A], sizes_E


def _swiglu_grouped(x, wi_gate, wi_up, wo, matmul):
  """wo(silu(x wi_gate) * x wi_up), each product a `matmul(rows, weights)`."""
  return matmul(jax.nn.silu(matmul(x, wi_gate)) * matmul(x, wi_up), wo)


def _swiglu(wi_gate_DF, wi_up_DF, wo_FD, x):
  return _swiglu_grouped(x, wi_gate_DF, wi_up_DF, wo_FD, jnp.matmul)


def _sorted_dropless(x_tD, weights_tk, experts_tk, num_experts, grouped_swiglu):
  """Dropless over assignments sorted by expert: grouped_swiglu(x_AD, sizes_E) -> y_AD runs
  expert e's SwiGLU on the e-th group of rows (sizes_E rows each, in order)."""
  t, k = experts_tk.shape
  order_A, _, sizes_E = _sort_assignments(experts_tk, num_experts)
  x_AD = x_tD[order_A // k] * weights_tk.reshape(-1)[order_A][:, None]
  with jax.named_scope('expert_matmuls'):
    y_AD = grouped_swiglu(x_AD, sizes_E)
  # Rows past sum(sizes_E) (out-of-range experts: padding, other devices' experts) are in no
  # group, and grouped matmuls do not promise what they return for them: zero them.
  y_AD = jnp.where((jnp.arange(t * k) < jnp.sum(sizes_E))[:, None], y_AD, 0)
  y_tkD = jnp.zeros((t * k, x_tD.shape[1]), y_AD.dtype).at[order_A].set(y_AD).reshape(t, k, -1)
  return y_tkD.sum(axis=1), jnp.zeros((), jnp.float32)


def ragged_dropless_dispatch(x_tD, weights_tk, experts_tk, wi_gate_EDF, wi_up_EDF, wo_EFD, **_):
  """Dropless with `jax.lax.ragged_dot` (XLA's grouped matmul).

  On TPU its backward for the weights compiles as a dense product masked per expert (E times
  the work); `megablox_dropless_dispatch` is the TPU kernel whose backward is grouped too.
  """

  def swiglu(x_AD, sizes_E):
    matmul = lambda x, w: jax.lax.ragged_dot(x, w, sizes_E)
    return _swiglu_grouped(x_AD, wi_gate_EDF, wi_up_EDF, wo_EFD, matmul)

  return _sorted_dropless(x_tD, weights_tk, experts_tk, wi_gate_EDF.shape[0], swiglu)


def looped_dropless_dispatch(x_tD, weights_tk, experts_tk, wi_gate_EDF, wi_up_EDF, wo_EFD, **_):
  """Dropless with the CPU grouped SwiGLU (`grouped_swiglu.py`): each expert's rows in
  blocks looped over, as many as the routing made; cost flat in E."""
  swiglu = functools.partial(
      grouped_swiglu.grouped_swiglu, wi_gate_EDF=wi_gate_EDF, wi_up_EDF=wi_up_EDF, wo_EFD=wo_EFD
  )
  return _sorted_dropless(x_tD, weights_tk, experts_tk, wi_gate_EDF.shape[0], swiglu)


# Megablox tiles (rows, contracted, output columns): MaxText's defaults for its TPU gmm.
MEGABLOX_TILING = (512, 1024, 1024)


def megablox_dropless_dispatch(x_tD, weights_tk, experts_tk, wi_gate_EDF, wi_up_EDF, wo_EFD, **_):
  """Dropless with the Pallas TPU grouped matmul (megablox `gmm`; JAX ships it).

  Its backward is grouped as well: the input gradient is a `gmm` against the transposed
  weights and the weight gradient a `tgmm`, each visiting only the row tiles of each group,
  so forward and backward cost what the assignments need (ragged_dot's weight gradient
  on TPU is E times that). Off TPU the kernel runs in Pallas interpret mode: exact, slow,
  for tests.
  """
  # Imported here, when used: it loads Pallas and its TPU backend.
  from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

  interpret = sharding.platform() != 'tpu'
  A = x_tD.shape[0] * experts_tk.shape[1]

  def swiglu(x_AD, sizes_E):
    tm = min(MEGABLOX_TILING[0], -(-A // 8) * 8)
    R = -(-A // tm) * tm  # gmm needs whole row tiles: rows past A are in no group
    x_RD = jnp.pad(x_AD, ((0, R - A), (0, 0)))

    # gmm leaves the rows past the groups undefined, in its output and in its input gradient
    # (NaN in interpret mode): masking both keeps them out of the values and the gradients.
    grouped_R = (jnp.arange(R) < jnp.sum(sizes_E))[:, None]

    def matmul(x, w):
      tiling = (tm, min(MEGABLOX_TILING[1], w.shape[1]), min(MEGABLOX_TILING[2], w.shape[2]))
      x = jnp.where(grouped_R, x, 0)
      y = megablox.gmm(
          x, w, sizes_E.astype(jnp.int32), x.dtype, tiling, None, None, False, interpret
      )
      return jnp.where(grouped_R, y, 0)

    return _swiglu_grouped(x_RD, wi_gate_EDF, wi_up_EDF, wo_EFD, matmul)[:A]

  return _sorted_dropless(x_tD, weights_tk, experts_tk, wi_gate_EDF.shape[0], swiglu)


def _block_layout(x_tD, weights_tk, experts_tk, num_experts, b):
  """Assignments sorted by expert, each expert's group padded to whole blocks of b rows.

  Returns (x_nbD, token_R, expert_n, used_blocks): the blocks' router-scaled
  inputs, the token of each row (t for padding), each block's expert, and how
  many blocks hold assignments (the rest are padding). The blocks number
  A/b + E (static), enough for any routing.
  """
  t, k = experts_tk.shape
  E, D, A = num_experts, x_tD.shape[1], t * k
  order_A, expert_sorted_A, sizes_E = _sort_assignments(experts_tk, E)
  padded_E = (sizes_E + b - 1) // b * b
  padded_end_E = jnp.cumsum(padded_E)
  start_E = jnp.cumsum(sizes_E) - sizes_E
  num_blocks = A // b + E
  rows = num_blocks * b
  valid_A = expert_sorted_A < E
  safe_expert_A = jnp.where(valid_A, expert_sorted_A, 0)
  # Row of each sorted assignment in the padded layout; invalid ones go to a trash row.
  dest_A = jnp.where(
      valid_A,
      padded_end_E[safe_expert_A]
      - padded_E[safe_expert_A]
      + jnp.arange(A)
      - start_E[safe_expert_A],
      rows,
  )
  x_RD, token_R = _rows_by_slot(x_tD, weights_tk, order_A, dest_A, rows)
  expert_n = jnp.minimum(
      jnp.searchsorted(padded_end_E, jnp.arange(num_blocks) * b, side='right'), E - 1
  )
  return x_RD.reshape(num_blocks, b, D), token_R, expert_n, padded_end_E[-1] // b


def _rows_by_slot(x_tD, weights_tk, order_A, dest_A, num_slots):
  """(x_RD, token_R): slot dest_A[a] gets sorted assignment a's token row times its router
  weight. A dest of num_slots drops the assignment; a slot no assignment fills holds zeros
  and token t (a row past the tokens, which `_unblock` drops)."""
  t, k = weights_tk.shape
  token_R = jnp.full((num_slots + 1,), t, jnp.int32).at[dest_A].set(order_A // k)[:num_slots]
  weight_R = (
      jnp.zeros((num_slots + 1,), x_tD.dtype)
      .at[dest_A]
      .set(weights_tk.reshape(-1)[order_A])[:num_slots]
  )
  x_and_zeros = jnp.concatenate([x_tD, jnp.zeros((1, x_tD.shape[1]), x_tD.dtype)])  # row t: zeros
  return x_and_zeros[token_R] * weight_R[:, None], token_R


def _unblock(y_RD, token_R, t):
  """Sums each slot's output into its token (empty slots land on a dropped row t). y_RD may
  have several slot axes ([blocks, b, D], [E, C, D]): slots are read in order."""
  D = y_RD.shape[-1]
  return jnp.zeros((t + 1, D), y_RD.dtype).at[token_R].add(y_RD.reshape(-1, D))[:t]


def blocked_dropless_dispatch(
    x_tD, weights_tk, experts_tk, wi_gate_EDF, wi_up_EDF, wo_EFD, *, block_size=32, **_
):
  """Dropless on any backend: groups padded to blocks, one batched einsum over blocks.

  With A = t*k assignments the blocks number at most A/b + E (static), so the
  work is (A + E*b) rows of expert MLP, plus gathering each block's weights:
  it grows with E only through the padding of E*b rows.
  """
  x_nbD, token_R, expert_n, _ = _block_layout(
      x_tD, weights_tk, experts_tk, wi_gate_EDF.shape[0], block_size
  )
  wi_gate_nDF, wi_up_nDF, wo_nFD = (w[expert_n] for w in (wi_gate_EDF, wi_up_EDF, wo_EFD))
  with jax.named_scope('expert_matmuls'):
    gate = jnp.einsum('nbD,nDF->nbF', x_nbD, wi_gate_nDF)
    up = jnp.einsum('nbD,nDF->nbF', x_nbD, wi_up_nDF)
    y_nbD = jnp.einsum('nbF,nFD->nbD', jax.nn.silu(gate) * up, wo_nFD)
  return _unblock(y_nbD, token_R, x_tD.shape[0]), jnp.zeros((), jnp.float32)


def capacity_dispatch(
    x_tD,
    weights_tk,
    experts_tk,
    wi_gate_EDF,
    wi_up_EDF,
    wo_EFD,
    *,
    capacity_factor=1.25,
    num_routed=None,
    **_,
):
  """Each expert takes its first C assignments (token order); the rest are dropped.

  C = ceil(capacity_factor * num_routed * k / E), num_routed defaulting to t.
  """
  t, k = experts_tk.shape
  E, D, _ = wi_gate_EDF.shape
  A = t * k
  C = max(1, math.ceil(capacity_factor * (num_routed or t) * k / E))
  order_A, expert_sorted_A, sizes_E = _sort_assignments(experts_tk, E)
  start_E = jnp.cumsum(sizes_E) - sizes_E
  valid_A = expert_sorted_A < E
  safe_expert_A = jnp.where(valid_A, expert_sorted_A, 0)
  slot_A = jnp.arange(A) - start_E[safe_expert_A]
  kept_A = valid_A & (slot_A < C)
  dest_A = jnp.where(kept_A, safe_expert_A * C + slot_A, E * C)  # E*C: dropped
  x_RD, token_R = _rows_by_slot(x_tD, weights_tk, order_A, dest_A, E * C)
  x_ECD = x_RD.reshape(E, C, D)
  gate = jnp.einsum('ECD,EDF->ECF', x_ECD, wi_gate_EDF)
  up = jnp.einsum('ECD,EDF->ECF', x_ECD, wi_up_EDF)
  y_ECD = jnp.einsum('ECF,EFD->ECD', jax.nn.silu(gate) * up, wo_EFD)
  dropped = jnp.sum(valid_A & ~kept_A).astype(jnp.float32)
  return _unblock(y_ECD, token_R, t), dropped


def gathered_dispatch(x_tD, weights_tk, experts_tk, wi_gate_EDF, wi_up_EDF, wo_EFD, **_):
  """Dropless for few tokens (decoding): each assignment gathers its expert's weights.

  Reads k expert matrices per token instead of every expert's (as grouping
  into per-expert blocks would when there are fewer assignments than experts).
  """
  E = wi_gate_EDF.shape[0]
  valid_tk = experts_tk < E
  expert_tk = jnp.where(valid_tk, experts_tk, 0)
  x_tkD = x_tD[:, None, :] * (weights_tk * valid_tk)[..., None]
  gate = jnp.einsum('tkD,tkDF->tkF', x_tkD, wi_gate_EDF[expert_tk])
  up = jnp.einsum('tkD,tkDF->tkF', x_tkD, wi_up_EDF[expert_tk])
  y_tkD = jnp.einsum('tkF,tkFD->tkD', jax.nn.silu(gate) * up, wo_EFD[expert_tk])
  return jnp.sum(y_tkD, axis=1), jnp.zeros((), jnp.float32)


def switched_dispatch(x_tD, weights_tk, experts_tk, expert_weights, *, block_size=0):
  """Dropless for the inference layout (`MoE.split_experts`): expert weights read in place.

  expert_weights: per expert, its (wi_gate_DF, wi_up_DF, wo_FD) as separate
  arrays. Each group of rows runs its expert's SwiGLU under `lax.switch`, which
  reads that expert's arrays where they are; the other dispatches index a
  stacked [E, D, F] weight, and XLA on CPU copies the indexed expert before
  multiplying (at decode batch sizes the copy costs as much as the matmul).
  With at most E assignments (decoding) each assignment is a group of one row;
  otherwise groups are padded to blocks as in the blocked dispatch, and the
  padding blocks past the used ones are skipped. Inference only: the gradient
  of a switch would materialise every expert's weights for every group.
  """
  t, k = experts_tk.shape
  E = len(expert_weights)
  if t * k <= E:
    x_nbD = (x_tD[:, None, :] * weights_tk[..., None]).reshape(t * k, 1, -1)
    token_R, expert_n = jnp.repeat(jnp.arange(t), k), experts_tk.reshape(-1)
  else:
    b = block_size or auto_block_size(t * k, E)
    x_nbD, token_R, expert_n, used_blocks = _block_layout(x_tD, weights_tk, experts_tk, E, b)
    expert_n = jnp.where(jnp.arange(expert_n.shape[0]) < used_blocks, expert_n, E)
  branches = [functools.partial(_swiglu, *weights) for weights in expert_weights]
  branches.append(jnp.zeros_like)  # expert E: padding blocks, or experts outside [0, E)
  with jax.named_scope('expert_matmuls'):
    y_nbD = jax.lax.map(
        lambda block: jax.lax.switch(block[1], branches, block[0]),
        (x_nbD, jnp.minimum(expert_n, E)),
    )
  return _unblock(y_nbD, token_R, t), jnp.zeros((), jnp.float32)


def auto_block_size(assignments: int, num_experts: int) -> int:
  """Rows per block that balance the blocked dispatch's two overheads.

  Padding costs about E*b/2 extra rows of expert MLP; gathering each block's
  weights costs about (A/b + E) weight copies, each worth ~50 rows of matmul
  on a CPU (a copied float costs what ~25 FLOPs do). The sum is smallest at
  b = sqrt(50 A / E); rounded to a power of two in [16, 512]. Measured (train
  step of one layer, 4096 tokens, D=512, F=1024): E=8 is fastest at b=128-256,
  E=32 at b=64, against 1.4x and 1.5x slower at a fixed b=32.
  """
  b = math.sqrt(50 * assignments / num_experts)
  return int(min(512, max(16, 2 ** round(math.log2(max(b, 1.0))))))


def grouped_matmul_for(platform: str) -> str:
  """What `moe_grouped_matmul='auto'` means on a platform.

  TPU: the megablox kernel, grouped forward and backward (`ragged_dot`'s weight gradient
  compiles there as a masked dense product). CPU: the looped grouped SwiGLU, whose cost
  follows the routing (`ragged_dot` runs densely there, the blocked form multiplies its
  worst-case padding). GPU: the blocked form, one batched matmul (this jaxlib expands
  `ragged_dot` densely, and a loop of small matmuls would launch a kernel per block).
  """
  return {'tpu': 'megablox', 'cpu': 'looped'}.get(platform, 'blocked')


def dropless_dispatch(*args, grouped_matmul='auto', block_size=0, **kw):
  """Picks the cheapest exact dropless form for the (static) shapes."""
  x_tD, _, experts_tk, wi_gate_EDF = args[:4]
  if experts_tk.size <= wi_gate_EDF.shape[0]:  # fewer assignments than experts: decoding
    return gathered_dispatch(*args, **kw)
  block_size = block_size or auto_block_size(experts_tk.size, wi_gate_EDF.shape[0])
  if x_tD.shape[0] < block_size:  # E x t rows are fewer than the E blocks of b rows
    return dense_dispatch(*args, **kw)
  kw['block_size'] = block_size
  if grouped_matmul == 'auto':
    grouped_matmul = grouped_matmul_for(sharding.platform())
  return GROUPED_DISPATCHES[grouped_matmul](*args, **kw)


GROUPED_DISPATCHES = {
    'looped': looped_dropless_dispatch,
    'megablox': megablox_dropless_dispatch,
    'ragged': ragged_dropless_dispatch,
    'blocked': blocked_dropless_dispatch,
}

DISPATCHERS = {
    'dense': dense_dispatch,
    'dropless': dropless_dispatch,
    'capacity': capacity_dispatch,
}


# Router statistics -------------------------------------------------------------


def router_statistics(
    logits_BTE: jax.Array, experts_BTk: jax.Array, valid_BT: jax.Array
) -> dict[str, jax.Array]:
  """Auxiliary losses and load statistics of one MoE layer (float32; padding excluded).

  load_balance_loss: for each sequence s, E * sum_e f_se * p_se, averaged over
  sequences. f_se is the fraction of s's routing slots given to expert e and
  p_se the mean over s's tokens of the router's sigmoid probabilities
  normalised over experts (Llama 4 routes with a sigmoid, so the
  probabilities are normalised to a distribution before the Switch formula).
  It is 1 for a balanced router. Being a mean over sequences, it is the same
  whether a batch is split into micro-batches or over devices.
  router_z_loss: mean over tokens of logsumexp(logits)^2.
  """
  E = logits_BTE.shape[-1]
  logits32 = logits_BTE.astype(jnp.float32)
  valid32 = valid_BT.astype(jnp.float32)
  tokens_B = jnp.maximum(jnp.sum(valid32, axis=1), 1.0)
  assigned_BTE = (
      jnp.sum(jax.nn.one_hot(experts_BTk, E, dtype=jnp.float32), axis=2) * valid32[..., None]
  )
  fraction_BE = jnp.sum(assigned_BTE, axis=1) / (tokens_B[:, None] * experts_BTk.shape[-1])
  probs_BTE = jax.nn.sigmoid(logits32)
  probs_BTE = probs_BTE / jnp.sum(probs_BTE, axis=-1, keepdims=True)
  mean_probs_BE = jnp.sum(probs_BTE * valid32[..., None], axis=1) / tokens_B[:, None]
  has_tokens_B = (jnp.sum(valid32, axis=1) > 0).astype(jnp.float32)
  per_sequence_B = E * jnp.sum(jax.lax.stop_gradient(fraction_BE) * mean_probs_BE, axis=-1)
  load_balance = jnp.sum(per_sequence_B * has_tokens_B) / jnp.maximum(jnp.sum(has_tokens_B), 1.0)
  z_BT = jax.nn.logsumexp(logits32, axis=-1) ** 2
  z_loss = jnp.sum(z_BT * valid32) / jnp.maximum(jnp.sum(valid32), 1.0)
  return {
      'load_balance_loss': load_balance,
      'router_z_loss': z_loss,
      'tokens_per_expert': jnp.sum(assigned_BTE, axis=(0, 1)),
  }


# The layer ----------------------------------------------------------------------


class MoE(nnx.Module):
  """The Llama 4 MoE feed-forward.

  1. Router logits = x @ W_router (model dtype, no bias).
  2. Top-k experts by raw logit; weight = sigmoid(selected logit) in float32, cast
     back (no softmax, no renormalisation).
  3. Each selected expert sees x * weight (the *input* is scaled) and runs a
     SwiGLU of width F; the routed outputs are summed.
  4. An ungated shared SwiGLU expert of width F is added.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    std, dtype, pdt = cfg.initializer_range, cfg.dtype, cfg.param_dtype
    init = nnx.initializers.normal(std)
    self.router = layers.Einsum(
        'BTD,DE->BTE', (D, E), ('embed', None), rngs=rngs, std=std, dtype=dtype, param_dtype=pdt
    )
    self.wi_gate = sharding.param(init(rngs.params(), (E, D, F), pdt), ('expert', 'embed', 'mlp'))
    self.wi_up = sharding.param(init(rngs.params(), (E, D, F), pdt), ('expert', 'embed', 'mlp'))
    self.wo = sharding.param(init(rngs.params(), (E, F, D), pdt), ('expert', 'mlp', 'embed'))
    self.shared_expert = layers.MLP(D, F, rngs=rngs, std=std, dtype=dtype, param_dtype=pdt)
    self.top_k = cfg.num_experts_per_tok
    self.dtype = dtype
    self.block_size = cfg.moe_block_size
    self.dispatch = functools.partial(
        DISPATCHERS[cfg.moe_dispatch],
        grouped_matmul=cfg.moe_grouped_matmul,
        block_size=cfg.moe_block_size,
        capacity_factor=cfg.moe_capacity_factor,
    )

  @property
  def experts_split(self) -> bool:
    return isinstance(self.wi_gate, nnx.List)

  def split_experts(self):
    """Inference layout: each expert's weights as arrays of their own (`switched_dispatch`).

    wi_gate, wi_up and wo [..., E, D, F] become lists of E arrays [..., D, F]
    (leading stacked-layer axes are kept). Decoding then reads the selected
    experts in place instead of copying them out of the stack. A capacity
    dispatch keeps the stacked layout, to keep dropping what it drops.
    """
    if self.experts_split or self.dispatch.func is capacity_dispatch:
      return
    for name in ('wi_gate', 'wi_up', 'wo'):
      stacked = getattr(self, name)[...]
      setattr(
          self, name, nnx.List([nnx.Param(stacked[..., e, :, :]) for e in range(stacked.shape[-3])])
      )

  def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array | None = None):
    """Returns (y_BTD, statistics).

    Padding tokens (valid_BT False) are routed nowhere: they take no expert's capacity
    and count in no statistic; their output is the shared expert's alone (and unused).
    """
    B, T, D = x_BTD.shape
    x_BTD = x_BTD.astype(self.dtype)
    if valid_BT is None:
      valid_BT = jnp.ones((B, T), bool)
    with jax.named_scope('moe_router'):
      logits_BTE = self.router(x_BTD)
      top_logits_BTk, experts_BTk = jax.lax.top_k(logits_BTE, self.top_k)
      weights_BTk = jax.nn.sigmoid(top_logits_BTk.astype(jnp.float32)).astype(self.dtype)
      E = logits_BTE.shape[-1]
      routed_BTk = jnp.where(
          valid_BT[..., None], experts_BTk, E
      )  # E: no expert (dispatches skip it)
    with jax.named_scope('moe_dispatch'):  # profiling.py: everything but the expert matmuls
      routed_tD, dropped = self._routed(
          x_BTD.reshape(B * T, D), weights_BTk.reshape(B * T, -1), routed_BTk.reshape(B * T, -1)
      )
    y_BTD = self.shared_expert(x_BTD) + routed_tD.reshape(B, T, D)
    y_BTD = sharding.shard(y_BTD, 'act_batch', 'act_seq', 'act_embed')
    stats = router_statistics(logits_BTE, experts_BTk, valid_BT)
    assignments = jnp.maximum(jnp.sum(valid_BT), 1) * self.top_k
    stats['dropped_fraction'] = dropped / assignments.astype(jnp.float32)
    return y_BTD, stats

  def _routed(self, x_tD, weights_tk, experts_tk):
    """The routed experts' output summed per token, and the dropped assignments."""
    cast = lambda w: w[...].astype(self.dtype)
    if self.experts_split:
      expert_weights = [tuple(map(cast, w)) for w in zip(self.wi_gate, self.wi_up, self.wo)]
      return switched_dispatch(
          x_tD, weights_tk, experts_tk, expert_weights, block_size=self.block_size
      )
    args = (x_tD, weights_tk, experts_tk, cast(self.wi_gate), cast(self.wi_up), cast(self.wo))
    # Whenever the mesh splits the tokens, each device dispatches its own (and,
    # with an expert axis, its expert group's): a global sort would make
    # every device run the experts on every token of the global batch.
    shards = sharding.batch_shards()
    if shards > 1 and x_tD.shape[0] % shards == 0:
      return _sharded_dispatch(self.dispatch, *args)
    return self.dispatch(*args)


# Expert parallelism ------------------------------------------------------------------


def _mesh_axis(name: str) -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty or name not in mesh.axis_names else mesh.shape[name]


def _sharded_dispatch(dispatch, x_tD, weights_tk, experts_tk, wi_gate_EDF, wi_up_EDF, wo_EFD):
  """Runs `dispatch` on each device's own tokens, with experts sharded over `expert`.

  Inside `shard_map`, each device all-gathers the tokens of its expert group (the
  devices along `expert`; just its own without an expert axis), runs the dispatch on
  its E/ep local experts (assignments to other experts are shifted out of range, so
  skipped), and `psum_scatter` sums the partial outputs and returns each device its
  own tokens. Expert weights keep their `tensor` sharding of F (the down projection's
  partial sums are added over `tensor`) and come in whole along D: XLA all-gathers
  their FSDP shards before the shard_map. Gathering them inside it instead (so that
  the gradient is reduce-scattered there) was measured: no change for Maverick on a
  v5p-256, 4 GiB more per GPU for Scout on 256 H100s.
  """
  mesh = jax.sharding.get_abstract_mesh()
  batch = tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names)
  E = wi_gate_EDF.shape[0]
  ep = mesh.shape['expert']
  if E % ep:
    raise ValueError(f'num_experts={E} is not divisible by mesh.expert={ep}')
  tensor = sharding.current_spec(('expert', 'embed', 'mlp'), wi_gate_EDF.shape)[2]
  tokens = P(batch, None)
  weights_EDF, weights_EFD = P('expert', None, tensor), P('expert', tensor, None)
  in_specs = (tokens, tokens, tokens, weights_EDF, weights_EDF, weights_EFD)

  @functools.partial(
      jax.shard_map, mesh=mesh, in_specs=in_specs, out_specs=(tokens, P()), check_vma=False
  )
  def local(x_tD, weights_tk, experts_tk, wi_gate, wi_up, wo):
    gather = lambda a: jax.lax.all_gather(a, 'expert', axis=0, tiled=True)
    x_gD, weights_gk, experts_gk = gather(x_tD), gather(weights_tk), gather(experts_tk)
    local_E = wi_gate.shape[0]
    first = jax.lax.axis_index('expert') * local_E
    local_experts_gk = experts_gk - first
    # Other devices' experts fall outside [0, local_E): dispatches skip them.
    local_experts_gk = jnp.where(
        (local_experts_gk >= 0) & (local_experts_gk < local_E), local_experts_gk, local_E
    )
    # Capacity per expert as for the whole group: C = cf * group tokens * k / E.
    y_gD, dropped = dispatch(
        x_gD, weights_gk, local_experts_gk, wi_gate, wi_up, wo, num_routed=x_gD.shape[0] // ep
    )
    if tensor:
      y_gD = jax.lax.psum(y_gD, tensor)
    y_tD = jax.lax.psum_scatter(y_gD, 'expert', scatter_dimension=0, tiled=True)
    # Devices along `tensor` hold the same tokens: count their drops once.
    return y_tD, jax.lax.psum(dropped, mesh.axis_names) / _mesh_axis('tensor')

  return local(x_tD, weights_tk, experts_tk, wi_gate_EDF, wi_up_EDF, wo_EFD)
