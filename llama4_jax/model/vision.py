"""Llama 4's vision tower and projector (docs/llama4_architecture.md §5).

Every tile is encoded on its own: unfold patches -> linear (no bias), append
the CLS token LAST, add positions, LayerNorm, encoder layers (biased
attention with 2-D RoPE and no mask, exact-GELU MLP), LayerNorm, drop CLS,
pixel shuffle (2x2 patches -> one token), the adapter MLP (GELU after both
layers), then the projector into the text model's width. The text model puts
the result in place of the `<|patch|>` tokens (model.merge_image_features).

Axis letters beyond layers.py's: M tiles per row, C channels, P patches (or
image tokens) per tile, Q patch features C*p*p, W vision width.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax import sharding
from llama4_jax.model import layers

# Every vision LayerNorm's eps: HF builds them as nn.LayerNorm(width), torch's default, and
# ignores the config's norm_eps (docs/llama4_architecture.md §2.2, pitfall 18).
LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower (HF `Llama4VisionConfig`) and the multimodal token ids."""

  hidden_size: int = 32  # W
  num_layers: int = 2
  num_heads: int = 4
  intermediate_size: int = 128  # encoder MLP width; also the adapter's input, W / ratio^2
  image_size: int = 56  # tile side in pixels
  patch_size: int = 7
  num_channels: int = 3
  pixel_shuffle_ratio: float = 0.5
  projector_input_dim: int = 48
  projector_output_dim: int = 48
  vision_output_dim: int = 48
  rope_theta: float = 10000.0
  # Written to HF's config.json (hf_convert.hf_config), not used: HF's vision LayerNorms
  # take torch's default eps whatever the config says (LAYER_NORM_EPS below).
  norm_eps: float = 1e-5
  max_tiles: int = 16  # preprocessing: most tiles per image (before the global tile)
  image_token_id: int = 5  # <|patch|>: its embeddings are replaced by image features
  boi_token_id: int = 6  # <|image_start|> (HF config round trip)
  eoi_token_id: int = 7  # <|image_end|>

  def __post_init__(self):
    def fail(key, msg):
      raise ValueError(f'config.model.vision.{key}: {msg}')

    for key in (
        'hidden_size',
        'num_layers',
        'num_heads',
        'intermediate_size',
        'image_size',
        'patch_size',
        'num_channels',
        'projector_input_dim',
        'projector_output_dim',
        'vision_output_dim',
        'max_tiles',
    ):
      if getattr(self, key) <= 0:
        fail(key, f'must be positive, got {getattr(self, key)}')
    if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
      fail(
          'num_heads',
          f'hidden_size / num_heads must be a multiple of 4 for the 2-D RoPE, got '
          f'{self.hidden_size} / {self.num_heads}',
      )
    if self.image_size % self.patch_size:
      fail('image_size', f'{self.image_size} is not a multiple of patch_size={self.patch_size}')
    # Before shuffle_block, which divides by it.
    if not 0 < self.pixel_shuffle_ratio <= 1:
      fail(
          'pixel_shuffle_ratio',
          f'must be 1/k for an integer k >= 1, got {self.pixel_shuffle_ratio}',
      )
    s = self.shuffle_block
    if abs(1 / s - self.pixel_shuffle_ratio) > 1e-9 or self.grid % s:
      fail(
          'pixel_shuffle_ratio',
          f'must be 1/k for an integer k dividing the patch grid '
          f'{self.grid}, got {self.pixel_shuffle_ratio}',
      )
    if self.intermediate_size != self.hidden_size * s * s:
      fail(
          'intermediate_size',
          f'must equal hidden_size / pixel_shuffle_ratio^2 = '
          f'{self.hidden_size * s * s} (it is also the adapter input), got {self.intermediate_size}',
      )
    if not self.projector_input_dim == self.projector_output_dim == self.vision_output_dim:
      fail(
          'projector_output_dim',
          'projector_input_dim, projector_output_dim and '
          'vision_output_dim must be equal (HF layer shapes), got '
          f'{self.projector_input_dim}, {self.projector_output_dim}, {self.vision_output_dim}',
      )

  @property
  def grid(self) -> int:
    """Patches per tile side."""
    return self.image_size // self.patch_size

  @property
  def shuffle_block(self) -> int:
    """Patches per side merged into one token by the pixel shuffle (2 for ratio 0.5)."""
    return max(1, round(1 / self.pixel_shuffle_ratio))

  @property
  def tokens_per_tile(self) -> int:
    return (self.grid // self.shuffle_block) ** 2

  @classmethod
  def from_dict(cls, d) -> 'VisionConfig':
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f'config.model.vision: unknown keys {unknown}')
    return cls(**dict(d))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def rope_angles(cfg: VisionConfig) -> np.ndarray:
  """[P + 1, head_dim / 2] rotation angles: x pairs, then y pairs; CLS (last) unrotated.

  HF `Llama4VisionRotaryEmbedding`: f_j = theta^(-4j/d) and coordinates + 1.
  """
  head_dim = cfg.hidden_size // cfg.num_heads
  freqs = 1.0 / cfg.rope_theta ** (np.arange(head_dim // 4, dtype=np.float32) * 4 / head_dim)
  y, x = np.divmod(np.arange(cfg.grid**2), cfg.grid)
  angles = np.concatenate([(x[:, None] + 1) * freqs, (y[:, None] + 1) * freqs], axis=1)
  return np.concatenate([angles, np.zeros((1, head_dim // 2))]).astype(np.float32)


def unfold_patches(pixels_NCHW: jax.Array, patch: int) -> jax.Array:
  """[N, C, H, W] -> [N, P, C*p*p]: patches row-major, features channel-major (torch Unfold)."""
  N, C, H, W = pixels_NCHW.shape
  x = pixels_NCHW.reshape(N, C, H // patch, patch, W // patch, patch)
  return x.transpose(0, 2, 4, 1, 3, 5).reshape(N, (H // patch) * (W // patch), C * patch * patch)


def pixel_shuffle(x_NPW: jax.Array, block: int) -> jax.Array:
  """Merges each block x block patch neighbourhood into one token.

  Output token (i, j) row-major; channel (block * dy + dx) * W + c takes patch
  (block * i + dy, block * j + dx), channel c (HF `pixel_shuffle`, doc §5.5).
  """
  N, P, W = x_NPW.shape
  g = math.isqrt(P)
  x = x_NPW.reshape(N, g // block, block, g // block, block, W)  # n, i, dy, j, dx, c
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(N, (g // block) ** 2, block * block * W)


class EncoderLayer(nnx.Module):
  """x + attn(LN(x)), then + fc2(gelu(fc1(LN(.)))); every projection has a bias."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, std: float, dtype, param_dtype):
    W, N, F = cfg.hidden_size, cfg.num_heads, cfg.intermediate_size
    H = W // N
    kw = dict(rngs=rngs, std=std, dtype=dtype, param_dtype=param_dtype, use_bias=True)
    self.attn_norm = layers.LayerNorm(W, LAYER_NORM_EPS, param_dtype=param_dtype)
    self.q = layers.Einsum('BTW,WNH->BTNH', (W, N, H), ('embed', 'q_heads', 'head_dim'), **kw)
    self.k = layers.Einsum('BTW,WNH->BTNH', (W, N, H), ('embed', 'q_heads', 'head_dim'), **kw)
    self.v = layers.Einsum('BTW,WNH->BTNH', (W, N, H), ('embed', 'q_heads', 'head_dim'), **kw)
    self.o = layers.Einsum('BTNH,NHW->BTW', (N, H, W), ('q_heads', 'head_dim', 'embed'), **kw)
    self.mlp_norm = layers.LayerNorm(W, LAYER_NORM_EPS, param_dtype=param_dtype)
    self.fc1 = layers.Einsum('BTW,WF->BTF', (W, F), ('embed', 'mlp'), **kw)
    self.fc2 = layers.Einsum('BTF,FW->BTW', (F, W), ('mlp', 'embed'), **kw)

  def __call__(self, x_BTW: jax.Array, angles_TJ: jax.Array) -> jax.Array:
    h_BTW = self.attn_norm(x_BTW)
    angles_BTJ = angles_TJ[None]
    q_BTNH = layers.rotate_pairs(self.q(h_BTW), angles_BTJ)
    k_BTNH = layers.rotate_pairs(self.k(h_BTW), angles_BTJ)
    # Bidirectional over the whole tile, CLS included; scale head_dim^-1/2.
    out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTNH, self.v(h_BTW))
    x_BTW = x_BTW + self.o(out_BTNH)
    return x_BTW + self.fc2(jax.nn.gelu(self.fc1(self.mlp_norm(x_BTW)), approximate=False))


class VisionEncoder(nnx.Module):
  """Tiles [N, C, I, I] -> image tokens [N, P', projector_output_dim] (before the projector)."""

  def __init__(
      self,
      cfg: VisionConfig,
      *,
      rngs: nnx.Rngs,
      std: float,
      dtype,
      param_dtype,
      remat: bool = False,
  ):
    self.cfg, self.dtype, self.remat = cfg, dtype, remat
    W, p = cfg.hidden_size, cfg.patch_size
    kw = dict(rngs=rngs, std=std, dtype=dtype, param_dtype=param_dtype)
    self.patch_embed = layers.Einsum(
        'NPQ,QW->NPW', (cfg.num_channels * p * p, W), (None, 'embed'), **kw
    )
    # HF initialises both at W^-1/2 scale.
    init = nnx.initializers.normal(W**-0.5)
    self.class_embedding = sharding.param(init(rngs.params(), (W,), param_dtype), ('embed',))
    self.positions = sharding.param(
        init(rngs.params(), (cfg.grid**2 + 1, W), param_dtype), (None, 'embed')
    )
    self.pre_norm = layers.LayerNorm(W, LAYER_NORM_EPS, param_dtype=param_dtype)
    self.layers = layers.stacked(  # scanned
        lambda r: EncoderLayer(cfg, rngs=r, std=std, dtype=dtype, param_dtype=param_dtype),
        cfg.num_layers,
        rngs,
    )
    self.post_norm = layers.LayerNorm(W, LAYER_NORM_EPS, param_dtype=param_dtype)
    A, F = cfg.projector_output_dim, cfg.intermediate_size
    self.adapter_fc1 = layers.Einsum('NPF,FA->NPA', (F, A), ('mlp', 'embed'), **kw)
    self.adapter_fc2 = layers.Einsum('NPA,AB->NPB', (A, A), ('mlp', 'embed'), **kw)

  def __call__(self, pixels_NCHW: jax.Array) -> jax.Array:
    cfg = self.cfg
    expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
    if pixels_NCHW.ndim != 4 or pixels_NCHW.shape[1:] != expected:
      raise ValueError(
          f'vision tower: tiles must have shape [N, {", ".join(map(str, expected))}], '
          f'got {tuple(pixels_NCHW.shape)}'
      )
    x_NPW = self.patch_embed(unfold_patches(pixels_NCHW.astype(self.dtype), cfg.patch_size))
    cls_NPW = jnp.broadcast_to(
        self.class_embedding[...].astype(self.dtype), (x_NPW.shape[0], 1, x_NPW.shape[2])
    )
    x_NPW = jnp.concatenate([x_NPW, cls_NPW], axis=1) + self.positions[...].astype(self.dtype)
    x_NPW = self.pre_norm(x_NPW)
    angles_TJ = jnp.asarray(rope_angles(cfg))

    graphdef, state = nnx.split(self.layers)

    def body(x, layer_state):
      return nnx.merge(graphdef, layer_state)(x, angles_TJ), None

    if self.remat:
      body = jax.checkpoint(body, prevent_cse=False)
    x_NPW, _ = jax.lax.scan(body, x_NPW, state)
    x_NPW = self.post_norm(x_NPW)[:, :-1]  # drop CLS
    x_NPF = pixel_shuffle(x_NPW, cfg.shuffle_block)
    gelu = lambda x: jax.nn.gelu(x, approximate=False)
    return gelu(self.adapter_fc2(gelu(self.adapter_fc1(x_NPF))))
