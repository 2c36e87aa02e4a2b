"""Checking, saving and loading the run config (an ml_collections ConfigDict).

Config files are Python and run as code; a workdir's `config.json` is data.
"""

import json
import os
import sys
from collections.abc import Callable

import ml_collections as mlc
from absl import app, flags, logging
from etils import epath

from llama4_jax import model as model_lib
from llama4_jax import sharding

CONFIG_FILE = 'config.json'


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def model_config(config: mlc.ConfigDict) -> model_lib.ModelConfig:
  try:
    return model_lib.ModelConfig.from_dict(config.model.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from e


def validate(config: mlc.ConfigDict, num_devices: int | None = None) -> model_lib.ModelConfig:
  """Checks the values the code relies on before anything compiles; returns the ModelConfig."""
  cfg = model_config(config)

  def fail(key, msg):
    raise ConfigError(f'config.{key}: {msg}')

  for key in config.mesh:
    if key not in sharding.MESH_AXES:
      fail(f'mesh.{key}', f'unknown mesh axis; axes are {sharding.MESH_AXES}')
  if num_devices is not None:
    try:
      sharding.mesh_shape(dict(config.mesh), num_devices)
    except ValueError as e:
      fail('mesh', str(e).removeprefix('mesh: '))
  if 'train' in config:
    t = config.train
    for key in ('steps', 'batch_size', 'grad_accum_steps', 'checkpoint_every', 'log_every'):
      if t[key] <= 0:
        fail(f'train.{key}', f'must be positive, got {t[key]}')
    if t.batch_size % t.grad_accum_steps:
      fail('train.grad_accum_steps', f'{t.grad_accum_steps} does not divide train.batch_size={t.batch_size}')
  if 'data' in config:
    if config.data.seq_len <= 0:
      fail('data.seq_len', f'must be positive, got {config.data.seq_len}')
    if config.data.seq_len > cfg.max_position_embeddings:
      fail('data.seq_len', f'{config.data.seq_len} exceeds model.max_position_embeddings='
           f'{cfg.max_position_embeddings}')
  return cfg


def save(config: mlc.ConfigDict, workdir: str):
  """Writes the resolved config to <workdir>/config.json (atomically)."""
  path = epath.Path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (CONFIG_FILE + '.tmp')
  tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)


def load(workdir: str) -> mlc.ConfigDict:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path}: missing; is {workdir} a llama4_jax workdir '
                            f'(from train.py or convert_checkpoint.py)?')
  try:
    return mlc.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise ConfigError(f'{path}: not valid JSON ({e})') from e


def merge_saved_model(config: mlc.ConfigDict, saved: mlc.ConfigDict) -> mlc.ConfigDict:
  """`config` with its model section replaced by a saved run's (same keys, saved values)."""
  config = mlc.ConfigDict(config.to_dict())
  with config.unlocked():
    config.model = mlc.ConfigDict(saved.model.to_dict())
  return config


def diff_model(a: mlc.ConfigDict, b: mlc.ConfigDict) -> list[str]:
  """Names of model fields whose values differ (lists and tuples compare equal)."""
  norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  keys = sorted(set(a.model) | set(b.model))
  return [k for k in keys if norm(a.model.get(k)) != norm(b.model.get(k))]


def define_config_flag(name: str = 'config'):
  """`--config=FILE[:arg]` with `--config.a.b=value` overrides (keys locked, types checked).

  The config file is loaded while the flag is defined, so a missing or broken
  file is reported here, in one line.
  """
  from ml_collections import config_flags
  try:
    return config_flags.DEFINE_config_file(name, None, 'Config file (python; runs as code).',
                                           lock_config=True)
  except OSError as e:
    sys.exit(f'error: {" ".join(str(e).split())}')
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(f'error: the config file raised {type(e).__name__}: {e}')


USER_ERRORS = (ValueError, OSError)


def run_main(main: Callable):
  """absl app.run, but errors about the user's input print one line and exit 1."""

  def wrapped(argv):
    if not any(a.startswith(('--verbosity', '-v')) for a in sys.argv):
      logging.set_verbosity(logging.WARNING)  # Orbax logs every save and load at INFO
    try:
      return main(argv)
    except USER_ERRORS as e:
      if '--traceback' in sys.argv:
        raise
      message = ' '.join(str(e).split()) if isinstance(e, OSError) else str(e)
      print(f'error: {message}', file=sys.stderr)
      sys.exit(1)

  try:  # parse once up front: a bad --config.key=value is one line, not a traceback
    flags.FLAGS(sys.argv)
    if 'config' in flags.FLAGS:
      flags.FLAGS.config  # pylint: disable=pointless-statement  (raises if the file failed)
  except flags.Error as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip('\'"').replace('\\n', ' ').replace('\n', ' ')
    sys.exit(f'error: bad config override: {message}')
  except OSError as e:
    sys.exit(f'error: {" ".join(str(e.__cause__ or e).split())}')
  app.run(wrapped, flags_parser=lambda argv: argv[:1])
