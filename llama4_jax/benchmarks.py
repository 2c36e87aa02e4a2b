"""Benchmarks (run by scripts/benchmark.py): timings with a baseline measured in the same run.

Timings are medians over repetitions after a warm-up call; ratios compare
numbers taken in the same process, on the same machine, minutes apart.
"""

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax import model as model_lib
from llama4_jax import moe


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
  jax.block_until_ready(fn())  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


@dataclasses.dataclass
class MoERow:
  experts: int
  mode: str
  seconds: float
  dropped_fraction: float


def moe_layer_step(cfg: model_lib.ModelConfig, tokens: int, seq_len: int):
  """A jitted forward + backward of one MoE layer, and its inputs."""
  layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (tokens // seq_len, seq_len, cfg.hidden_size))

  @jax.jit
  def step(state, x):
    def loss(state, x):
      y, stats = nnx.merge(graphdef, state)(x)
      return jnp.mean(y * y), stats['dropped_fraction']
    (_, dropped), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)
    return grads, dropped

  return lambda: step(state, x)


def moe_scaling(expert_counts=(4, 16, 64), modes=('dropless', 'capacity', 'dense'),
                tokens=16384, seq_len=1024, hidden=128, expert_width=256, repeats=5,
                reference_repeats=2) -> list[MoERow]:
  """Forward + backward time of a top-1 MoE layer as E grows at fixed active parameters."""
  rows = []
  for E in expert_counts:
    for mode in modes:
      cfg = model_lib.PRESETS['tiny'].replace(
          hidden_size=hidden, intermediate_size=expert_width, num_experts=E,
          num_experts_per_tok=1, moe_dispatch=mode)
      run = moe_layer_step(cfg, tokens, seq_len)
      seconds = median_seconds(run, reference_repeats if mode == 'dense' else repeats)
      rows.append(MoERow(E, mode, seconds, float(run()[1])))
  return rows
