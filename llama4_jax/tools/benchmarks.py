"""Benchmarks (run by scripts/benchmark.py): timings with a baseline measured in the same run.

Timings are medians over repetitions after a warm-up call; ratios compare
numbers taken in the same run, on the same machine, minutes apart.
"""

import dataclasses
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax import host_memory
from llama4_jax import model as model_lib
from llama4_jax.model import moe


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


def moe_scaling(
    expert_counts=(4, 16, 64),
    modes=('dropless', 'capacity', 'dense'),
    tokens=16384,
    seq_len=1024,
    hidden=128,
    expert_width=256,
    repeats=7,
    reference_repeats=2,
) -> list[MoERow]:
  """Forward + backward time of a top-1 MoE layer as E grows at fixed active parameters.

  All layers are compiled first, then timed in turns (`alternating_medians`), so that the
  machine's drift over the minutes of a run hits every E alike; the dense reference, seconds
  per call at E = 64, takes its own fewer turns. `tokens` are rows of `seq_len`.
  """
  if tokens % seq_len:
    raise ValueError(f'--tokens={tokens}: must be a multiple of the rows of {seq_len} tokens')
  runs = {}
  for E in expert_counts:
    for mode in modes:
      cfg = model_lib.PRESETS['tiny'].replace(
          hidden_size=hidden,
          intermediate_size=expert_width,
          num_experts=E,
          num_experts_per_tok=1,
          moe_dispatch=mode,
      )
      runs[E, mode] = moe_layer_step(cfg, tokens, seq_len)
      jax.block_until_ready(runs[E, mode]())  # compile and warm up
  is_dense = lambda key: key[1] == 'dense'
  seconds = alternating_medians({k: run for k, run in runs.items() if not is_dense(k)}, repeats)
  seconds |= alternating_medians(
      {k: run for k, run in runs.items() if is_dense(k)}, reference_repeats
  )
  return [MoERow(E, mode, seconds[E, mode], float(runs[E, mode]()[1])) for E, mode in runs]


# Decoding ------------------------------------------------------------------------------

DECODE_CONFIGS = {
    # The tiny training model.
    'tiny': dict(),
    # About 95M parameters: 8 layers of width 512, MoE (8 experts) on every other layer.
    '100m': dict(
        vocab_size=8192,
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=1024,
        intermediate_size_mlp=4096,
        num_experts=8,
        moe_layers=(1, 3, 5, 7),
        no_rope_layers=(1, 1, 1, 0) * 2,
        attention_chunk_size=128,
    ),
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

  from llama4_jax.tools import hf_convert

  torch.manual_seed(0)
  hf_config = transformers.Llama4TextConfig(**hf_convert.hf_text_config(cfg))
  hf = transformers.Llama4ForCausalLM(hf_config).eval()
  hf.save_pretrained(directory)
  return hf, hf_convert.load_hf_model(directory)


def decode_speed(
    names=('tiny', '100m'), batches=(1, 8), prompt_len=128, new_tokens=128, repeats=3
) -> list[DecodeRow]:
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
    # As a server would: weights laid out for decoding once (model_lib.decode_layout).
    ours = model_lib.decode_layout(ours)
    params = model_lib.count_params(nnx.state(ours, nnx.Param))
    for batch in batches:
      prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt_len))
      run_ours = lambda: sampling.generate(
          ours, prompts.tolist(), max_new_tokens=new_tokens, eos_ids=[]
      )
      ids = torch.as_tensor(prompts)

      def run_hf():
        with torch.no_grad():
          return hf.generate(
              ids,
              attention_mask=torch.ones_like(ids),
              do_sample=False,
              max_new_tokens=new_tokens,
              min_new_tokens=new_tokens,
              eos_token_id=None,
              pad_token_id=0,
          )

      for run in (run_ours, run_hf):  # compile and warm up
        run()
      medians = alternating_medians({'ours': run_ours, 'hf': run_hf}, repeats)
      ours_s, hf_s = medians['ours'], medians['hf']
      tokens = batch * new_tokens
      rows.append(DecodeRow(name, params, batch, tokens / ours_s, tokens / hf_s, hf_s / ours_s))
  return rows


def decode_step_seconds_by_position(
    name='100m', positions=(128, 512, 1920), cache_len=2048, batch=1, repeats=20
) -> dict[int, float]:
  """Time of one jitted decode step (decode layout) at several positions of the same cache."""
  cfg = model_lib.PRESETS['tiny'].replace(max_position_embeddings=4096, **DECODE_CONFIGS[name])
  model = model_lib.decode_layout(model_lib.Llama4(cfg, rngs=nnx.Rngs(0)))
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


# Training ------------------------------------------------------------------------------

# Unrolled layers: XLA on CPU runs these 8 layers 13% faster than as a scan of
# two 4-layer blocks (10.2 s -> 8.8 s per step, measured; PERFORMANCE.md).
_80M = dict(
    vocab_size=8192,
    hidden_size=512,
    num_layers=8,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    intermediate_size=1024,
    intermediate_size_mlp=2048,
    num_experts_per_tok=1,
    moe_layers=(1, 3, 5, 7),
    no_rope_layers=(1, 1, 1, 0) * 2,
    attention_chunk_size=128,
    max_position_embeddings=4096,
    scan_layers=False,
)

# name: (model overrides of the tiny preset, batch, sequence length)
TRAIN_CONFIGS = {
    'tiny': (dict(), 16, 256),
    # About 80M parameters with 8 experts (230M with 32): 8 layers of width 512,
    # MoE with a shared expert on every other layer.
    '80m-e8': (dict(_80M, num_experts=8), 8, 512),
    '80m-e32': (dict(_80M, num_experts=32), 8, 512),
}


@dataclasses.dataclass
class TrainRow:
  config: str
  device: str
  params: int
  active_params: int
  tokens_per_step: int
  ours_step_seconds: float
  ours_tokens_per_sec: float
  ours_mfu: float
  ours_step_memory_mib: float
  transformers_step_seconds: float | None
  transformers_tokens_per_sec: float | None
  transformers_mfu: float | None
  transformers_step_memory_mib: float | None
  ratio: float | None
  peak_flops: float
  peak_source: str
  ours_breakdown: dict[str, float] | None = None  # seconds per part of the step
  ours_breakdown_matmul_gflop: dict[str, float] | None = None  # matmul GFLOP each part ran
  maxtext_step_seconds: float | None = None  # with maxtext_python (maxtext_baseline.py)
  maxtext_mfu: float | None = None
  maxtext_ratio: float | None = None  # MaxText's step time over ours


def _rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def step_memory_bytes(fn: Callable[[], object]) -> int:
  """Peak resident memory above the live state while fn runs (sampled every 2 ms).

  Freed heap pages are handed back first, so what was resident before fn is
  what it keeps alive (parameters, optimizer state); the rest is the step's.
  """
  host_memory.release_freed_memory()
  before, peak, running = _rss_bytes(), [0], [True]

  def sample():
    while running[0]:
      peak[0] = max(peak[0], _rss_bytes())
      time.sleep(0.002)

  thread = threading.Thread(target=sample)
  thread.start()
  try:
    jax.block_until_ready(fn())
  finally:
    running[0] = False
    thread.join()
  return max(peak[0] - before, 0)


def ours_train_step(name: str, dtype: str):
  """llama4_jax's jitted train step (forward, backward, AdamW) on one device, and its batch."""
  import numpy as np

  from llama4_jax import config_lib, sharding, trainer

  overrides, batch, seq_len = TRAIN_CONFIGS[name]
  config = config_lib.base_config()
  config.model.update(dict(overrides, dtype=dtype))
  config.mesh.fsdp = 1
  config.train.batch_size = batch
  config.data.seq_len = seq_len
  setup = trainer.make_setup(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  state = [trainer.init_state(setup, 0)]
  train, _ = trainer.compile_steps(setup)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, setup.cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
  data = jax.device_put(
      {
          'inputs': tokens[:, :-1],
          'targets': tokens[:, 1:],
          'segment_ids': np.ones((batch, seq_len), np.int32),
          'weights': np.ones((batch, seq_len), np.float32),
      },
      setup.batch_sharding,
  )

  def step():
    state[0], metrics = train(state[0], data)
    return metrics['loss']

  compiled_text = lambda: train.lower(state[0], data).compile().as_text()
  return setup.cfg, step, tokens, compiled_text


def transformers_train_step(hf_config: dict[str, Any], tokens):
  """transformers' Llama4ForCausalLM: loss, backward and torch AdamW, in float32 on CPU."""
  import torch
  import transformers

  torch.manual_seed(0)
  hf = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**hf_config)).train()
  optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  ids = torch.as_tensor(tokens, dtype=torch.long)

  def step():
    loss = hf(input_ids=ids[:, :-1], labels=ids[:, :-1].clone()).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()

  return step


def _transformers_worker(connection, hf_config, tokens, keep_freed_memory: bool):
  """The child's loop: 'step' runs one train step, 'memory' measures one; 'stop' ends it."""
  if keep_freed_memory:
    host_memory.keep_freed_memory()  # before PyTorch starts its threads
  step = transformers_train_step(hf_config, tokens)
  for request in iter(connection.recv, 'stop'):
    try:
      connection.send(step() if request == 'step' else step_memory_bytes(step))
    except Exception as e:  # pylint: disable=broad-except  (raised again in the parent)
      connection.send(e)


class TransformersProcess:
  """transformers' train step in a process of its own, run step by step from this one.

  In one process the two frameworks' allocations share glibc's heap. With freed memory kept
  (`host_memory`), `benchmark.py train` reached 23 GB resident and ours' step gained nothing
  (PERFORMANCE.md, change 9): one's freed blocks did not fit the other's next step. The child
  runs as transformers does out of the box, or keeps freed memory too (`keep_freed_memory`).
  """

  def __init__(self, cfg: model_lib.ModelConfig, tokens, keep_freed_memory: bool = False):
    import multiprocessing

    from llama4_jax.tools import hf_convert

    context = multiprocessing.get_context('spawn')  # a fresh interpreter: its own heap
    self._connection, child_connection = context.Pipe()
    self._process = context.Process(
        target=_transformers_worker,
        args=(
            child_connection,
            hf_convert.hf_text_config(cfg),
            tokens,
            keep_freed_memory,
        ),
        daemon=True,
    )
    self._process.start()
    child_connection.close()

  def _ask(self, request: str):
    self._connection.send(request)
    reply = self._connection.recv()
    if isinstance(reply, Exception):
      raise reply
    return reply

  def step(self) -> float:
    return self._ask('step')

  def step_memory_bytes(self) -> int:
    return self._ask('memory')

  def close(self):
    self._connection.send('stop')
    self._process.join()


def alternating_times(fns: dict[Any, Callable[[], object]], repeats: int) -> dict[Any, list[float]]:
  """Seconds of each fn's calls, run in turns so that machine noise hits all alike."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return times


def alternating_medians(fns: dict[Any, Callable[[], object]], repeats: int) -> dict[Any, float]:
  """Median seconds of each fn, run in turns (`alternating_times`)."""
  return {name: statistics.median(t) for name, t in alternating_times(fns, repeats).items()}


def train_speed(
    names=('tiny', '80m-e8', '80m-e32'),
    repeats=3,
    with_transformers: bool = True,
    profile: bool = False,
    transformers_keeps_freed_memory: bool = False,
    maxtext_python: str | None = None,
) -> list[TrainRow]:
  """Step time, tokens/s, MFU and step memory of both implementations.

  On CPU both run in float32, one after the other: ours' steps, then transformers' in a process
  of its own (`TransformersProcess`), each timed in turns with a matmul peak probe. This process
  keeps its freed memory for its next step when `benchmark.py` runs it (`host_memory`), and
  transformers' does with `transformers_keeps_freed_memory`; then at 80m-e32 the two would not
  fit a 24 GB machine at once, so ours' is handed back before transformers starts. The peak is
  the probe's median over both. On an accelerator ours computes in bfloat16
  against the data-sheet peak, and transformers is left out. MFU counts model FLOPs
  (flops.train_flops_per_token: active parameters, attention under its masks). With `profile`,
  each row also gets ours' seconds per part of the step and the matmul FLOPs each part ran
  (profiling.step_breakdown). With `maxtext_python`, MaxText's step on the same shapes runs
  last, in that interpreter (`maxtext_baseline`). A config whose layer pattern MaxText's llama4
  decoder cannot express, or whose MaxText run fails, has no MaxText time; the error is printed.
  """
  from llama4_jax import flops
  from llama4_jax.tools import maxtext_baseline, profiling

  on_cpu = jax.default_backend() == 'cpu'
  if maxtext_python and not on_cpu:
    raise ValueError(
        f"--maxtext_python: MaxText's step is timed on the CPU, in float32, as ours is there; "
        f'this run is on {jax.default_backend()}'
    )
  peak_probe = {}
  if on_cpu:
    probe, probe_flops = flops.matmul_probe()
    peak_probe = {'peak': lambda: [probe() for _ in range(5)]}
  rows = []
  for name in names:
    cfg, ours, tokens, compiled_text = ours_train_step(name, 'float32' if on_cpu else 'bfloat16')
    jax.block_until_ready(ours())  # compile and warm up
    memory = {'ours': step_memory_bytes(ours) / 2**20}
    times = alternating_times({'ours': ours, **peak_probe}, repeats)
    breakdown = matmul_gflop = None
    if profile:
      breakdown, matmul_flops = profiling.step_breakdown(ours, compiled_text())
      matmul_gflop = {part: f / 1e9 for part, f in matmul_flops.items()}
    if with_transformers and on_cpu:
      host_memory.release_freed_memory()  # ours' kept memory, before transformers' grows
      hf = TransformersProcess(cfg, tokens, transformers_keeps_freed_memory)
      try:
        memory['hf'] = hf.step_memory_bytes() / 2**20  # also its warm-up
        hf_times = alternating_times({'hf': hf.step, **peak_probe}, repeats)
      finally:
        hf.close()
      times['hf'] = hf_times['hf']
      times['peak'] += hf_times['peak']
    medians = {key: statistics.median(t) for key, t in times.items()}
    maxtext_s = None
    if maxtext_python:
      try:
        flags = maxtext_baseline.maxtext_flags(cfg, tokens.shape[0], tokens.shape[1] - 1)
        host_memory.release_freed_memory()
        maxtext_s = statistics.median(
            maxtext_baseline.train_step_seconds(maxtext_python, flags, repeats)
        )
      except (ValueError, RuntimeError) as e:  # the other rows are still worth reporting
        print(f'{name}: no MaxText step: {e}')
    if on_cpu:
      peak = 5 * probe_flops / medians['peak']
      peak_source = 'float32 matmul peak, measured in turns with each step'
    else:
      peak, peak_source = flops.device_peak_flops()
    tokens_per_step = tokens.shape[0] * (tokens.shape[1] - 1)
    step_flops = flops.train_flops_per_token(cfg, tokens.shape[1] - 1) * tokens_per_step
    hf_s = medians.get('hf')
    total = model_lib.count_params(nnx.state(model_lib.abstract_model(cfg), nnx.Param))
    rows.append(
        TrainRow(
            name,
            jax.devices()[0].device_kind,
            total,
            flops.active_matmul_params(cfg),
            tokens_per_step,
            medians['ours'],
            tokens_per_step / medians['ours'],
            step_flops / medians['ours'] / peak,
            memory['ours'],
            hf_s,
            tokens_per_step / hf_s if hf_s else None,
            step_flops / hf_s / peak if hf_s else None,
            memory.get('hf'),
            hf_s / medians['ours'] if hf_s else None,
            peak,
            peak_source,
            breakdown,
            matmul_gflop,
            maxtext_s,
            step_flops / maxtext_s / peak if maxtext_s else None,
            maxtext_s / medians['ours'] if maxtext_s else None,
        )
    )
  return rows
