"""The Llama 4 decoder: layers, scanned blocks, the model with its vision tower, decoding layouts.

Layer i uses RoPE (with chunked local attention and QK-norm) iff
no_rope_layers[i] == 1, else NoPE (global attention, temperature tuning); its
feed-forward is MoE iff i in moe_layers, else a dense SwiGLU of width
intermediate_size_mlp. The per-layer pattern is split into stages (config.py),
each a block of layers repeated n times (Scout and Maverick: one stage, a
4-layer block repeated 12 times); each stage's n copies are stacked on a
leading `layers` axis and run with `jax.lax.scan`, so deep models compile one
block per stage.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llama4_jax import sharding
from llama4_jax.model import attention, layers, moe
from llama4_jax.model import vision as vision_lib
from llama4_jax.model.config import (
    LAYER_INPUT,
    REMAT_POLICIES,
    LayerKind,
    ModelConfig,
    layer_index_map,
)


class DecoderLayer(nnx.Module):
  """Pre-norm layer: x + attn(norm(x)), then + ffn(norm(.)), ffn = MoE or dense MLP."""

  def __init__(self, cfg: ModelConfig, kind: LayerKind, *, rngs: nnx.Rngs):
    D = cfg.hidden_size
    self.attn_norm = layers.RMSNorm(D, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.attn = attention.Attention(cfg, kind.use_rope, rngs=rngs)
    self.ffn_norm = layers.RMSNorm(D, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    if kind.is_moe:
      self.ffn = moe.MoE(cfg, rngs=rngs)
    else:
      self.ffn = layers.MLP(
          D,
          cfg.intermediate_size_mlp,
          rngs=rngs,
          std=cfg.initializer_range,
          dtype=cfg.dtype,
          param_dtype=cfg.param_dtype,
      )
    self.is_moe = kind.is_moe

  def __call__(self, x_BTD, inputs, cache=None, cache_offset=None):
    x_BTD = checkpoint_name(x_BTD, LAYER_INPUT)
    h_BTD, cache = self.attn(self.attn_norm(x_BTD), inputs, cache, cache_offset)
    x_BTD = x_BTD + h_BTD
    if self.is_moe:
      h_BTD, stats = self.ffn(self.ffn_norm(x_BTD), inputs.valid_BT)
    else:
      h_BTD, stats = self.ffn(self.ffn_norm(x_BTD)), None
    x_BTD = sharding.shard(x_BTD + h_BTD, 'act_batch', 'act_seq', 'act_embed')
    return x_BTD, cache, stats


class Block(nnx.Module):
  """One period of the layer pattern; the unit that is stacked and scanned."""

  def __init__(self, cfg: ModelConfig, kinds: tuple[LayerKind, ...], *, rngs: nnx.Rngs):
    self.layers = nnx.List([DecoderLayer(cfg, kind, rngs=rngs) for kind in kinds])
    self.remat = cfg.remat

  def __call__(self, x_BTD, inputs, caches=None, cache_offset=None):
    new_caches, stats = [], []
    remat = REMAT_POLICIES[self.remat]
    for j, layer in enumerate(self.layers):
      cache = None if caches is None else caches[j]
      if remat and remat.scope == 'layer':
        x_BTD, cache, layer_stats = _rematerialized(layer, remat.policy, inputs, cache_offset)(
            x_BTD, cache
        )
      else:
        x_BTD, cache, layer_stats = layer(x_BTD, inputs, cache, cache_offset)
      new_caches.append(cache)
      if layer_stats is not None:
        stats.append(layer_stats)
    # Stats of this block's MoE layers, stacked on a leading axis (or None).
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *stats) if stats else None
    return x_BTD, (None if caches is None else new_caches), stacked


def _rematerialized(layer: DecoderLayer, policy, inputs, cache_offset):
  """layer(x, inputs, cache, cache_offset) as a function of (x, cache) under jax.checkpoint,
  its weights passed in explicitly."""
  graphdef, state = nnx.split(layer)

  def run(state, x_BTD, cache):
    return nnx.merge(graphdef, state)(x_BTD, inputs, cache, cache_offset)

  checkpointed = jax.checkpoint(run, prevent_cse=False, policy=policy)
  return lambda x_BTD, cache: checkpointed(state, x_BTD, cache)


class Llama4(nnx.Module):
  """Llama 4 text decoder: embed -> stages of scanned blocks -> norm -> lm_head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    V, D = cfg.vocab_size, cfg.hidden_size
    self.embed = sharding.param(
        nnx.initializers.normal(cfg.initializer_range)(
            rngs.params(), (V, D), jnp.dtype(cfg.param_dtype)
        ),
        ('vocab', 'embed'),
    )
    # Each stage: `repeats` independent copies of its Block, scanned.
    self.stages = nnx.List(
        [
            layers.stacked(
                lambda r, kinds=stage.kinds: Block(cfg, kinds, rngs=r), stage.repeats, rngs
            )
            for stage in cfg.stages()
        ]
    )
    self.final_norm = layers.RMSNorm(D, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.lm_head = layers.Einsum(
        'BTD,DV->BTV',
        (D, V),
        ('embed', 'vocab'),
        rngs=rngs,
        std=cfg.initializer_range,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
    )
    if cfg.vision is not None:
      # LeCun init (std=None): with HF's 0.02 a tower trained from scratch starts with
      # nearly image-independent tokens and the language model learns to ignore them.
      kw = dict(rngs=rngs, std=None, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
      self.vision = vision_lib.VisionEncoder(cfg.vision, remat=cfg.remat != 'none', **kw)
      self.projector = layers.Einsum(
          'NPA,AD->NPD', (cfg.vision.vision_output_dim, D), ('mlp', 'embed'), **kw
      )

  def embed_tokens(self, tokens_BT: jax.Array) -> jax.Array:
    x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(self.cfg.dtype)
    return sharding.shard(x_BTD, 'act_batch', 'act_seq', 'act_embed')

  def encode_images(self, pixels_BMCHW: jax.Array) -> jax.Array:
    """Tiles [B, M, C, I, I] -> their image tokens in the text width, [B, M * P, D]."""
    if self.cfg.vision is None:
      raise ValueError('images were given to a text-only model (config.model.vision is None)')
    if pixels_BMCHW.ndim != 5:
      raise ValueError(
          f'images must be [batch, tiles, channels, height, width], '
          f'got shape {tuple(pixels_BMCHW.shape)}'
      )
    B, M = pixels_BMCHW.shape[:2]
    tokens_NPA = self.vision(pixels_BMCHW.reshape(B * M, *pixels_BMCHW.shape[2:]))
    tokens_NPD = self.projector(tokens_NPA)
    return tokens_NPD.reshape(B, -1, tokens_NPD.shape[-1])

  def embed_inputs(self, tokens_BT: jax.Array, pixels_BMCHW: jax.Array | None = None):
    """Token embeddings, with image tokens in place of the `<|patch|>` placeholders."""
    x_BTD = self.embed_tokens(tokens_BT)
    if pixels_BMCHW is None:
      return x_BTD
    return merge_image_features(
        x_BTD, tokens_BT, self.encode_images(pixels_BMCHW), self.cfg.vision.image_token_id
    )

  def __call__(
      self,
      tokens_BT: jax.Array,
      segment_ids_BT: jax.Array | None = None,
      pixels_BMCHW: jax.Array | None = None,
  ):
    """Full-sequence forward pass. Returns (logits_BTV in float32, moe statistics).

    segment_ids_BT: 0 marks padding; tokens attend within their segment, and
    positions restart at each segment's first token (left padding and packed
    documents). Defaults to one segment per row.
    pixels_BMCHW: each row's image tiles, in the order of its `<|patch|>` runs
    (rows with fewer tiles are padded with any value; see merge_image_features).
    """
    h_BTD, stats = self.hidden_states(tokens_BT, segment_ids_BT, pixels_BMCHW)
    return self.logits(h_BTD), stats

  def hidden_states(
      self,
      tokens_BT: jax.Array,
      segment_ids_BT: jax.Array | None = None,
      pixels_BMCHW: jax.Array | None = None,
  ):
    """The forward pass up to the lm_head: (final-norm outputs [B, T, D], moe statistics).

    With `logits`, the same as calling the model; a loss can take the logits a few positions
    at a time (losses.chunked_cross_entropy_sums) instead of holding all of [B, T, V].
    """
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones(tokens_BT.shape, jnp.int32)
    inputs = attention.make_attention_inputs(
        segment_ids_BT, 0, tokens_BT.shape[1], self.cfg.attention_chunk_size
    )
    x_BTD = self.embed_inputs(tokens_BT, pixels_BMCHW)
    x_BTD, _, stats = self._run_stages(x_BTD, inputs, None, None)
    return self.final_norm(x_BTD), stats

  def decode(
      self,
      tokens_BT: jax.Array,
      cache: dict,
      segment_ids_BT: jax.Array | None = None,
      pixels_BMCHW: jax.Array | None = None,
      last_logits_only: bool = False,
  ):
    """Runs T new tokens against a KV cache (prefill, with images if any, or one decode step).

    Returns (logits_BTV in float32, updated cache); with last_logits_only, the
    logits of the last position only (T = 1), which is all a sampler's prefill needs.
    """
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones(tokens_BT.shape, jnp.int32)
    offset = cache['index']
    key_segments_BS = jax.lax.dynamic_update_slice_in_dim(
        cache['segment_ids'], segment_ids_BT.astype(jnp.int32), offset, 1
    )
    inputs = attention.make_attention_inputs(
        key_segments_BS,
        offset,
        tokens_BT.shape[1],
        self.cfg.attention_chunk_size,
        ring_size=self._ring_size(key_segments_BS.shape[1]),
    )
    x_BTD = self.embed_inputs(tokens_BT, pixels_BMCHW)
    x_BTD, layer_caches, _ = self._run_stages(x_BTD, inputs, cache['layers'], offset)
    new_cache = {
        'index': offset + tokens_BT.shape[1],
        'segment_ids': key_segments_BS,
        'layers': layer_caches,
    }
    x_BTD = self.final_norm(x_BTD[:, -1:] if last_logits_only else x_BTD)
    return self.logits(x_BTD), new_cache

  def _ring_size(self, max_len: int) -> int | None:
    chunk = self.cfg.attention_chunk_size
    return min(chunk, max_len) if chunk else None

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache: per stage, per block position, K/V stacked over repeats.

    Global (NoPE) layers keep max_len keys; chunked (RoPE) layers a ring of
    min(attention_chunk_size, max_len) slots.
    """
    cfg = self.cfg
    dtype = jnp.dtype(dtype or cfg.dtype)

    def layer_cache(kind, repeats):
      length = self._ring_size(max_len) if kind.use_rope and cfg.attention_chunk_size else max_len
      zeros = attention.init_layer_cache(batch, length, cfg.num_kv_heads, cfg.head_dim, dtype)
      return jax.tree.map(lambda a: jnp.broadcast_to(a, (repeats,) + a.shape), zeros)

    stacked = [[layer_cache(kind, stage.repeats) for kind in stage.kinds] for stage in cfg.stages()]
    return {
        'index': jnp.zeros((), jnp.int32),
        'segment_ids': jnp.zeros((batch, max_len), jnp.int32),
        'layers': stacked,
    }

  def logits(self, h_BTD):
    """Float32 logits [B, T, V] of final-norm outputs (`hidden_states`)."""
    logits_BTV = self.lm_head(h_BTD)
    return sharding.shard(logits_BTV, 'act_batch', 'act_seq', 'act_vocab').astype(jnp.float32)

  def _run_stages(self, x_BTD, inputs, caches, cache_offset):
    remat = REMAT_POLICIES[self.cfg.remat]
    new_caches, all_stats = [], []
    for s, stacked in enumerate(self.stages):
      graphdef, state = nnx.split(stacked)

      def body(x_BTD, xs, graphdef=graphdef):
        block_state, block_cache = xs
        block = nnx.merge(graphdef, block_state)
        x_BTD, block_cache, stats = block(x_BTD, inputs, block_cache, cache_offset)
        return x_BTD, (block_cache, stats)

      if remat and remat.scope == 'block':
        body = jax.checkpoint(body, prevent_cse=False, policy=remat.policy)
      stage_cache = None if caches is None else caches[s]
      x_BTD, (stage_cache, stats) = jax.lax.scan(body, x_BTD, (state, stage_cache))
      new_caches.append(stage_cache)
      if stats is not None:  # [repeats, moe layers in block, ...] -> [layers, ...]
        all_stats.append(jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), stats))
    stats = jax.tree.map(lambda *xs: jnp.concatenate(xs), *all_stats) if all_stats else None
    return x_BTD, new_caches, stats


def merge_image_features(
    x_BTD: jax.Array, tokens_BT: jax.Array, image_BKD: jax.Array, image_token_id: int
) -> jax.Array:
  """Row b's k-th `<|patch|>` token takes image_BKD[b, k]; other tokens keep x_BTD.

  Per row, so rows may hold different numbers of tiles (the rest of image_BKD
  is padding). When every row's tiles are all used this is HF's batch-major
  `masked_scatter`. Callers check the placeholder counts (they cannot be
  checked under jit); surplus placeholders would reuse the last image token.
  """
  is_patch_BT = tokens_BT == image_token_id
  k_BT = jnp.clip(jnp.cumsum(is_patch_BT, axis=1) - 1, 0, image_BKD.shape[1] - 1)
  image_BTD = jnp.take_along_axis(image_BKD, k_BT[..., None], axis=1)
  return jnp.where(is_patch_BT[..., None], image_BTD.astype(x_BTD.dtype), x_BTD)


def decode_layout(model: Llama4) -> Llama4:
  """The same model laid out for decoding: weights sliced once, read in place each step.

  Each layer's weights become separate arrays (`unstack_layers`), and on CPU
  so do each expert's (`moe.MoE.split_experts`). XLA on CPU copies a slice of a
  stacked weight every time it is used: of the stacked layers, that made a
  decode step of a ~100M model 3x slower; of the selected experts, it took 2
  of a step's 13 ms (BENCHMARKS.md). GPUs and TPUs keep the stacked experts
  and the training dispatch (`moe.grouped_matmul_for`; the split layout is not measured there).
  For inference only; `model` itself is left as it was.
  """
  model = nnx.clone(unstack_layers(model))
  if jax.default_backend() == 'cpu':
    for module in [m for _, m in nnx.iter_graph(model) if isinstance(m, moe.MoE)]:
      module.split_experts()
  return model


def unstack_layers(model: Llama4) -> Llama4:
  """The same model with each layer's weights as separate arrays (one stage, no scan)."""
  cfg = model.cfg
  if len(cfg.stages()) == 1 and cfg.stages()[0].repeats == 1:
    return model
  graphdef, state = nnx.split(abstract_model(cfg.replace(scan_layers=False)))
  stacked = nnx.to_pure_dict(nnx.state(model))
  layers = {
      i: jax.tree.map(lambda a, r=r: a[r : r + 1], stacked['stages'][s]['layers'][j])
      for i, (s, r, j) in enumerate(layer_index_map(cfg))
  }
  nnx.replace_by_pure_dict(state, {**stacked, 'stages': {0: {'layers': layers}}})
  return nnx.merge(graphdef, state)


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def abstract_model(cfg: ModelConfig) -> Llama4:
  """The model with ShapeDtypeStruct leaves; nothing is allocated."""
  return nnx.eval_shape(lambda: Llama4(cfg, rngs=nnx.Rngs(0)))
