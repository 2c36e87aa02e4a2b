"""Runs many command lines of scripts/*.py, each in its own process (test-only).

  python tests/cli_runner.py CASES.json RESULTS.json

CASES.json holds a list of [script, arg, ...] lists (script relative to scripts/);
RESULTS.json gets one {"status": int, "output": str} per case. This interpreter
imports jax and the project once (seconds); each case then runs in a fork of it
(milliseconds) exactly as `python scripts/SCRIPT ARGS...` would: the script runs
as __main__, absl parses the flags, and the exit status and output are the
command's. JAX starts its backends lazily, so none exists when we fork (a fork
must not inherit them); each case starts its own.
"""

import importlib
import json
import os
import runpy
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds per case
# What the scripts import, loaded once so that each fork starts with it.
PRELOAD = (
    'jax',
    'llama4_jax.config_lib',
    'llama4_jax.evaluation',
    'llama4_jax.tools.hf_convert',
    'llama4_jax.sampling',
    'llama4_jax.trainer',
    'llama4_jax.workdir',
)


def run_in_child(script: str, args: list[str]):
  """The child's whole life: the script as __main__, then the exit status Python would give."""
  sys.argv = [script, *args]
  try:
    runpy.run_path(script, run_name='__main__')
    status = 0
  except SystemExit as e:  # as the interpreter treats it: None, a number, or a message
    if e.code is None or isinstance(e.code, int):
      status = e.code or 0
    else:
      print(e.code, file=sys.stderr)
      status = 1
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    status = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # no atexit handlers or thread joins inherited from the parent


def run_case(script: str, args: list[str]) -> dict:
  with tempfile.TemporaryFile() as out:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      os.dup2(out.fileno(), 1)
      os.dup2(out.fileno(), 2)
      run_in_child(script, args)
    deadline = time.monotonic() + TIMEOUT
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
      if time.monotonic() > deadline:
        os.kill(pid, 9)
        done = os.waitpid(pid, 0)
        break
      time.sleep(0.01)
    out.seek(0)
    return {
        'status': os.waitstatus_to_exitcode(done[1]),
        'output': out.read().decode(errors='replace'),
    }


def main():
  cases_file, results_file = sys.argv[1:]
  sys.path.insert(0, REPO)
  for module in PRELOAD:
    importlib.import_module(module)
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  assert not xla_bridge.backends_are_initialized(), 'a forked child would inherit the backend'
  os.chdir(REPO)  # config paths like configs/tiny.py are relative to the repository
  with open(cases_file) as f:
    cases = json.load(f)
  results = [run_case(os.path.join(REPO, 'scripts', script), args) for script, *args in cases]
  with open(results_file, 'w') as f:
    json.dump(results, f)


if __name__ == '__main__':
  main()
