"""ModelConfig and the presets: the Llama 4 architecture as data.

Layer i uses RoPE (with chunked local attention and QK-norm) iff
no_rope_layers[i] == 1, else NoPE (global attention, temperature tuning); its
feed-forward is MoE iff i in moe_layers, else a dense SwiGLU of width
intermediate_size_mlp. The per-layer pattern is split into stages, each a block
of layers repeated n times (Scout and Maverick: one stage, a 4-layer block
repeated 12 times); each stage's n copies are stacked on a leading `layers`
axis and run with `jax.lax.scan`, so deep models compile one block per stage.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np

from llama4_jax.model import layers, moe
from llama4_jax.model import vision as vision_lib


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Llama 4 text model (field names follow HF where they exist)."""

  vocab_size: int = 128
  hidden_size: int = 64  # D
  num_layers: int = 4  # L
  num_heads: int = 4  # N query heads
  num_kv_heads: int = 2  # K key/value heads
  head_dim: int = 16  # H
  intermediate_size: int = 32  # F: routed experts and the shared expert
  intermediate_size_mlp: int = 48  # dense (non-MoE) layers' MLP width
  num_experts: int = 4  # E
  num_experts_per_tok: int = 1  # router top-k
  moe_layers: tuple[int, ...] = (0, 1)  # indices of MoE layers
  no_rope_layers: tuple[int, ...] = (1, 0, 1, 0)  # HF semantics: 1 = layer USES RoPE
  use_qk_norm: bool = True  # weightless RMS norm of q, k on RoPE layers
  attention_chunk_size: int = 8  # chunked local attention on RoPE layers; 0 = off
  attention_query_block: int = 0  # > 0: attention over query blocks of this size (memory)
  attention_key_block: int = 0  # > 0 (with query blocks): online softmax over key blocks
  attn_temperature_tuning: bool = True  # query temperature on NoPE layers
  floor_scale: int = 2
  attn_scale: float = 0.5
  rope_theta: float = 10000.0
  rope_type: str = 'llama3'  # 'default' or 'llama3'
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 64
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 1024
  initializer_range: float = 0.02
  bos_token_id: int = 1
  eos_token_ids: tuple[int, ...] = (2,)
  pad_token_id: int = 0
  dtype: str = 'float32'  # compute dtype
  param_dtype: str = 'float32'  # parameter (and optimizer state) dtype
  moe_dispatch: str = 'dropless'  # 'dropless', 'capacity' or 'dense' (see moe.py)
  # dropless: 'looped', 'megablox', 'ragged', 'blocked'; 'auto': CPU looped, TPU megablox,
  # GPU blocked (moe.grouped_matmul_for)
  moe_grouped_matmul: str = 'auto'
  moe_block_size: int = 0  # blocked dropless: rows per block (0 = auto, moe.py)
  moe_capacity_factor: float = 1.25  # capacity: slots per expert = cf * tokens * k / E
  remat: str = 'none'  # see REMAT_POLICIES
  scan_layers: bool = True  # scan repeated blocks (False: unroll, for debugging)
  vision: vision_lib.VisionConfig | None = None  # the vision tower; None = text only

  def __post_init__(self):
    for name in ('moe_layers', 'no_rope_layers', 'eos_token_ids'):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    if isinstance(self.vision, dict):
      object.__setattr__(self, 'vision', vision_lib.VisionConfig.from_dict(self.vision))
    self._validate()

  @classmethod
  def from_dict(cls, d) -> 'ModelConfig':
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f'model config: unknown keys {unknown}')
    return cls(**dict(d))

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

  def replace(self, **kw) -> 'ModelConfig':
    return dataclasses.replace(self, **kw)

  def _validate(self):
    def fail(key, msg):
      raise ValueError(f'config.model.{key}: {msg}')

    for key in (
        'vocab_size',
        'hidden_size',
        'num_layers',
        'num_heads',
        'num_kv_heads',
        'head_dim',
        'intermediate_size',
        'intermediate_size_mlp',
        'num_experts',
        'num_experts_per_tok',
    ):
      if getattr(self, key) <= 0:
        fail(key, f'must be positive, got {getattr(self, key)}')
    if self.num_heads % self.num_kv_heads:
      fail('num_kv_heads', f'{self.num_kv_heads} must divide num_heads={self.num_heads}')
    if self.head_dim % 2:
      fail('head_dim', f'must be even for RoPE, got {self.head_dim}')
    if self.num_experts_per_tok > self.num_experts:
      fail('num_experts_per_tok', f'{self.num_experts_per_tok} > num_experts={self.num_experts}')
    if len(self.no_rope_layers) != self.num_layers:
      fail(
          'no_rope_layers',
          f'has {len(self.no_rope_layers)} entries for num_layers={self.num_layers}',
      )
    if any(v not in (0, 1) for v in self.no_rope_layers):
      fail('no_rope_layers', f'entries must be 0 or 1, got {self.no_rope_layers}')
    bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
    if bad or len(set(self.moe_layers)) != len(self.moe_layers):
      fail(
          'moe_layers', f'must be distinct indices in [0, {self.num_layers}), got {self.moe_layers}'
      )
    for key in ('attention_query_block', 'attention_key_block'):
      if getattr(self, key) < 0:
        fail(key, f'must be >= 0, got {getattr(self, key)}')
    if self.attention_key_block and not self.attention_query_block:
      fail('attention_key_block', 'key blocks split query blocks: set attention_query_block > 0')
    if self.attn_temperature_tuning and self.floor_scale <= 0:
      fail('floor_scale', f'must be positive with attn_temperature_tuning, got {self.floor_scale}')
    if self.attention_chunk_size < 0:
      fail('attention_chunk_size', f'must be >= 0, got {self.attention_chunk_size}')
    if self.rope_type not in ('default', 'llama3'):
      fail('rope_type', f'must be "default" or "llama3", got {self.rope_type!r}')
    # `not x > 0` refuses NaN too. theta <= 0 makes inverse frequencies inf or NaN; llama3
    # divides frequencies by rope_factor (NaN logits at 0) and the original context length
    # by the two band factors (ZeroDivisionError at 0). high < low is no error: the medium
    # band is then empty, as in transformers.
    if not self.rope_theta > 0:
      fail('rope_theta', f'must be positive, got {self.rope_theta}')
    if self.rope_type == 'llama3':
      for key in ('rope_factor', 'rope_low_freq_factor', 'rope_high_freq_factor'):
        if not getattr(self, key) > 0:
          fail(key, f'must be positive with rope_type "llama3", got {getattr(self, key)}')
    for key in ('dtype', 'param_dtype'):
      if getattr(self, key) not in ('float32', 'bfloat16', 'float16'):
        fail(key, f'must be float32, bfloat16 or float16, got {getattr(self, key)!r}')
    if self.moe_dispatch not in moe.DISPATCHES:
      fail('moe_dispatch', f'{self.moe_dispatch!r} is not one of {moe.DISPATCHES}')
    if self.moe_grouped_matmul not in moe.GROUPED_MATMULS:
      fail('moe_grouped_matmul', f'{self.moe_grouped_matmul!r} is not one of {moe.GROUPED_MATMULS}')
    if self.moe_block_size < 0:
      fail('moe_block_size', f'must be positive (or 0 = auto), got {self.moe_block_size}')
    if self.moe_capacity_factor <= 0:
      fail('moe_capacity_factor', f'must be positive, got {self.moe_capacity_factor}')
    if self.remat not in REMAT_POLICIES:
      fail('remat', f'{self.remat!r} is not one of {sorted(REMAT_POLICIES)}')
    if self.vision is not None and not 0 <= self.vision.image_token_id < self.vocab_size:
      fail(
          'vision.image_token_id',
          f'{self.vision.image_token_id} is not a token id ' f'(vocab_size={self.vocab_size})',
      )

  def rope_inverse_frequencies(self) -> np.ndarray:
    return layers.rope_inverse_frequencies(
        self.head_dim,
        self.rope_theta,
        self.rope_type,
        self.rope_factor,
        self.rope_low_freq_factor,
        self.rope_high_freq_factor,
        self.rope_original_max_position,
    )

  def layer_kinds(self) -> tuple['LayerKind', ...]:
    moe_set = set(self.moe_layers)
    return tuple(
        LayerKind(bool(self.no_rope_layers[i]), i in moe_set) for i in range(self.num_layers)
    )

  def stages(self) -> tuple['Stage', ...]:
    return layer_stages(self.layer_kinds(), scan=self.scan_layers)


class LayerKind(NamedTuple):
  use_rope: bool
  is_moe: bool


class Stage(NamedTuple):
  """`repeats` consecutive copies of the layer pattern `kinds`."""

  kinds: tuple[LayerKind, ...]
  repeats: int


def layer_stages(kinds: tuple[LayerKind, ...], scan: bool = True) -> tuple[Stage, ...]:
  """Splits a per-layer pattern into stages of repeated blocks.

  Greedy from the first layer: take the block (period p) whose repetition covers
  the most layers (shortest p on ties); layers that repeat nothing are grouped
  into one stage run once. Works for any pattern; periodic ones give one stage.
  """
  if not scan:
    return (Stage(tuple(kinds), 1),)
  stages: list[Stage] = []
  singles: list[LayerKind] = []
  i, L = 0, len(kinds)
  while i < L:
    best_p, best_n = 1, 1
    for p in range(1, (L - i) // 2 + 1):
      n = 1
      while i + (n + 1) * p <= L and kinds[i + n * p : i + (n + 1) * p] == kinds[i : i + p]:
        n += 1
      if n > 1 and n * p > best_p * best_n:
        best_p, best_n = p, n
    if best_n == 1:
      singles.append(kinds[i])
      i += 1
      continue
    if singles:
      stages.append(Stage(tuple(singles), 1))
      singles = []
    stages.append(Stage(tuple(kinds[i : i + best_p]), best_n))
    i += best_p * best_n
  if singles:
    stages.append(Stage(tuple(singles), 1))
  return tuple(stages)


def layer_index_map(cfg: ModelConfig) -> list[tuple[int, int, int]]:
  """For each HF layer index: (stage, repeat, position in block)."""
  out = []
  for s, stage in enumerate(cfg.stages()):
    for r in range(stage.repeats):
      for j in range(len(stage.kinds)):
        out.append((s, r, j))
  return out


# Fields that choose how the model is computed, not what it computes from its parameters: a
# run may resume (or a checkpoint be evaluated) with other values of these.
EXECUTION_FIELDS = (
    'dtype',
    'remat',
    'scan_layers',
    'attention_query_block',
    'attention_key_block',
    'moe_dispatch',
    'moe_grouped_matmul',
    'moe_block_size',
    'moe_capacity_factor',
)


class Remat(NamedTuple):
  """What the backward pass recomputes: `jax.checkpoint` with `policy` around each scanned
  block of layers (scope 'block') or around each layer (scope 'layer')."""

  scope: str  # 'block' or 'layer'
  policy: Any = None  # a jax.checkpoint_policies policy; None recomputes everything


# Names the decoder layer gives its values for these policies (jax.ad_checkpoint.checkpoint_name).
LAYER_INPUT = 'layer_input'

REMAT_POLICIES: dict[str, Remat | None] = {
    'none': None,  # keep every activation (fastest, most memory)
    # Save each block's input (one per scanned block of layers); the backward pass recomputes
    # the whole block at once.
    'full': Remat('block'),
    'dots': Remat('block', jax.checkpoint_policies.checkpoint_dots),
    'dots_no_batch': Remat('block', jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims),
    # Save each layer's input; the backward pass holds one layer's activations at a time.
    'layer': Remat('layer'),
    # As 'layer', with the layer inputs in host memory (MaxText's offloaded decoder-layer
    # inputs): device memory keeps no saved activations.
    'offload_layer_inputs': Remat(
        'layer',
        jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=[LAYER_INPUT],
            offload_src='device',
            offload_dst='pinned_host',
        ),
    ),
}


_PRESET_COMMON = dict(
    vocab_size=202048,
    hidden_size=5120,
    num_layers=48,
    num_heads=40,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=8192,
    intermediate_size_mlp=16384,
    num_experts_per_tok=1,
    no_rope_layers=(1, 1, 1, 0) * 12,
    attention_chunk_size=8192,
    attn_temperature_tuning=True,
    floor_scale=8192,
    attn_scale=0.1,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    bos_token_id=200000,
    eos_token_ids=(200001, 200007, 200008),
    pad_token_id=200018,
    dtype='bfloat16',
    remat='full',
    attention_query_block=512,  # 40 x 512 x 8192 scores per sequence at a time, not 40 x 8192^2
)

PRESETS: dict[str, ModelConfig] = {
    # docs/llama4_architecture.md §9: every code path in four layers (RoPE/NoPE x MoE/dense).
    'parity': ModelConfig(),
    # The CPU training model of configs/tiny.py (vocabulary from the tokenizer).
    'tiny': ModelConfig(
        vocab_size=4096,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=128,
        intermediate_size_mlp=256,
        num_experts=4,
        num_experts_per_tok=1,
        moe_layers=(1, 3),
        no_rope_layers=(1, 1, 1, 0),
        attention_chunk_size=64,
        floor_scale=64,
        attn_scale=0.1,
        rope_theta=10000.0,
        rope_type='default',
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_ids=(2, 5, 6),
        pad_token_id=0,
    ),
    'scout': ModelConfig(
        **_PRESET_COMMON,
        num_experts=16,
        moe_layers=tuple(range(48)),
        use_qk_norm=True,
        rope_type='llama3',
        rope_factor=16.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=1.0,
        rope_original_max_position=8192,
        max_position_embeddings=10485760,
    ),
    'maverick': ModelConfig(
        **_PRESET_COMMON,
        num_experts=128,
        moe_layers=tuple(range(1, 48, 2)),
        use_qk_norm=False,
        rope_type='default',
        max_position_embeddings=1048576,
    ),
}

# The released vision tower (both models): 336-pixel tiles of 24 x 24 patches, 144 tokens per tile.
LLAMA4_VISION = vision_lib.VisionConfig(
    hidden_size=1408,
    num_layers=34,
    num_heads=16,
    intermediate_size=5632,
    image_size=336,
    patch_size=14,
    pixel_shuffle_ratio=0.5,
    projector_input_dim=4096,
    projector_output_dim=4096,
    vision_output_dim=4096,
    rope_theta=10000.0,
    max_tiles=16,
    image_token_id=200092,
    boi_token_id=200080,
    eoi_token_id=200081,
)
# The released multimodal checkpoints (HF Llama4ForConditionalGeneration).
PRESETS['scout_mm'] = PRESETS['scout'].replace(vision=LLAMA4_VISION)
PRESETS['maverick_mm'] = PRESETS['maverick'].replace(vision=LLAMA4_VISION)
