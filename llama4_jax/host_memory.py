"""Host memory under glibc's malloc: keep freed memory for the next step, or hand it back.

An XLA:CPU executable allocates its temporaries afresh on every call, from the thread that runs
it. glibc serves an allocation above 32 MB with fresh pages from mmap and unmaps them when it is
freed, so every step touched its temporaries' pages for the first time: for the 80m-e8 train
step of `benchmark.py train`, 0.9 million page faults (3.5 GB) and 1.7 s of kernel time in a
6.8 s step on 2 cores. `keep_freed_memory` has malloc keep freed memory in its heap for the next
allocation instead: no page faults after the first step, and the step took 5.7 s
(PERFORMANCE.md, change 9). PyTorch's CPU allocator gains alike.

Training, evaluation, generation and the benchmarks keep freed memory when they run on the CPU
alone (`cli.run_main(..., repeats_steps=True)`). On a GPU or TPU host the buffers that matter
live on the device, and the host's memory (a checkpoint's arrays on their way to disk) is
better handed back; so is a checkpoint conversion's, which holds one tensor at a time.
"""

import ctypes
import gc

# mallopt's parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_kept = False


def _glibc():
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:  # not glibc (macOS, musl)
    return None
  return libc if hasattr(libc, 'mallopt') else None


def keep_freed_memory() -> bool:
  """Has malloc reuse freed memory, not hand it back to the OS; False where libc is not glibc.

  Call it before JAX starts its backend: a thread keeps the malloc arena it first allocated
  from, and only the main arena can grow past 64 MB without mmap.
  - One arena (M_ARENA_MAX 1): every thread allocates from the main heap.
  - No mmap (M_MMAP_MAX 0): large allocations come from that heap too, not from fresh pages.
  - No trimming (M_TRIM_THRESHOLD -1, read as the largest size): freed memory at the heap's
    top stays there.
  """
  global _kept
  libc = _glibc()
  if libc is None:
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  _kept = all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
  return _kept


def freed_memory_kept() -> bool:
  """Whether `keep_freed_memory` took effect in this process (benchmarks record it)."""
  return _kept


def release_freed_memory():
  """Hands freed heap pages back to the OS (glibc keeps them otherwise, so RSS
  would grow towards the model size although only one tensor is alive)."""
  gc.collect()
  libc = _glibc()
  if libc is not None:
    libc.malloc_trim(0)
