"""scripts/train.py with faults injected (test-only; used by tests/reliability_test.py).

  python tests/faulty_train.py --workdir=DIR [any scripts/train.py flags]

Runs scripts/train.py unchanged, except that:

  * the device peak FLOP/s (it only scales the MFU figure) is a constant, not
    measured by a matmul at start-up, which saves seconds per start on a busy CPU;
  * with FAULT_DISK_FULL_AFTER_SAVES=N in the environment the disk "fills up"
    once N checkpoints are committed: every later file Orbax writes raises
    OSError(ENOSPC), as on a full disk. (Orbax writes its metadata, commit
    markers and array metadata through `async_path`; the array data goes
    through tensorstore and still succeeds, so the failing checkpoint is left
    half-written, as a real full disk leaves it.)
"""

import errno
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from orbax.checkpoint._src.path import async_path  # noqa: E402

from llama4_jax import checkpoint, flops  # noqa: E402

flops.device_peak_flops = lambda: (1e10, 'not measured: tests/faulty_train.py')


def _fill_disk_after(num_saves: int):
  disk_full = False

  def failing(write):
    async def wrapped(path, data):
      if disk_full:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
      return await write(path, data)

    return wrapped

  async_path.write_text = failing(async_path.write_text)
  async_path.write_bytes = failing(async_path.write_bytes)
  save, started = checkpoint.TrainCheckpointer.save, 0

  def counting_save(self, *args, **kwargs):
    nonlocal disk_full, started
    started += 1
    if started > num_saves and not disk_full:
      self.wait()  # the first `num_saves` checkpoints are committed, then the disk is full
      disk_full = True
    return save(self, *args, **kwargs)

  checkpoint.TrainCheckpointer.save = counting_save


if 'FAULT_DISK_FULL_AFTER_SAVES' in os.environ:
  _fill_disk_after(int(os.environ['FAULT_DISK_FULL_AFTER_SAVES']))

if __name__ == '__main__':
  script = os.path.join(REPO, 'scripts', 'train.py')
  sys.argv[0] = script
  runpy.run_path(script, run_name='__main__')
