"""The scripts' command line: `--config` files with checked overrides, one-line errors.

Every script runs its `main` through `run_main`: an error about the user's input (a config
key, a file, a value) prints one line naming it and exits 1; `--traceback` shows the
traceback instead.
"""

import glob
import importlib.util
import logging as py_logging
import os
import sys
from collections.abc import Callable

import jax
from absl import app, flags, logging

from llama4_jax import host_memory


def define_config_flag(name: str = 'config'):
  """`--config=FILE[:arg]` with `--config.a.b=value` overrides (keys locked, types checked).

  The config file is loaded while the flag is defined, so a missing or broken
  file is reported here, in one line.
  """
  from ml_collections import config_flags

  try:
    return config_flags.DEFINE_config_file(
        name, None, 'Config file (python; runs as code).', lock_config=True
    )
  except OSError as e:
    sys.exit(f'error: {" ".join(str(e).split())}')
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(f'error: the config file raised {type(e).__name__}: {e}')


USER_ERRORS = (ValueError, OSError)


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
  closed_loop = (
      isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == 'Event loop is closed'
  )
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


def _accelerators() -> dict[str, tuple[bool, bool]]:
  """{backend: (its library installed, its devices present)} for the TPU and CUDA backends."""
  return {
      'tpu': (
          _installed('libtpu'),
          bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')),  # a TPU VM's chips
      ),
      'cuda': (
          _installed('jax_plugins.xla_cuda12') or _installed('jax_plugins.xla_cuda13'),
          bool(glob.glob('/dev/nvidia[0-9]*')),
      ),
  }


def _skip_absent_accelerators():
  """Leaves out the TPU and CUDA backends whose library is installed but whose devices are absent.

  libtpu and the CUDA plugin may be installed for the fit check's compilers alone
  (requirements-compile.txt); JAX would still try their backends first and print their start-up
  errors (the CUDA plugin: a traceback, "Unable to load cuDNN"). JAX_PLATFORMS, when set, decides.
  """
  if os.environ.get('JAX_PLATFORMS'):
    return
  backends = _accelerators()
  if all(present for installed, present in backends.values() if installed):
    return
  usable = [name for name, (installed, present) in backends.items() if installed and present]
  jax.config.update('jax_platforms', ','.join([*usable, 'cpu']))


def _on_cpu_alone() -> bool:
  """Whether JAX will run on the CPU alone: JAX_PLATFORMS, or the choice above, says so; or no
  accelerator's library is installed."""
  if jax.config.jax_platforms:
    return set(jax.config.jax_platforms.split(',')) == {'cpu'}
  return not any(installed for installed, _ in _accelerators().values())


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ImportError:  # its parent package is not installed
    return False


def run_main(main: Callable, *, repeats_steps: bool = False):
  """absl app.run, but errors about the user's input print one line and exit 1.

  A script that runs a jitted step over and over (`repeats_steps`: training, evaluation,
  generation) keeps freed host memory for the next step when it runs on the CPU alone
  (`host_memory.keep_freed_memory`).
  """
  _skip_absent_accelerators()
  if repeats_steps and _on_cpu_alone():  # before JAX's backend starts its threads
    host_memory.keep_freed_memory()

  def wrapped(argv):
    if not any(a.startswith(('--verbosity', '-v')) for a in sys.argv):
      logging.set_verbosity(logging.WARNING)  # Orbax logs every save and load at INFO
    if not flags.FLAGS.traceback:  # parsed below, before app.run calls this
      for name in ('absl', 'asyncio'):  # Orbax logs through absl's logger
        py_logging.getLogger(name).addFilter(_drop_library_tracebacks)
      sys.unraisablehook = _drop_abandoned_io_errors
    try:
      return main(argv)
    except USER_ERRORS as e:
      if flags.FLAGS.traceback:
        raise
      message = ' '.join(str(e).split()) if isinstance(e, OSError) else str(e)
      print(f'error: {message}', file=sys.stderr)
      sys.exit(1)

  if 'traceback' not in flags.FLAGS:
    flags.DEFINE_bool('traceback', False, 'On an error, raise it with its traceback, not one line.')
  app.define_help_flags()  # --help, --helpfull: defined by app.run, needed by the parse below
  try:  # parse once up front: a bad --config.key=value is one line, not a traceback
    argv = flags.FLAGS(sys.argv)
    if 'config' in flags.FLAGS:
      _ = flags.FLAGS.config  # raises if the file failed to load
  except flags.Error as e:
    sys.exit(f'error: {_flag_error(e)}')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip('\'"').replace('\\n', ' ').replace('\n', ' ')
    sys.exit(f'error: bad config override: {message}')
  except OSError as e:
    sys.exit(f'error: {" ".join(str(e.__cause__ or e).split())}')
  app.run(wrapped, flags_parser=lambda _: argv)
