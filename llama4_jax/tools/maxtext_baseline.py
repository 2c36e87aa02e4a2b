"""MaxText's train step on the same shapes: a second baseline for `benchmark.py train`.

MaxText is no dependency of this project: it wants Python 3.12 and its own JAX. The
`--maxtext_python` flag names the interpreter of an environment where it is importable
(`import maxtext`); its pre-training module then runs there, in a process of its own, on
synthetic data, and its own log gives each step's time.

The model is ours in MaxText's keys (`maxtext_flags`), as far as the step's cost goes: the
`llama4-17b-128e` decoder with our widths, heads, experts, vocabulary and chunk. That decoder
fixes the layer pattern to a period (NoPE every `nope_layer_interval`-th layer, MoE every
`interleave_moe_layer_step`-th), so only configs with such a pattern have a MaxText row. Its
RoPE scaling and temperature-tuning constants stay MaxText's (the same work), and it always
routes dropless. The settings are MaxText's fastest on a CPU that were measured here
(PERFORMANCE.md): float32, the XLA attention, every named activation kept
(`remat_policy=minimal_with_context`), layers unrolled as ours are (`scan_layers=false`), and
the MoE through `jax.lax.ragged_dot` (`megablox=false`: the Pallas kernel is TPU-only).
"""

import os
import re
import subprocess
import tempfile

# Settings of every run: what makes the step comparable (float32, synthetic data, no
# checkpoints) and MaxText's fastest CPU setting (module docstring).
SETTINGS = (
    'model_name=llama4-17b-128e',
    'override_model_config=true',
    'hardware=cpu',
    'skip_jax_distributed_system=true',  # one process, no coordinator
    'enable_checkpointing=false',
    'dataset_type=synthetic',
    'dtype=float32',
    'weight_dtype=float32',
    'attention=dot_product',
    'remat_policy=minimal_with_context',
    'scan_layers=false',
    'megablox=false',
    'log_period=1',
)
# MaxText's logged step times lag its steps: each is the time between two dispatches, and its
# metrics wait for the step before. The first three hold the compile and the first execution.
FIRST_TIMED_STEP = 3
_STEP_LINE = re.compile(r'completed step: (\d+), seconds: ([0-9.]+)')


def _interval(layers: tuple[int, ...], num_layers: int, key: str) -> int:
  """p such that `layers` are exactly the layers i with (i + 1) % p == 0; -1 for none."""
  if not layers:
    return -1
  for p in range(1, num_layers + 1):
    if {i for i in range(num_layers) if (i + 1) % p == 0} == set(layers):
      return p
  raise ValueError(f"{key}: MaxText's llama4 decoder puts them on every p-th layer only")


def maxtext_flags(cfg, batch: int, seq_len: int) -> list[str]:
  """Our model config `cfg` (one device, `batch` x `seq_len` tokens) in MaxText's keys."""
  L = cfg.num_layers
  nope = tuple(i for i, uses_rope in enumerate(cfg.no_rope_layers) if not uses_rope)
  return [
      *SETTINGS,
      f'per_device_batch_size={batch}',
      f'max_target_length={seq_len}',
      f'base_emb_dim={cfg.hidden_size}',
      f'base_num_decoder_layers={L}',
      f'base_num_query_heads={cfg.num_heads}',
      f'base_num_kv_heads={cfg.num_kv_heads}',
      f'head_dim={cfg.head_dim}',
      f'base_mlp_dim={cfg.intermediate_size_mlp}',
      f'base_moe_mlp_dim={cfg.intermediate_size}',
      f'num_experts={cfg.num_experts}',
      f'num_experts_per_tok={cfg.num_experts_per_tok}',
      f'vocab_size={cfg.vocab_size}',
      # MaxText chunks every RoPE layer; a chunk of the whole sequence is none.
      f'chunk_attn_window_size={cfg.attention_chunk_size or seq_len}',
      f'nope_layer_interval={_interval(nope, L, f"no_rope_layers={cfg.no_rope_layers}")}',
      f'interleave_moe_layer_step={_interval(cfg.moe_layers, L, f"moe_layers={cfg.moe_layers}")}',
      f'use_qk_norm={str(cfg.use_qk_norm).lower()}',
      f'temperature_tuning={str(cfg.attn_temperature_tuning).lower()}',
      f'rope_max_timescale={int(cfg.rope_theta)}',
      f'normalization_layer_epsilon={cfg.rms_norm_eps}',
  ]


def step_seconds(log: str) -> dict[int, float]:
  """{step: seconds} of MaxText's 'completed step: N, seconds: S' log lines."""
  return {int(step): float(seconds) for step, seconds in _STEP_LINE.findall(log)}


def train_step_seconds(python: str, flags: list[str], repeats: int) -> list[float]:
  """The times of `repeats` MaxText train steps of the model `flags` (`maxtext_flags`) says,
  after its compile and first two steps."""
  find_configs = 'import maxtext, os; print(os.path.dirname(maxtext.__file__))'
  found = subprocess.run([python, '-c', find_configs], capture_output=True, text=True)
  if found.returncode:
    raise RuntimeError(
        f'--maxtext_python={python}: cannot import maxtext there: {found.stderr.strip()[-500:]}'
    )
  base_yml = os.path.join(found.stdout.strip(), 'configs', 'base.yml')
  steps = FIRST_TIMED_STEP + repeats
  with tempfile.TemporaryDirectory() as output:
    command = [
        python,
        '-m',
        'maxtext.trainers.pre_train.train',
        base_yml,
        'run_name=llama4_jax_baseline',
        f'base_output_directory={output}',
        f'steps={steps}',
        *flags,
    ]
    environment = dict(os.environ, JAX_PLATFORMS='cpu', DECOUPLE_GCLOUD='TRUE')
    run = subprocess.run(command, capture_output=True, text=True, env=environment)
  log = run.stdout + run.stderr
  seconds = step_seconds(log)
  timed = [seconds[s] for s in range(FIRST_TIMED_STEP, steps) if s in seconds]
  if run.returncode or len(timed) != repeats:
    raise RuntimeError(
        f'MaxText exited with {run.returncode} having logged {len(seconds)} of {steps} steps: '
        f'{log[-2000:]}'
    )
  return timed
