"""Freed host memory is kept for the next step on CPU, where the scripts that repeat steps ask."""

import os
import subprocess
import sys
import types

import pytest

from llama4_jax import cli, host_memory

# malloc, fill and free 64 MB four times on a thread of its own (as XLA runs a step), in a fresh
# process; prints the page faults of each round.
ROUNDS = """
import ctypes, resource, sys, threading
from llama4_jax import host_memory
if sys.argv[1] == 'keep':
  assert host_memory.keep_freed_memory()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2**20
faults = []
def rounds():
  for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = libc.malloc(size)
    ctypes.memset(buffer, 1, size)
    libc.free(buffer)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(*faults)
"""


def page_faults(mode: str) -> list[int]:
  result = subprocess.run([sys.executable, '-c', ROUNDS, mode], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  return [int(n) for n in result.stdout.split()]


@pytest.mark.skipif(host_memory._glibc() is None, reason='glibc malloc only')
def test_kept_memory_spares_each_round_its_page_faults():
  pages = 64 * 2**20 // os.sysconf('SC_PAGE_SIZE')
  assert min(page_faults('default')) > pages * 0.9  # mmap: fresh pages every time
  first, *later = page_faults('keep')
  assert first > pages * 0.9 and max(later) < pages // 100  # the heap's pages, reused


@pytest.mark.parametrize(
    'platforms, installed, repeats_steps, kept',
    [
        ('cpu', set(), True, True),
        (None, set(), True, True),  # nothing else installed: JAX runs on the CPU
        ('cpu', set(), False, False),  # a conversion or a compile: memory handed back
        (None, {'libtpu'}, True, False),  # JAX's own choice, maybe a TPU
        ('tpu,cpu', {'libtpu'}, True, False),
        ('cuda,cpu', {'cuda'}, True, False),
    ],
)
def test_scripts_keep_freed_memory_on_the_cpu_alone(
    monkeypatch, platforms, installed, repeats_steps, kept
):
  calls = []
  fake_jax = types.SimpleNamespace(config=types.SimpleNamespace(jax_platforms=platforms))
  monkeypatch.setattr(cli, 'jax', fake_jax)
  monkeypatch.setattr(cli, '_skip_absent_accelerators', lambda: None)
  monkeypatch.setattr(
      cli, '_installed', lambda module: ('cuda' if 'cuda' in module else module) in installed
  )
  monkeypatch.setattr(cli.glob, 'glob', lambda pattern: [])
  monkeypatch.setattr(cli.host_memory, 'keep_freed_memory', lambda: calls.append(1))
  monkeypatch.setattr(cli.app, 'run', lambda main, flags_parser: None)
  monkeypatch.setattr(sys, 'argv', ['script.py'])
  cli.run_main(lambda argv: None, repeats_steps=repeats_steps)
  assert bool(calls) == kept
