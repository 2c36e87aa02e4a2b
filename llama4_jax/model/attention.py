"""Grouped-query attention with Llama 4's two layer flavours.

RoPE layers: interleaved-pair RoPE, then QK-norm (a weightless RMS norm per
head), and chunked local attention (block-local, aligned to each segment's
first token). NoPE layers: no rotation, global causal attention, and the query
scaled by the temperature 1 + attn_scale * log1p(floor((i + 1) / floor_scale))
of its index i: the cache index (HF's, left padding included) for a row's first
document, the position in the document for the packed documents after it.

Sequences are described by `segment_ids` (0 = padding), which covers left
padding (one segment per row) and packed documents alike: a token attends to
earlier tokens of its own segment, and chunk boundaries start at the segment's
first token (HF: `(k - lp) // C == (q - lp) // C`).

The attention core holds [B, N, T, S] scores at once; with `attention_query_block`
set it runs over blocks of queries instead (`blocked_attention`), holding
[B, N, block, S] at a time in both passes: exact, the same FLOPs, and the memory a
long sequence needs (8192 tokens: 40 heads x 8192^2 scores per sequence otherwise).
With `attention_key_block` too, an online softmax over key blocks (`flash_attention`)
holds [B, N, block, key block] and skips the blocks the mask leaves empty.
Without a cache, both flavours skip the keys their mask rules out by construction:
chunked layers attend within a band of one and a half chunks (`banded_attention`), global layers
per block of queries up to its last key (`triangular_attention`).

Axis letters beyond layers.py's: n blocks, Q queries per block, C keys per block, W the
keys of a window (a ring cache's slots, or a band of key blocks), R = W + T keys (a ring
cache's and the new ones).
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax import sharding
from llama4_jax.model import layers


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
  """What every layer needs to know about the sequence, computed once per call.

  The masks are built under jit, where the ones a layer does not use cost nothing;
  the blocked and flash attentions build each block of the mask from `mask_parts`
  (a cached prefill's chunked layers from `ring_parts`) instead of holding a [B, T, S]
  mask.

  Attributes:
    positions_BT: RoPE positions of the query tokens (offset within segment).
    cache_index_T: absolute index of each query in the key axis.
    temperature_index_BT: the index i of the NoPE layers' temperature: the position in
      the document for packed documents, the cache index (padding included, as in HF)
      for a row's first document.
    causal_mask_BTS: causal, same-segment mask over the S keys.
    chunked_mask_BTS: causal_mask_BTS restricted to the query's chunk (or None).
    valid_BT: False for padding queries (segment 0).
    ring_parts: with a KV cache, what the chunked layers' mask over R = W + T keys is
      built from (`mask_block`): their ring cache of W slots (before this call's
      writes), then the T new keys.
    query_segment_BT, key_segment_BS: segment ids of the queries and the S keys.
    query_chunk_BT, key_chunk_BS: chunk number of each token within its segment
      (None without chunked attention).
  """

  positions_BT: jax.Array
  cache_index_T: jax.Array
  temperature_index_BT: jax.Array
  causal_mask_BTS: jax.Array
  chunked_mask_BTS: jax.Array | None
  valid_BT: jax.Array
  ring_parts: 'MaskParts | None' = None
  query_segment_BT: jax.Array | None = None
  key_segment_BS: jax.Array | None = None
  query_chunk_BT: jax.Array | None = None
  key_chunk_BS: jax.Array | None = None

  def mask_parts(self, chunked: bool) -> 'MaskParts':
    """What `mask_block` needs: [T] and [B, T] / [B, S] integer arrays, no [B, T, S] mask."""
    return MaskParts(
        self.cache_index_T,
        self.query_segment_BT,
        self.key_segment_BS,
        self.query_chunk_BT if chunked else None,
        self.key_chunk_BS if chunked else None,
    )


class MaskParts(NamedTuple):
  """The integer arrays a block of the attention mask is built from (chunks None: causal)."""

  query_index_T: jax.Array
  query_segment_BT: jax.Array
  key_segment_BS: jax.Array
  query_chunk_BT: jax.Array | None
  key_chunk_BS: jax.Array | None
  # The index of each key [S]; None: key s is index s (a sequence's or a cache's slots,
  # not a ring's).
  key_index_S: jax.Array | None = None


def mask_block(parts: MaskParts, query_start, rows: int, key_start, cols: int) -> jax.Array:
  """The mask's block of query rows [query_start, +rows) and key columns [key_start, +cols):
  [B, rows, cols]. Rows and columns past the last query or key are all False."""
  T = parts.query_segment_BT.shape[1]

  def take(x, start, size, axis=1):  # zero-padded, so that the block never leaves the array
    x = jnp.pad(x, [(0, size if a == axis else 0) for a in range(x.ndim)])
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)

  chunked = parts.query_chunk_BT is not None
  if parts.key_index_S is None:
    key_index_K = key_start + jnp.arange(cols)
  else:
    key_index_K = take(parts.key_index_S, key_start, cols, 0)
  mask_BQK = attention_mask(
      take(parts.query_index_T, query_start, rows, 0),
      take(parts.query_segment_BT, query_start, rows),  # padded rows: segment 0, no key
      take(parts.query_chunk_BT, query_start, rows) if chunked else None,
      key_index_K,
      take(parts.key_segment_BS, key_start, cols),  # padded columns too
      take(parts.key_chunk_BS, key_start, cols) if chunked else None,
  )
  return mask_BQK & (query_start + jnp.arange(rows) < T)[None, :, None]


def attention_mask(
    query_index_T, query_segment_BT, query_chunk_BT, key_index_S, key_segment_BS, key_chunk_BS
) -> jax.Array:
  """[B, T, S]: key s is earlier than (or is) query t, in its segment (not padding), and,
  with chunks given (key_index_S may be [B, S] or [S]), in its chunk."""
  key_index_BS = jnp.broadcast_to(key_index_S, key_segment_BS.shape)
  mask_BTS = (
      (key_index_BS[:, None, :] <= query_index_T[None, :, None])
      & (key_segment_BS[:, None, :] == query_segment_BT[:, :, None])
      & (key_segment_BS[:, None, :] != 0)
  )
  if query_chunk_BT is not None:
    mask_BTS &= key_chunk_BS[:, None, :] == query_chunk_BT[:, :, None]
  return mask_BTS


def _segment_starts(segment_ids_BS: jax.Array) -> jax.Array:
  """Index of the first token of each token's (contiguous) segment."""
  S = segment_ids_BS.shape[1]
  index_S = jnp.arange(S)
  is_start_BS = jnp.concatenate(
      [jnp.ones_like(segment_ids_BS[:, :1], bool), segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]],
      axis=1,
  )
  return jax.lax.cummax(jnp.where(is_start_BS, index_S, 0), axis=1)


def ring_slot_indices(offset: jax.Array | int, ring_size: int) -> jax.Array:
  """Absolute index held by each slot of a ring cache before writing at `offset` (-1 = empty).

  Slot s holds the newest index a < offset with a % ring_size == s.
  """
  slot_W = jnp.arange(ring_size)
  index_W = offset - 1 - jnp.mod(offset - 1 - slot_W, ring_size)
  return jnp.where(index_W >= 0, index_W, -1)


def make_attention_inputs(
    key_segment_ids_BS: jax.Array,
    query_offset: jax.Array | int,
    num_queries: int,
    chunk_size: int | None,
    ring_size: int | None = None,
) -> AttentionInputs:
  """Builds positions and masks for queries at [offset, offset + T) over S keys.

  Args:
    key_segment_ids_BS: segment ids of every key slot (cache slots not yet
      written must be 0); the queries are the slots offset..offset+T-1.
    query_offset: absolute index of the first query (0 without a cache).
    num_queries: T.
    chunk_size: attention_chunk_size C of the RoPE layers, or None.
    ring_size: W, the slots of the chunked layers' ring caches (decoding only).
  """
  key_index_S = jnp.arange(key_segment_ids_BS.shape[1])
  query_index_T = query_offset + jnp.arange(num_queries)
  starts_BS = _segment_starts(key_segment_ids_BS)
  query_segment_BT = jax.lax.dynamic_slice_in_dim(key_segment_ids_BS, query_offset, num_queries, 1)
  query_start_BT = jax.lax.dynamic_slice_in_dim(starts_BS, query_offset, num_queries, 1)
  positions_BT = query_index_T[None, :] - query_start_BT
  # A document that follows another in its row (packing) counts its temperature from its
  # own first token; a row's first document (after any left padding) from the row's start.
  before_start_BT = jnp.take_along_axis(
      key_segment_ids_BS, jnp.maximum(query_start_BT - 1, 0), axis=1
  )
  follows_a_document_BT = (query_start_BT > 0) & (before_start_BT != 0)
  temperature_index_BT = jnp.where(follows_a_document_BT, positions_BT, query_index_T[None, :])

  causal_mask_BTS = attention_mask(
      query_index_T, query_segment_BT, None, key_index_S, key_segment_ids_BS, None
  )
  chunked_mask_BTS = query_chunk_BT = key_chunk_BS = None
  if chunk_size:
    query_chunk_BT = positions_BT // chunk_size
    key_chunk_BS = (key_index_S[None, :] - starts_BS) // chunk_size
    chunked_mask_BTS = attention_mask(
        query_index_T,
        query_segment_BT,
        query_chunk_BT,
        key_index_S,
        key_segment_ids_BS,
        key_chunk_BS,
    )
  ring_parts = None
  if chunk_size and ring_size:
    key_index_R = jnp.concatenate([ring_slot_indices(query_offset, ring_size), query_index_T])
    gather = jnp.maximum(key_index_R, 0)
    key_segment_BR = jnp.where(key_index_R >= 0, key_segment_ids_BS[:, gather], 0)
    key_chunk_BR = (key_index_R[None, :] - starts_BS[:, gather]) // chunk_size
    ring_parts = MaskParts(
        query_index_T, query_segment_BT, key_segment_BR, query_chunk_BT, key_chunk_BR, key_index_R
    )
  return AttentionInputs(
      positions_BT,
      query_index_T,
      temperature_index_BT,
      causal_mask_BTS,
      chunked_mask_BTS,
      query_segment_BT != 0,
      ring_parts,
      query_segment_BT,
      key_segment_ids_BS,
      query_chunk_BT,
      key_chunk_BS,
  )


def init_layer_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype):
  """An empty K/V cache for one layer (a plain dict pytree)."""
  zeros = jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype)
  return {'k': zeros, 'v': zeros}


class Attention(nnx.Module):
  """Llama 4 attention for one layer; `use_rope` picks the flavour."""

  def __init__(self, cfg, use_rope: bool, *, rngs: nnx.Rngs):
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(rngs=rngs, std=cfg.initializer_range, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.q_proj = layers.Einsum('BTD,DNH->BTNH', (D, N, H), ('embed', 'q_heads', 'head_dim'), **kw)
    self.k_proj = layers.Einsum('BSD,DKH->BSKH', (D, K, H), ('embed', 'kv_heads', 'head_dim'), **kw)
    self.v_proj = layers.Einsum('BSD,DKH->BSKH', (D, K, H), ('embed', 'kv_heads', 'head_dim'), **kw)
    self.o_proj = layers.Einsum('BTNH,NHD->BTD', (N, H, D), ('q_heads', 'head_dim', 'embed'), **kw)
    self.eps = cfg.rms_norm_eps
    self.use_rope = use_rope
    self.use_qk_norm = use_rope and cfg.use_qk_norm
    self.use_chunked = use_rope and bool(cfg.attention_chunk_size)
    self.use_temperature = (not use_rope) and cfg.attn_temperature_tuning
    self.floor_scale = cfg.floor_scale
    self.attn_scale = cfg.attn_scale
    self.cfg = cfg  # frozen dataclass: static, part of the graphdef

  def __call__(self, x_BTD: jax.Array, inputs: AttentionInputs, cache=None, cache_offset=None):
    """Returns (y_BTD, cache); with a cache, writes K/V at cache_offset first."""
    T = x_BTD.shape[1]
    q_BTNH = self.q_proj(x_BTD)
    k_BTKH = self.k_proj(x_BTD)
    v_BTKH = self.v_proj(x_BTD)
    if self.use_rope:
      inv_freq = self.cfg.rope_inverse_frequencies()
      q_BTNH = layers.apply_rope(q_BTNH, inputs.positions_BT, inv_freq)
      k_BTKH = layers.apply_rope(k_BTKH, inputs.positions_BT, inv_freq)
    if self.use_qk_norm:
      q_BTNH = layers.rms_normalize(q_BTNH, self.eps)
      k_BTKH = layers.rms_normalize(k_BTKH, self.eps)
    if self.use_temperature:
      index_BT = inputs.temperature_index_BT.astype(jnp.float32)
      scale_BT = 1.0 + self.attn_scale * jnp.log1p(jnp.floor((index_BT + 1.0) / self.floor_scale))
      q_BTNH = (q_BTNH.astype(jnp.float32) * scale_BT[:, :, None, None]).astype(q_BTNH.dtype)

    if cache is not None and self.use_chunked:
      return self._attend_with_ring(q_BTNH, k_BTKH, v_BTKH, inputs, cache, cache_offset)
    if cache is not None:
      cache = {
          'k': jax.lax.dynamic_update_slice_in_dim(
              cache['k'], k_BTKH.astype(cache['k'].dtype), cache_offset, 1
          ),
          'v': jax.lax.dynamic_update_slice_in_dim(
              cache['v'], v_BTKH.astype(cache['v'].dtype), cache_offset, 1
          ),
      }
      k_BSKH, v_BSKH = cache['k'].astype(q_BTNH.dtype), cache['v'].astype(q_BTNH.dtype)
    else:
      k_BSKH, v_BSKH = k_BTKH, v_BTKH

    chunk = self.cfg.attention_chunk_size
    block = self.cfg.attention_query_block
    # Query blocks are a memory bound: the band's scores (1.5 C keys for every query) are not.
    if self.use_chunked and cache is None and not block and T > chunk and T % chunk == 0:
      y_BTNH = banded_attention(q_BTNH, k_BSKH, v_BSKH, inputs.chunked_mask_BTS, chunk)
    elif block and T > block and self.cfg.attention_key_block:
      y_BTNH = flash_attention(
          q_BTNH, k_BSKH, v_BSKH, inputs, self.use_chunked, block, self.cfg.attention_key_block
      )
    elif block and T > block:
      y_BTNH = blocked_attention(q_BTNH, k_BSKH, v_BSKH, inputs.mask_parts(self.use_chunked), block)
    elif not self.use_chunked and cache is None and T % TRIANGLE_BLOCKS == 0:
      y_BTNH = triangular_attention(q_BTNH, k_BSKH, v_BSKH, inputs.causal_mask_BTS)
    else:
      mask_BTS = inputs.chunked_mask_BTS if self.use_chunked else inputs.causal_mask_BTS
      y_BTNH = dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
    y_BTNH = sharding.shard(y_BTNH, 'act_batch', 'act_seq', 'act_heads', None)
    return self.o_proj(y_BTNH), cache

  def _attend_with_ring(self, q_BTNH, k_BTKH, v_BTKH, inputs, cache, cache_offset):
    """Chunked layers keep a ring of W = min(C, max_len) slots: all that a chunk needs.

    The queries see the ring (keys before this call) and this call's new keys;
    then the newest min(T, W) keys overwrite their slots (index % W). A long prefill
    takes its queries in blocks of `attention_query_block`, as training does.
    """
    T, W = k_BTKH.shape[1], cache['k'].shape[1]
    k_BRKH = jnp.concatenate([cache['k'].astype(k_BTKH.dtype), k_BTKH], axis=1)
    v_BRKH = jnp.concatenate([cache['v'].astype(v_BTKH.dtype), v_BTKH], axis=1)
    block = self.cfg.attention_query_block
    if block and T > block:
      y_BTNH = blocked_attention(q_BTNH, k_BRKH, v_BRKH, inputs.ring_parts, block)
    else:
      ring_mask_BTR = mask_block(inputs.ring_parts, 0, T, 0, W + T)
      y_BTNH = dot_product_attention(q_BTNH, k_BRKH, v_BRKH, ring_mask_BTR)
    n = min(T, W)
    slots_n = jnp.mod(cache_offset + T - n + jnp.arange(n), W)
    cache = {
        'k': cache['k'].at[:, slots_n].set(k_BTKH[:, T - n :].astype(cache['k'].dtype)),
        'v': cache['v'].at[:, slots_n].set(v_BTKH[:, T - n :].astype(cache['v'].dtype)),
    }
    y_BTNH = sharding.shard(y_BTNH, 'act_batch', 'act_seq', 'act_heads', None)
    return self.o_proj(y_BTNH), cache


def dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
  """softmax(q k^T / sqrt(H) + mask) v with query heads grouped over kv heads.

  The softmax runs in the input dtype, as in HF's eager Llama 4 attention.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  with jax.named_scope('attention_core'):
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    scores_BKGTS = jnp.einsum('BTKGH,BSKH->BKGTS', q_BTKGH, k_BSKH) * np.float32(H**-0.5).astype(
        q_BTNH.dtype
    )
    big_negative = jnp.finfo(scores_BKGTS.dtype).min
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, big_negative)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
    y_BTKGH = jnp.einsum('BKGTS,BSKH->BTKGH', probs_BKGTS, v_BSKH)
  return y_BTKGH.reshape(B, T, N, H)


def _into_blocks(x_BT, block: int):
  """[B, T, ...] -> [n, B, block, ...]: T cut into blocks (padded with zeros, or False, up to
  whole blocks), the blocks first for scans and maps."""
  B, T = x_BT.shape[:2]
  n = -(-T // block)
  x_BT = jnp.pad(x_BT, [(0, 0), (0, n * block - T)] + [(0, 0)] * (x_BT.ndim - 2))
  return x_BT.reshape(B, n, block, *x_BT.shape[2:]).swapaxes(0, 1)


def _from_blocks(y_nBQ, T: int):
  """[n, B, block, ...] -> [B, T, ...], the padding dropped (`_into_blocks` undone)."""
  n, B, block = y_nBQ.shape[:3]
  return y_nBQ.swapaxes(0, 1).reshape(B, n * block, *y_nBQ.shape[3:])[:, :T]


def blocked_attention(q_BTNH, k_BSKH, v_BSKH, parts: MaskParts, block: int) -> jax.Array:
  """dot_product_attention over blocks of `block` queries, one block at a time.

  Each block's mask rows are built from `parts` (a sequence's `inputs.mask_parts`, or a
  cached prefill's `ring_parts`; no [B, T, S] mask) and the block is rematerialised in
  the backward pass, so both passes hold one block's [B, N, block, S] scores rather than
  all T rows. Each row is computed exactly as dot_product_attention computes it. T is
  padded up to a multiple of `block`; the padding's queries see no key, and their rows
  are dropped.
  """
  q_nBQNH = _into_blocks(q_BTNH, block)

  # Through the barrier, as in _block_mask: no hoisting of every block's mask out of a layer scan.
  parts, _ = jax.lax.optimization_barrier((parts, q_nBQNH))

  @jax.checkpoint
  def attend_block(q_BQNH, start):
    mask_BQS = mask_block(parts, start, block, 0, k_BSKH.shape[1])
    return dot_product_attention(q_BQNH, k_BSKH, v_BSKH, mask_BQS)

  def step(_, xs):
    return None, attend_block(*xs)

  _, y_nBQNH = jax.lax.scan(step, None, (q_nBQNH, jnp.arange(q_nBQNH.shape[0]) * block))
  return _from_blocks(y_nBQNH, q_BTNH.shape[1])


def flash_attention(
    q_BTNH, k_BSKH, v_BSKH, inputs: AttentionInputs, chunked: bool, q_block: int, k_block: int
) -> jax.Array:
  """dot_product_attention with an online softmax over key blocks (FlashAttention, in JAX).

  Query blocks of `q_block` rows visit key blocks of `k_block` columns, keeping a running
  max, sum and output in float32; key blocks the mask leaves empty are skipped. The backward
  pass (a custom VJP) recomputes each block's probabilities from the saved log-sum-exp, so
  both passes hold [B, N, q_block, k_block] scores at a time: memory linear in T, not
  quadratic. Equal to dot_product_attention up to rounding (its softmax runs in the input
  dtype, this one in float32). T and S are padded up to whole blocks.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_nBQKGH = _into_blocks(q_BTNH.reshape(B, T, K, N // K, H), q_block)
  k_nBCKH, v_nBCKH = _into_blocks(k_BSKH, k_block), _into_blocks(v_BSKH, k_block)
  y_nBQKGH = _flash(q_nBQKGH, k_nBCKH, v_nBCKH, inputs.mask_parts(chunked))
  return _from_blocks(y_nBQKGH, T).reshape(B, T, N, H)


def _block_scores(q_BQKGH, k_BCKH, mask_BQC):
  """Scaled, masked scores of one block in float32: [B, K, G, Q, C]."""
  scale = np.float32(q_BQKGH.shape[-1] ** -0.5)
  s_BKGQC = jnp.einsum('BQKGH,BCKH->BKGQC', q_BQKGH, k_BCKH, preferred_element_type=jnp.float32)
  return jnp.where(mask_BQC[:, None, None], s_BKGQC * scale, _MASKED)


_MASKED = np.float32(np.finfo(np.float32).min)


def _block_mask(parts: MaskParts, q_nBQKGH, k_block: int):
  """mask(i, j): query block i's mask over key block j.

  The mask depends on the queries only through the optimization barrier: inside a scan over
  layers, JAX would otherwise hoist everything loop-invariant out of the loop (the masks are
  the same for every layer) and precompute every block's mask and masked scores at once,
  [n, n, B, K, G, Q, C]: the quadratic memory this function exists to avoid.
  """
  parts, _ = jax.lax.optimization_barrier((parts, q_nBQKGH))
  q_block = q_nBQKGH.shape[2]
  return lambda i, j: mask_block(parts, i * q_block, q_block, j * k_block, k_block)


def _flash_forward(q_nBQKGH, k_nBCKH, v_nBCKH, parts):
  """Outputs [n, B, Q, K, G, H] and the rows' log-sum-exp [n, B, K, G, Q] (float32)."""
  mask = _block_mask(parts, q_nBQKGH, k_nBCKH.shape[2])

  def query_block(i, q_BQKGH):
    B, Q, K, G, H = q_BQKGH.shape

    def key_block(carry, j):
      m_BKGQ, l_BKGQ, acc_BKGQH = carry
      mask_BQC = mask(i, j)

      def visit(carry):
        m_BKGQ, l_BKGQ, acc_BKGQH = carry
        s_BKGQC = _block_scores(q_BQKGH, k_nBCKH[j], mask_BQC)
        m_new = jnp.maximum(m_BKGQ, s_BKGQC.max(-1))
        p_BKGQC = jnp.exp(s_BKGQC - m_new[..., None])
        rescale = jnp.exp(m_BKGQ - m_new)
        pv_BKGQH = jnp.einsum(
            'BKGQC,BCKH->BKGQH',
            p_BKGQC.astype(v_nBCKH.dtype),
            v_nBCKH[j],
            preferred_element_type=jnp.float32,
        )
        return m_new, l_BKGQ * rescale + p_BKGQC.sum(-1), acc_BKGQH * rescale[..., None] + pv_BKGQH

      return jax.lax.cond(jnp.any(mask_BQC), visit, lambda c: c, carry), None

    init = (
        jnp.full((B, K, G, Q), _MASKED),
        jnp.zeros((B, K, G, Q), jnp.float32),
        jnp.zeros((B, K, G, Q, H), jnp.float32),
    )
    (m_BKGQ, l_BKGQ, acc_BKGQH), _ = jax.lax.scan(key_block, init, jnp.arange(k_nBCKH.shape[0]))
    l_BKGQ = jnp.maximum(l_BKGQ, np.float32(1e-30))  # rows no block reached: 0, not NaN
    y_BQKGH = (acc_BKGQH / l_BKGQ[..., None]).transpose(0, 3, 1, 2, 4)
    return y_BQKGH.astype(q_BQKGH.dtype), m_BKGQ + jnp.log(l_BKGQ)

  return jax.lax.map(lambda xs: query_block(*xs), (jnp.arange(q_nBQKGH.shape[0]), q_nBQKGH))


@jax.custom_vjp
def _flash(q_nBQKGH, k_nBCKH, v_nBCKH, parts):
  return _flash_forward(q_nBQKGH, k_nBCKH, v_nBCKH, parts)[0]


def _flash_fwd(q_nBQKGH, k_nBCKH, v_nBCKH, parts):
  y_nBQKGH, lse_nBKGQ = _flash_forward(q_nBQKGH, k_nBCKH, v_nBCKH, parts)
  return y_nBQKGH, (q_nBQKGH, k_nBCKH, v_nBCKH, parts, y_nBQKGH, lse_nBKGQ)


def _flash_bwd(residuals, dy_nBQKGH):
  """Per key block j (outer) and query block i (inner): P = exp(S - lse) recomputed,
  dV_j += P^T dY_i, dS = P (dY_i V_j^T - rowsum(dY_i Y_i)), dQ_i += dS K_j, dK_j += dS^T Q_i."""
  q_nBQKGH, k_nBCKH, v_nBCKH, parts, y_nBQKGH, lse_nBKGQ = residuals
  mask = _block_mask(parts, q_nBQKGH, k_nBCKH.shape[2])
  scale = np.float32(q_nBQKGH.shape[-1] ** -0.5)
  f32 = lambda x: x.astype(jnp.float32)
  # rowsum(dY * Y) per query row: [n, B, K, G, Q]
  delta_nBKGQ = jnp.einsum('nBQKGH,nBQKGH->nBKGQ', f32(dy_nBQKGH), f32(y_nBQKGH))

  def key_block(dq_nBQKGH, j):
    k_BCKH, v_BCKH = k_nBCKH[j], v_nBCKH[j]

    def query_block(carry, i):
      dk_BCKH, dv_BCKH, dq_nBQKGH = carry
      mask_BQC = mask(i, j)

      def visit(carry):
        dk_BCKH, dv_BCKH, dq_nBQKGH = carry
        q_BQKGH, dy_BQKGH = q_nBQKGH[i], dy_nBQKGH[i]
        s_BKGQC = _block_scores(q_BQKGH, k_BCKH, mask_BQC)
        p_BKGQC = jnp.exp(s_BKGQC - lse_nBKGQ[i][..., None])
        dv_BCKH = dv_BCKH + jnp.einsum('BKGQC,BQKGH->BCKH', p_BKGQC, f32(dy_BQKGH))
        dp_BKGQC = jnp.einsum('BQKGH,BCKH->BKGQC', f32(dy_BQKGH), f32(v_BCKH))
        ds_BKGQC = p_BKGQC * (dp_BKGQC - delta_nBKGQ[i][..., None]) * scale
        dk_BCKH = dk_BCKH + jnp.einsum('BKGQC,BQKGH->BCKH', ds_BKGQC, f32(q_BQKGH))
        dq_BQKGH = jnp.einsum('BKGQC,BCKH->BQKGH', ds_BKGQC, f32(k_BCKH))
        return dk_BCKH, dv_BCKH, dq_nBQKGH.at[i].add(dq_BQKGH)

      return jax.lax.cond(jnp.any(mask_BQC), visit, lambda c: c, carry), None

    zeros = jnp.zeros(k_BCKH.shape, jnp.float32)
    (dk_BCKH, dv_BCKH, dq_nBQKGH), _ = jax.lax.scan(
        query_block, (zeros, zeros, dq_nBQKGH), jnp.arange(q_nBQKGH.shape[0])
    )
    return dq_nBQKGH, (dk_BCKH, dv_BCKH)

  dq_nBQKGH, (dk_nBCKH, dv_nBCKH) = jax.lax.scan(
      key_block, jnp.zeros(q_nBQKGH.shape, jnp.float32), jnp.arange(k_nBCKH.shape[0])
  )
  return (
      dq_nBQKGH.astype(q_nBQKGH.dtype),
      dk_nBCKH.astype(k_nBCKH.dtype),
      dv_nBCKH.astype(v_nBCKH.dtype),
      None,  # the mask's integer arrays
  )


_flash.defvjp(_flash_fwd, _flash_bwd)


# Query blocks of triangular_attention: the work is (n + 1) / 2n of the full product, 56% at 8.
TRIANGLE_BLOCKS = 8


def triangular_attention(q_BTNH, k_BTKH, v_BTKH, causal_mask_BTS, blocks: int = TRIANGLE_BLOCKS):
  """Global causal attention without a cache, computing only the keys each query block can see.

  The mask is causal, so query block i (T / blocks tokens) needs the keys up to its own last
  token only: i + 1 blocks of keys, not all of them. About half the scores of the full product
  (measured: 230 -> 110 ms for one layer's forward + backward at B=8, T=512, 8 heads of 64).
  Equal to dot_product_attention under the same mask for every query with a key to see;
  padding queries (segment 0) see none, and average the keys of their range (unused).
  """
  T = q_BTNH.shape[1]
  rows = T // blocks
  y_nBQNH = []
  for i in range(blocks):
    queries, keys = slice(i * rows, (i + 1) * rows), slice(0, (i + 1) * rows)
    y_nBQNH.append(
        dot_product_attention(
            q_BTNH[:, queries],
            k_BTKH[:, keys],
            v_BTKH[:, keys],
            causal_mask_BTS[:, queries, keys],
        )
    )
  return jnp.concatenate(y_nBQNH, axis=1)


# Query blocks per chunk in banded_attention: with r blocks of C / r queries, each block needs
# (r + 1) C / r keys. r = 2 computes 3/4 of the scores of whole-chunk blocks (r = 1); r = 4's
# smaller blocks, 5/8, ran no faster on a CPU (PERFORMANCE.md, change 11).
BAND_BLOCKS_PER_CHUNK = 2


def banded_attention(
    q_BTNH,
    k_BTKH,
    v_BTKH,
    chunked_mask_BTS,
    chunk: int,
    blocks_per_chunk: int = BAND_BLOCKS_PER_CHUNK,
):
  """Chunked attention without a cache, computing only the band the mask allows.

  A query's chunk starts at most C - 1 tokens before it, so a block of Q = C / r
  queries (r = blocks_per_chunk) only needs the keys of its own block and the r
  blocks before it: (r + 1) Q keys per query instead of T (whole-chunk blocks,
  r = 1, where r does not divide C). Equal to dot_product_attention under the same
  mask (masked keys get exactly zero weight in both).
  """
  B, T, K, H = k_BTKH.shape
  r = blocks_per_chunk if chunk % blocks_per_chunk == 0 else 1
  Q = chunk // r
  n = T // Q

  def shifted(x_Bn, s: int):  # block i of the result is block i - s of x (zeros before the first)
    return jnp.pad(x_Bn[:, : n - s], [(0, 0), (s, 0)] + [(0, 0)] * (x_Bn.ndim - 2))

  def band(x_BnQ):  # [B, n, Q, ...] -> [B, n, (r + 1) Q, ...]: key blocks i - r, ..., i
    return jnp.concatenate([shifted(x_BnQ, s) for s in range(r, -1, -1)], axis=2)

  k_BnWKH = band(k_BTKH.reshape(B, n, Q, K, H))
  v_BnWKH = band(v_BTKH.reshape(B, n, Q, K, H))
  # The mask's blocks (query block i, key block i - s) for s = r, ..., 0.
  mask_BiQjQ = chunked_mask_BTS.reshape(B, n, Q, n, Q)
  mask_BnQW = jnp.concatenate(
      [
          shifted(jnp.diagonal(mask_BiQjQ, offset=-s, axis1=1, axis2=3).transpose(0, 3, 1, 2), s)
          for s in range(r, -1, -1)
      ],
      axis=3,
  )
  q_BnQNH = q_BTNH.reshape(B * n, Q, *q_BTNH.shape[2:])
  y = dot_product_attention(
      q_BnQNH,
      k_BnWKH.reshape(B * n, (r + 1) * Q, K, H),
      v_BnWKH.reshape(B * n, (r + 1) * Q, K, H),
      mask_BnQW.reshape(B * n, Q, (r + 1) * Q),
  )
  return y.reshape(q_BTNH.shape)
