"""Model FLOPs per token (active parameters, attention with its masks) and device peaks."""

import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama4_jax import model as model_lib

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets. TPUs by the `device_kind` JAX
# gives them (a v5p is 'TPU v5', a v5e 'TPU v5 lite', a v6e 'TPU v6 lite'); GPUs by the model
# name, a word of theirs ('NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-80GB'; an L40S is no L4).
BF16_PEAK = {
    'TPU v4': 275e12,
    'TPU v5': 459e12,
    'TPU v5p': 459e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
    'H100': 989e12,  # the SXM part
    'H200': 989e12,
    'GH200': 989e12,
    'A100': 312e12,
    'L4': 121e12,
    'B200': 2250e12,
}


# GPU variants slower than their model's SXM part, by two consecutive words of the
# device_kind ('NVIDIA H100 PCIe', 'NVIDIA H100 NVL'); they win over BF16_PEAK's model word.
BF16_PEAK_VARIANTS = {
    ('H100', 'PCIe'): 756e12,
    ('H100', 'NVL'): 835e12,
}


def bf16_peak(device_kind: str) -> float | None:
  """The data-sheet peak of a device_kind (`BF16_PEAK`, `BF16_PEAK_VARIANTS`), or None for one
  not listed."""
  if device_kind in BF16_PEAK:
    return BF16_PEAK[device_kind]
  words = re.split(r'[\s-]+', device_kind)
  for pair in zip(words, words[1:]):
    if pair in BF16_PEAK_VARIANTS:
      return BF16_PEAK_VARIANTS[pair]
  return next((peak for name, peak in BF16_PEAK.items() if name in words), None)


def active_matmul_params(cfg: model_lib.ModelConfig) -> int:
  """Weights one token multiplies through (top-k experts + shared expert, lm_head)."""
  D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attn = D * (N + 2 * K) * H + N * H * D
  moe = D * cfg.num_experts + (cfg.num_experts_per_tok + 1) * 3 * D * cfg.intermediate_size
  dense = 3 * D * cfg.intermediate_size_mlp
  n_moe = len(cfg.moe_layers)
  return cfg.num_layers * attn + n_moe * moe + (cfg.num_layers - n_moe) * dense + D * cfg.vocab_size


def mean_keys_per_query(seq_len: int, chunk: int | None) -> float:
  """Keys a query attends to on average under the causal (and chunked) mask."""
  q = np.arange(seq_len)
  keys = q + 1 if not chunk else q % chunk + 1
  return float(keys.mean())


def train_flops_per_token(cfg: model_lib.ModelConfig, seq_len: int) -> float:
  """6 x active weights + 3 x attention score/value FLOPs (forward + backward)."""
  attn_width = cfg.num_heads * cfg.head_dim
  attention = 0.0
  for kind in cfg.layer_kinds():
    chunk = cfg.attention_chunk_size if kind.use_rope else None
    attention += 2 * 2 * attn_width * mean_keys_per_query(seq_len, chunk)
  return 6.0 * active_matmul_params(cfg) + 3.0 * attention


def vision_forward_flops_per_tile(cfg: model_lib.ModelConfig) -> float:
  """Forward FLOPs of one tile through the vision tower and the projector."""
  v = cfg.vision
  P, W, F, A = v.grid**2, v.hidden_size, v.intermediate_size, v.projector_output_dim
  T = P + 1  # with the class token
  layer = 2 * T * (4 * W * W + 2 * W * F) + 2 * 2 * T * T * W  # projections, MLP; scores, values
  out_tokens = v.tokens_per_tile
  adapter = 2 * out_tokens * (F * A + A * A + A * cfg.hidden_size)  # adapter, projector
  return 2 * P * v.num_channels * v.patch_size**2 * W + v.num_layers * layer + adapter


def train_flops_per_row(cfg: model_lib.ModelConfig, seq_len: int, tiles_per_row: int = 0) -> float:
  """Forward + backward FLOPs of one training row: its tokens and its image tiles."""
  text = seq_len * train_flops_per_token(cfg, seq_len)
  return text + (3.0 * tiles_per_row * vision_forward_flops_per_tile(cfg) if tiles_per_row else 0)


def matmul_probe(n: int = 2048, dtype=jnp.float32):
  """(fn, FLOPs of one call): a compiled n x n matmul, for timing the device's peak."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  return (lambda: f(a)), 2 * n**3


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """Achieved FLOP/s of a large square matmul on the default device (median)."""
  fn, flops = matmul_probe(n, dtype)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn().block_until_ready()
    times.append(time.perf_counter() - start)
  return flops / float(np.median(times))


def device_peak_flops() -> tuple[float, str]:
  """(peak FLOP/s per device, how it was obtained)."""
  device = jax.devices()[0]
  peak = bf16_peak(device.device_kind) if device.platform != 'cpu' else None
  if peak:
    return peak, f'{device.device_kind} bf16 data-sheet peak'
  per_process = measure_matmul_peak()
  # Fake CPU devices share the process's cores: the machine's peak is split among them.
  return per_process / jax.local_device_count(), f'measured {device.platform} float32 matmul peak'
