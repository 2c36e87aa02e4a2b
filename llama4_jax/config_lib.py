"""Checking, saving and loading the run config (an ml_collections ConfigDict).

Config files are Python and run as code; a workdir's `config.json` is data.
"""

import difflib
import json
import logging as py_logging
import os
import sys
from collections.abc import Callable

import ml_collections as mlc
from absl import app, flags, logging
from etils import epath

from llama4_jax import model as model_lib
from llama4_jax import optim
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
    if t.get('freeze', '') not in optim.FREEZE_OPTIONS:
      fail('train.freeze', f'{t.freeze!r} is not one of {optim.FREEZE_OPTIONS}')
    if t.get('freeze') and cfg.vision is None:
      fail('train.freeze', f'{t.freeze!r} needs a model with a vision tower (model.vision)')
  if 'data' in config:
    if config.data.seq_len <= 0:
      fail('data.seq_len', f'must be positive, got {config.data.seq_len}')
    if config.data.seq_len > cfg.max_position_embeddings:
      fail('data.seq_len', f'{config.data.seq_len} exceeds model.max_position_embeddings='
           f'{cfg.max_position_embeddings}')
    modality = config.data.get('modality', 'text')
    if modality not in ('text', 'image_text'):
      fail('data.modality', f'{modality!r} is not "text" or "image_text"')
    if modality == 'image_text' and cfg.vision is None:
      fail('data.modality', '"image_text" needs a model with a vision tower (model.vision)')
  return cfg


def _accepts(old, value) -> bool:
  """Whether `value` may replace `old`, by the rules of a `--config.key=value` flag."""
  if isinstance(old, bool) or isinstance(value, bool):  # bool is an int in Python; not here
    return isinstance(old, bool) and isinstance(value, bool)
  if isinstance(old, float):
    return isinstance(value, (int, float))
  if isinstance(old, (tuple, list)):
    return isinstance(value, (tuple, list))
  return old is None or isinstance(value, type(old))


def _parent(config: mlc.ConfigDict, key: str) -> mlc.ConfigDict:
  """The section that holds dotted `key`; a ConfigError names the first missing part."""
  parts = key.split('.')
  node = config
  for depth, part in enumerate(parts):
    if not isinstance(node, mlc.ConfigDict) or part not in node:
      known = list(node) if isinstance(node, mlc.ConfigDict) else []
      close = difflib.get_close_matches(part, known)
      hint = f'; did you mean {".".join(parts[:depth] + close[:1])}?' if close else ''
      raise ConfigError(f'config.{key}: no such key{hint}')
    parent, node = node, node[part]
  return parent


def set_override(config: mlc.ConfigDict, key: str, value):
  """Sets dotted `key` of `config` to `value`, checked as a `--config.key=value` flag is.

  An unknown key, a section, or a value of another type is a ConfigError naming
  the key (ConfigDict alone would let a bool into an int field, or None anywhere).
  """
  parent, leaf = _parent(config, key), key.split('.')[-1]
  old = parent[leaf]
  if isinstance(old, mlc.ConfigDict):
    raise ConfigError(f'config.{key}: is a section; override its keys one by one')
  if not _accepts(old, value):
    raise ConfigError(f'config.{key}: expects {type(old).__name__} (like {old!r}), got '
                      f'{type(value).__name__} {value!r}')
  if isinstance(old, float):
    value = float(value)
  elif isinstance(old, (tuple, list)):
    value = type(old)(value)
  with parent.ignore_type():  # checked above, by the flag's rules
    parent[leaf] = value


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
# run_main reads it from sys.argv (it must work before the flags parse); defined so absl accepts it.
flags.DEFINE_bool('traceback', False, 'On an error, raise it with its traceback instead of one line.')


def _drop_library_tracebacks(record) -> bool:
  """A logging filter: Orbax's and asyncio's error logs without their tracebacks.

  A failed checkpoint write (a full disk) is logged with a traceback by each of
  Orbax's background threads; the run then stops with one line that names the
  step and the cause. `--traceback` keeps them.
  """
  if record.name == 'asyncio' or f'{os.sep}orbax{os.sep}' in record.pathname:
    record.exc_info = record.exc_text = None
  return True


def _drop_abandoned_io_errors(unraisable):
  """sys.unraisablehook: after a failed save or restore, Orbax abandons its other
  reads and writes, and each is reported when collected (a coroutine that never
  finished, a write completing into a closed event loop) with a long traceback."""
  code = getattr(unraisable.object, 'cr_code', None)
  abandoned = code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename
  closed_loop = (isinstance(unraisable.exc_value, RuntimeError)
                 and str(unraisable.exc_value) == 'Event loop is closed')
  if not (abandoned or closed_loop):
    sys.__unraisablehook__(unraisable)


def _flag_error(e: Exception) -> str:
  """A flag error in one line. ml_collections puts the traceback of a config file that
  raised into the message: keep its last line, the config file's own error."""
  text = str(e)
  if 'Traceback (most recent call last)' in text:
    flag = text.split(':', 1)[0]  # flag --config=PATH
    return f'{flag}: the config file raised {text.strip().splitlines()[-1]}'
  return ' '.join(text.split())


def run_main(main: Callable):
  """absl app.run, but errors about the user's input print one line and exit 1."""

  def wrapped(argv):
    if not any(a.startswith(('--verbosity', '-v')) for a in sys.argv):
      logging.set_verbosity(logging.WARNING)  # Orbax logs every save and load at INFO
    if '--traceback' not in sys.argv:
      for name in ('absl', 'asyncio'):  # Orbax logs through absl's logger
        py_logging.getLogger(name).addFilter(_drop_library_tracebacks)
      sys.unraisablehook = _drop_abandoned_io_errors
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
    sys.exit(f'error: {_flag_error(e)}')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip('\'"').replace('\\n', ' ').replace('\n', ' ')
    sys.exit(f'error: bad config override: {message}')
  except OSError as e:
    sys.exit(f'error: {" ".join(str(e.__cause__ or e).split())}')
  app.run(wrapped, flags_parser=lambda argv: argv[:1])
