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


# Decoding ------------------------------------------------------------------------------

DECODE_CONFIGS = {
    # The tiny training model.
    'tiny': dict(),
    # About 95M parameters: 8 layers of width 512, MoE (8 experts) on every other layer.
    '100m': dict(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
                 head_dim=64, intermediate_size=1024, intermediate_size_mlp=4096, num_experts=8,
                 moe_layers=(1, 3, 5, 7), no_rope_layers=(1, 1, 1, 0) * 2,
                 attention_chunk_size=128),
}


@dataclasses.dataclass
class DecodeRow:
  config: str
  params: int
  batch: int
  ours_tokens_per_sec: float
  transformers_tokens_per_sec: float
  ratio: float


def hf_and_ours(cfg: model_lib.ModelConfig, directory: str):
  """A random transformers Llama4ForCausalLM and the same model converted to ours."""
  import torch  # pylint: disable=g-import-not-at-top  (benchmark-only dependency)
  import transformers
  from llama4_jax import hf_convert
  torch.manual_seed(0)
  hf_config = transformers.Llama4TextConfig(**hf_convert.hf_text_config(cfg))
  hf = transformers.Llama4ForCausalLM(hf_config).eval()
  hf.save_pretrained(directory)
  return hf, hf_convert.load_hf_model(directory)


def decode_speed(names=('tiny', '100m'), batches=(1, 8), prompt_len=128, new_tokens=128,
                 repeats=3) -> list[DecodeRow]:
  """Decode tokens/s of sampling.generate and of transformers' generate, same model and inputs."""
  import tempfile
  import numpy as np
  import torch
  from llama4_jax import sampling
  rows = []
  for name in names:
    cfg = model_lib.PRESETS['tiny'].replace(max_position_embeddings=4096, **DECODE_CONFIGS[name])
    with tempfile.TemporaryDirectory() as directory:
      hf, ours = hf_and_ours(cfg, directory)
    params = model_lib.count_params(nnx.state(ours, nnx.Param))
    for batch in batches:
      prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt_len))
      run_ours = lambda: sampling.generate(ours, prompts.tolist(), max_new_tokens=new_tokens,
                                           eos_ids=[])
      ids = torch.as_tensor(prompts)

      def run_hf():
        with torch.no_grad():
          return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             eos_token_id=None, pad_token_id=0)

      ours_s = median_seconds(run_ours, repeats)
      hf_s = median_seconds(run_hf, repeats)
      tokens = batch * new_tokens
      rows.append(DecodeRow(name, params, batch, tokens / ours_s, tokens / hf_s, hf_s / ours_s))
  return rows


def decode_step_seconds_by_position(name='100m', positions=(128, 512, 1920), cache_len=2048,
                                    batch=1, repeats=20) -> dict[int, float]:
  """Time of one jitted decode step at several positions of the same cache."""
  cfg = model_lib.PRESETS['tiny'].replace(max_position_embeddings=4096, **DECODE_CONFIGS[name])
  model = model_lib.Llama4(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, token, cache):
    return nnx.merge(graphdef, state).decode(token, cache)

  token = jnp.ones((batch, 1), jnp.int32)
  out = {}
  for position in positions:
    cache = model.init_cache(batch, cache_len)
    cache['index'] = jnp.int32(position)
    cache['segment_ids'] = jnp.ones_like(cache['segment_ids'])
    out[position] = median_seconds(lambda: step(state, token, cache), repeats)
  return out
