"""Grouped-query attention with Llama 4's two layer flavours.

RoPE layers: interleaved-pair RoPE, then QK-norm (a weightless RMS norm per
head), and chunked local attention (block-local, aligned to each segment's
first token). NoPE layers: no rotation, global causal attention, and the query
scaled by the temperature 1 + attn_scale * log1p(floor((i + 1) / floor_scale))
of its absolute cache index i.

Sequences are described by `segment_ids` (0 = padding), which covers left
padding (one segment per row) and packed documents alike: a token attends to
earlier tokens of its own segment, and chunk boundaries start at the segment's
first token (HF: `(k - lp) // C == (q - lp) // C`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax import sharding
from llama4_jax.model import layers


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
  """What every layer needs to know about the sequence, computed once per call.

  Attributes:
    positions_BT: RoPE positions of the query tokens (offset within segment).
    cache_index_T: absolute index of each query in the key axis (temperature).
    causal_mask_BTS: causal, same-segment mask over the S keys.
    chunked_mask_BTS: causal_mask_BTS restricted to the query's chunk (or None).
    valid_BT: False for padding queries (segment 0).
    ring_mask_BTR: with a KV cache, the chunked layers' mask over R = W + T keys:
      their ring cache of W slots (before this call's writes), then the T new keys.
  """

  positions_BT: jax.Array
  cache_index_T: jax.Array
  causal_mask_BTS: jax.Array
  chunked_mask_BTS: jax.Array | None
  valid_BT: jax.Array
  ring_mask_BTR: jax.Array | None = None


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
  B, S = key_segment_ids_BS.shape
  key_index_S = jnp.arange(S)
  query_index_T = query_offset + jnp.arange(num_queries)
  starts_BS = _segment_starts(key_segment_ids_BS)
  query_segment_BT = jax.lax.dynamic_slice_in_dim(key_segment_ids_BS, query_offset, num_queries, 1)
  query_start_BT = jax.lax.dynamic_slice_in_dim(starts_BS, query_offset, num_queries, 1)
  positions_BT = query_index_T[None, :] - query_start_BT

  causal_TS = key_index_S[None, :] <= query_index_T[:, None]
  same_segment_BTS = (query_segment_BT[:, :, None] == key_segment_ids_BS[:, None, :]) & (
      key_segment_ids_BS[:, None, :] != 0
  )
  causal_mask_BTS = causal_TS[None] & same_segment_BTS
  chunked_mask_BTS = None
  if chunk_size:
    query_chunk_BT = positions_BT // chunk_size
    key_chunk_BS = (key_index_S[None, :] - starts_BS) // chunk_size
    chunked_mask_BTS = causal_mask_BTS & (query_chunk_BT[:, :, None] == key_chunk_BS[:, None, :])
  ring_mask_BTR = None
  if chunk_size and ring_size:
    key_index_R = jnp.concatenate([ring_slot_indices(query_offset, ring_size), query_index_T])
    gather = jnp.maximum(key_index_R, 0)
    key_segment_BR = jnp.where(key_index_R >= 0, key_segment_ids_BS[:, gather], 0)
    key_chunk_BR = (key_index_R[None, :] - starts_BS[:, gather]) // chunk_size
    ring_mask_BTR = (
        (key_index_R[None, None, :] <= query_index_T[None, :, None])
        & (key_segment_BR[:, None, :] == query_segment_BT[:, :, None])
        & (key_segment_BR[:, None, :] != 0)
        & (key_chunk_BR[:, None, :] == query_chunk_BT[:, :, None])
    )
  return AttentionInputs(
      positions_BT,
      query_index_T,
      causal_mask_BTS,
      chunked_mask_BTS,
      query_segment_BT != 0,
      ring_mask_BTR,
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
    self.num_kv_heads = K
    self.head_dim = H
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
      index_T = inputs.cache_index_T.astype(jnp.float32)
      scale_T = 1.0 + self.attn_scale * jnp.log1p(jnp.floor((index_T + 1.0) / self.floor_scale))
      q_BTNH = (q_BTNH.astype(jnp.float32) * scale_T[None, :, None, None]).astype(q_BTNH.dtype)

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
    if self.use_chunked and cache is None and T > chunk and T % chunk == 0:
      y_BTNH = banded_attention(q_BTNH, k_BSKH, v_BSKH, inputs.chunked_mask_BTS, chunk)
    else:
      mask_BTS = inputs.chunked_mask_BTS if self.use_chunked else inputs.causal_mask_BTS
      y_BTNH = dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
    y_BTNH = sharding.shard(y_BTNH, 'act_batch', 'act_seq', 'act_heads', None)
    return self.o_proj(y_BTNH), cache

  def _attend_with_ring(self, q_BTNH, k_BTKH, v_BTKH, inputs, cache, cache_offset):
    """Chunked layers keep a ring of W = min(C, max_len) slots: all that a chunk needs.

    The queries see the ring (keys before this call) and this call's new keys;
    then the newest min(T, W) keys overwrite their slots (index % W).
    """
    T, W = k_BTKH.shape[1], cache['k'].shape[1]
    k_BRKH = jnp.concatenate([cache['k'].astype(k_BTKH.dtype), k_BTKH], axis=1)
    v_BRKH = jnp.concatenate([cache['v'].astype(v_BTKH.dtype), v_BTKH], axis=1)
    y_BTNH = dot_product_attention(q_BTNH, k_BRKH, v_BRKH, inputs.ring_mask_BTR)
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


def banded_attention(q_BTNH, k_BTKH, v_BTKH, chunked_mask_BTS, chunk: int):
  """Chunked attention without a cache, computing only the band the mask allows.

  A query's chunk starts at most C - 1 tokens before it, so query block i
  (C tokens) only needs keys of blocks i - 1 and i: 2C keys per query
  instead of T. Equal to dot_product_attention under the same mask (masked
  keys get exactly zero weight in both).
  """
  B, T, K, H = k_BTKH.shape
  n = T // chunk

  def with_previous_block(x_BnC):  # [B, n, C, ...] -> [B, n, 2C, ...]
    previous = jnp.concatenate([jnp.zeros_like(x_BnC[:, :1]), x_BnC[:, :-1]], axis=1)
    return jnp.concatenate([previous, x_BnC], axis=2)

  k_BnRKH = with_previous_block(k_BTKH.reshape(B, n, chunk, K, H))
  v_BnRKH = with_previous_block(v_BTKH.reshape(B, n, chunk, K, H))
  # The mask's diagonal blocks (query block i, key block i) and the ones below them.
  mask_BiCjC = chunked_mask_BTS.reshape(B, n, chunk, n, chunk)  # query block i, key block j
  diagonal_BCCn = jnp.diagonal(mask_BiCjC, axis1=1, axis2=3)
  below_BCCm = jnp.diagonal(mask_BiCjC, offset=-1, axis1=1, axis2=3)  # m = n - 1
  below_BCCn = jnp.pad(below_BCCm, ((0, 0), (0, 0), (0, 0), (1, 0)))
  mask_BnCR = jnp.concatenate([below_BCCn, diagonal_BCCn], axis=2).transpose(0, 3, 1, 2)
  q_BnCNH = q_BTNH.reshape(B * n, chunk, *q_BTNH.shape[2:])
  y = dot_product_attention(
      q_BnCNH,
      k_BnRKH.reshape(B * n, 2 * chunk, K, H),
      v_BnRKH.reshape(B * n, 2 * chunk, K, H),
      mask_BnCR.reshape(B * n, chunk, 2 * chunk),
  )
  return y.reshape(q_BTNH.shape)
