"""Small building blocks: RMSNorm, RoPE, einsum projections, the SwiGLU MLP.

Axis letters (used in names and einsum strings across the package):
  B batch, T query length, S key length, D model width, N query heads,
  K key/value heads, G query heads per kv head, H head dim, F MLP width,
  E experts, V vocabulary, L layers.
A module that needs more names them in its docstring (attention.py, moe.py,
grouped_swiglu.py, vision.py); such a letter means what it says within its module only
(C is a block of keys in attention.py, an expert's capacity in moe.py).
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax import sharding


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) over the last axis, computed in float32, cast back to x.dtype."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return x32.astype(x.dtype)


class RMSNorm(nnx.Module):
  """Llama RMSNorm: normalise in float32, cast, *then* multiply by the scale."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = sharding.param(jnp.ones((dim,), param_dtype), ('norm',))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_normalize(x, self.eps) * self.scale[...].astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias, normalised in float32 (the vision tower's norm)."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = sharding.param(jnp.ones((dim,), param_dtype), ('norm',))
    self.bias = sharding.param(jnp.zeros((dim,), param_dtype), ('norm',))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    return y * self.scale[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


def stacked(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
  """`count` independent make(rngs) modules on a leading 'layers' axis, for `jax.lax.scan`.

  The `transform_metadata` decorator (not vmap's argument) puts 'layers' into
  each parameter's sharding names (STYLE.md 2.1).
  """

  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=0, out_axes=0)
  @nnx.transform_metadata(in_axes=0, out_axes=0, partition='layers')
  def create(rngs):
    return make(rngs)

  return create(rngs)


def _as_matrices(x, w, contracted):
  """x[..., K1..Kn] and w[K1..Kn, ...] as [M, K] and [K, O] matrices."""
  K = math.prod(w.shape[:contracted])
  return x.reshape(-1, K), w.reshape(K, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project(x: jax.Array, w: jax.Array, contracted: int = 1) -> jax.Array:
  """Contracts the last `contracted` axes of x with the first of w (`tensordot`).

  It runs as one 2-D matmul with a hand-written backward pass, on every backend:
  - CPU: XLA otherwise (a) re-lays out w on every call when two axes are contracted
    (o_proj's N, H: 7x slower at decode) and (b) computes the weight gradient x^T @ dy
    by transposing dy, the wide activation, inside an elementwise fusion at one cache
    miss per element; transposing x as its own op instead makes an MLP's forward +
    backward 1.8x faster (4096 x 512 -> 2048, measured).
  - GPU: the CUDA compiler's plan for Scout's train step on 256 H100s (3 x 8192 tokens
    per GPU) is 71 GiB per GPU with it, 87 GiB with XLA's own backward of the same matmul.
  - TPU: as little memory as XLA's own backward of the 2-D matmul, and 3.2 GiB less per
    chip than a `tensordot` over [B, T, D] (Maverick on a v5p-256 at 4 x 8192 tokens per
    chip: 85.42 against 88.66 GiB).
  """
  x_MK, w_KO = _as_matrices(x, w, contracted)
  return (x_MK @ w_KO).reshape(x.shape[: x.ndim - contracted] + w.shape[contracted:])


def _project_fwd(x, w, contracted):
  return project(x, w, contracted), (x, w)


def _project_bwd(contracted, residuals, dy):
  x, w = residuals
  x_MK, w_KO = _as_matrices(x, w, contracted)
  dy_MO = dy.reshape(x_MK.shape[0], -1)
  dx = (dy_MO @ w_KO.T).reshape(x.shape)
  # The barrier keeps XLA from folding the transpose back into the dot.
  xT_KM = jax.lax.optimization_barrier(x_MK.T)
  return dx, (xT_KM @ dy_MO).reshape(w.shape)


project.defvjp(_project_fwd, _project_bwd)


class Einsum(nnx.Module):
  """A bias-free projection with logical axis names on its weight.

  `eqn` names the axes ('BTD,DF->BTF', 'BTNH,NHD->BTD'); it must contract the
  trailing axes of x with the leading axes of w, as every projection here does.
  """

  def __init__(
      self,
      eqn: str,
      shape: tuple[int, ...],
      axes: tuple[str | None, ...],
      *,
      rngs: nnx.Rngs,
      std: float | None,
      dtype,
      param_dtype=jnp.float32,
      use_bias: bool = False,
  ):
    inputs, out = eqn.split('->')
    x_axes, w_axes = inputs.split(',')
    n = (len(x_axes) + len(w_axes) - len(out)) // 2  # contracted axes
    kept = len(x_axes) - n
    if (
        len(w_axes) != len(shape)
        or x_axes[kept:] != w_axes[:n]
        or out != x_axes[:kept] + w_axes[n:]
    ):
      raise ValueError(
          f'Einsum {eqn!r} must contract the trailing axes of x with the leading '
          f'axes of a weight of shape {shape}'
      )
    self.contracted = n
    self.dtype = dtype
    if std is None:  # LeCun: unit-variance outputs for unit-variance inputs
      std = math.prod(shape[:n]) ** -0.5
    init = nnx.initializers.normal(std)
    self.w = sharding.param(init(rngs.params(), shape, param_dtype), axes)
    if use_bias:  # over the output axes (the vision tower's projections)
      self.b = sharding.param(jnp.zeros(shape[n:], param_dtype), axes[n:])
    self.use_bias = use_bias

  def __call__(self, x: jax.Array) -> jax.Array:
    y = project(x.astype(self.dtype), self.w[...].astype(self.dtype), self.contracted)
    return y + self.b[...].astype(self.dtype) if self.use_bias else y


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); no biases."""

  def __init__(
      self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, std: float, dtype, param_dtype=jnp.float32
  ):
    kw = dict(rngs=rngs, std=std, dtype=dtype, param_dtype=param_dtype)
    self.gate = Einsum('BTD,DF->BTF', (d_model, d_ff), ('embed', 'mlp'), **kw)
    self.up = Einsum('BTD,DF->BTF', (d_model, d_ff), ('embed', 'mlp'), **kw)
    self.down = Einsum('BTF,FD->BTD', (d_ff, d_model), ('mlp', 'embed'), **kw)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    h_BTF = jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD)
    h_BTF = sharding.shard(h_BTF, 'act_batch', 'act_seq', 'act_mlp')
    return self.down(h_BTF)


# RoPE -----------------------------------------------------------------------


def rope_inverse_frequencies(
    head_dim: int,
    theta: float,
    rope_type: str = 'default',
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 1.0,
    original_max_position: int = 8192,
) -> np.ndarray:
  """inv_freq[j] = theta^(-2j/d) in float32, with optional llama3 scaling."""
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
  if rope_type == 'default':
    return inv_freq
  if rope_type != 'llama3':
    raise ValueError(f'rope_type must be "default" or "llama3", got {rope_type!r}')
  wavelen = 2 * math.pi / inv_freq
  low_freq_wavelen = original_max_position / low_freq_factor
  high_freq_wavelen = original_max_position / high_freq_factor
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  # The medium band interpolates; it is empty when low == high (Scout), and the
  # guarded denominator keeps the unselected branch finite.
  denom = high_freq_factor - low_freq_factor if high_freq_factor != low_freq_factor else 1.0
  smooth = (original_max_position / wavelen - low_freq_factor) / denom
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates interleaved pairs (x[2j], x[2j+1]) by pos * inv_freq[j] (Meta's complex form)."""
  angles_BTJ = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  return rotate_pairs(x_BTNH, angles_BTJ)


def rotate_pairs(x_BTNH: jax.Array, angles_BTJ: jax.Array) -> jax.Array:
  """Rotates each interleaved pair (x[2j], x[2j+1]) by angles[j], in float32."""
  cos, sin = jnp.cos(angles_BTJ)[:, :, None, :], jnp.sin(angles_BTJ)[:, :, None, :]
  x32 = x_BTNH.astype(jnp.float32).reshape(*x_BTNH.shape[:-1], -1, 2)
  x_even, x_odd = x32[..., 0], x32[..., 1]
  rotated = jnp.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], axis=-1)
  return rotated.reshape(x_BTNH.shape).astype(x_BTNH.dtype)
