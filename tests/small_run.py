"""A very small training run for tests: its config, flags and launch helpers."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from llama4_jax import checkpoint

import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = {
    'model.vocab_size': 512,
    'model.hidden_size': 64,
    'model.num_heads': 4,
    'model.num_kv_heads': 2,
    'model.head_dim': 16,
    'model.intermediate_size': 64,
    'model.intermediate_size_mlp': 128,
    'model.attention_chunk_size': 16,
    'data.seq_len': 64,
    'data.builtin_max_bytes': 300_000,
    'data.tokenizer_train_bytes': 300_000,
    'train.batch_size': 8,
    'train.steps': 6,
    'train.log_every': 1,
    'train.checkpoint_every': 2,
    'train.eval_every': 0,
    'train.sample_tokens': 0,
    'eval.batch_size': 8,
    'eval.max_batches': 2,
    'optim.warmup_steps': 2,
}


def flag_list(**overrides) -> list[str]:
  values = {**SMALL, **{k.replace('__', '.'): v for k, v in overrides.items()}}
  return ['--config=configs/tiny.py'] + [f'--config.{k}={v}' for k, v in values.items()]


def config(**overrides):
  args = ['prog', *flag_list(**overrides)]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, lock_config=True, sys_argv=args)
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    values(args)
    return values.config
  finally:
    os.chdir(cwd)


def train_command(workdir, **overrides) -> list[str]:
  return [
      sys.executable,
      os.path.join(REPO, 'scripts', 'train.py'),
      f'--workdir={workdir}',
      *flag_list(**overrides),
  ]


# Compiled programs are reused across the many short runs of the tests.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(REPO, '.pytest_cache', 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')


def script_env(devices: int = 1) -> dict[str, str]:
  """The environment of a script run by a test: `devices` fake CPU devices.

  One by default: a script test checks what the script does, and on 8 devices a short run
  takes twice as long on this 2-core machine. Sharding and expert parallelism are tested on 8
  devices in process (trainer_test.py, moe_test.py, model_test.py) and by the scripts' tests
  that ask for them.
  """
  return dict(os.environ, XLA_FLAGS=xla_env.xla_flags(devices))


def run_script(name, *args, devices: int = 1) -> subprocess.CompletedProcess:
  """scripts/<name> with args, from the repo root."""
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', name), *args],
      capture_output=True,
      text=True,
      cwd=REPO,
      env=script_env(devices),
  )


def run_scripts(tmp_path, cases: list[list[str]], devices: int = 1) -> list[dict]:
  """Runs command lines [script, arg, ...] one after another in one tests/cli_runner.py (one
  import of jax for all); returns their {"status", "output"}."""
  cases_file, results_file = tmp_path / 'cases.json', tmp_path / 'results.json'
  cases_file.write_text(json.dumps(cases))
  subprocess.run(
      [sys.executable, os.path.join(REPO, 'tests', 'cli_runner.py'), cases_file, results_file],
      check=True,
      cwd=REPO,
      env=script_env(devices),
  )
  return json.loads(results_file.read_text())


def run_train(workdir, devices: int = 1, **overrides) -> subprocess.CompletedProcess:
  return subprocess.run(
      train_command(workdir, **overrides),
      cwd=REPO,
      capture_output=True,
      text=True,
      env=script_env(devices),
  )


def saved_params(workdir, step) -> dict[str, np.ndarray]:
  """The parameters of a run's checkpoint at `step`, on the host (one Orbax load)."""
  path = checkpoint.step_path(str(workdir), step)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {
      name: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=device)
      for name, meta in checkpoint.param_names(path).items()
  }
  return jax.device_get(checkpoint.load_params(path, abstract))


def assert_same_params(expected: dict, got: dict):
  """Bit-equal parameters, name by name."""
  assert sorted(expected) == sorted(got)
  for name in expected:
    assert np.array_equal(expected[name], got[name]), name
