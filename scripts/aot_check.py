"""Will a config fit? Compiles its train step for TPUs, GPUs or simulated devices, allocating nothing.

  python scripts/aot_check.py --config=configs/scout.py --topology=v5p-256 [--num_slices=2 --config.mesh.data=2]
  python scripts/aot_check.py --config=configs/scout.py --topology=h100-32x8
  python scripts/aot_check.py --config=configs/scout.py --devices=256 [--accelerator=h100]
      [--num_layers=4] [--config.train.batch_size=...] [--output=report.json]

--topology compiles with the real compiler, on a machine without the devices (requirements-
compile.txt): for a TPU slice (v4-N, v5p-N, v5e-N, v6e-N) with the TPU compiler of libtpu, or for
NVIDIA GPUs (h100-HxG, h200-HxG: H hosts of G GPUs; h100-8 is one host of 8) with the CUDA
compiler of jax-cuda12-plugin and nvidia-cuda-nvcc-cu12's ptxas. Its memory figures are the ones a
run on those devices gets, and a program that does not fit is reported as "needs X GiB of Y" with
exit status 1: the TPU compiler, told to plan for --memory_budget of the chip (default 80%),
refuses it; the CUDA compiler compiles it, and its footprint (arguments + outputs - donated +
temporaries) is compared with the GPU's memory.
--devices compiles for that many fake CPU devices on any machine: exact for parameters,
optimizer state and batch, an estimate for the temporaries. See llama4_jax/tools/aot.py.
Prints per-device memory (parameters, optimizer state, batch, temporaries, total; for a TPU also
the compiler's own HBM total, by which the fit is then judged), FLOPs per step (XLA's count: n/a
for GPUs) and the fit. --accelerator checks one accelerator and exits 1 if the
config does not fit it. --num_layers keeps the first N layers (real widths), for quick checks.
"""

import json
import sys
import time

from absl import flags

from llama4_jax import cli
from llama4_jax.tools import aot

_CONFIG = cli.define_config_flag()
_TOPOLOGY = flags.DEFINE_string(
    'topology',
    None,
    'Compile for these devices with their own compiler: a TPU slice (v5p-256) or NVIDIA GPUs '
    '(h100-32x8, h200-4x8: hosts x GPUs per host).',
)
_NUM_SLICES = flags.DEFINE_integer(
    'num_slices',
    1,
    "With a TPU --topology: slices (multi-slice), on the mesh's data axis.",
    lower_bound=1,
)
_DEVICES = flags.DEFINE_integer(
    'devices', None, 'Simulated CPU devices (the mesh spans them).', lower_bound=1
)
_ACCELERATOR = flags.DEFINE_enum(
    'accelerator',
    None,
    list(aot.ACCELERATORS),
    'Check against this one; exit 1 if it does not fit.',
    case_sensitive=False,
)
_MEMORY_BUDGET = flags.DEFINE_float(
    'memory_budget',
    aot.TPU_PLAN_FRACTION,
    'With a TPU --topology: the fraction of the chip memory the compiler may plan for, '
    'arguments included (given all of it, it spends the spare on speed). The verdict is what '
    'the compiled program holds in HBM against 90% of the chip.',
    lower_bound=0.01,
    upper_bound=1.0,
)
_NUM_LAYERS = flags.DEFINE_integer('num_layers', None, 'Keep only the first N layers.')
_OUTPUT = flags.DEFINE_string('output', None, 'Also write the report here as JSON.')


def main(argv):
  del argv
  if (_TOPOLOGY.value is None) == (_DEVICES.value is None):
    raise ValueError(
        'give --topology (a TPU slice or NVIDIA GPUs) or --devices (fake CPU devices), one of them'
    )
  if _TOPOLOGY.value:
    target = aot.compile_target(_TOPOLOGY.value, _NUM_SLICES.value, _MEMORY_BUDGET.value)
  else:
    aot.use_fake_cpu_devices(_DEVICES.value)  # before anything touches a device
    target = aot.Target(None, f'{_DEVICES.value} fake CPU devices, the CPU compiler', None, {})
  where, fit_options = target.description, target.fit_options
  accelerator = _ACCELERATOR.value.lower() if _ACCELERATOR.value else target.accelerator
  devices = target.devices
  config = _CONFIG.value
  if _NUM_LAYERS.value:
    config = aot.truncate_layers(config, _NUM_LAYERS.value)
  start = time.perf_counter()
  try:
    report = aot.check_fit(config, devices, **fit_options)
  except aot.OutOfMemory as e:
    if e.report is not None:  # compiled (the CUDA compiler), but too big for the GPU
      print(f'compiled for {where} in {time.perf_counter() - start:.0f} s')
      print(aot.format_report(e.report, [accelerator]))
    print(f'{where}: {e}')
    chip_gib = aot.ACCELERATORS.get(accelerator)
    if e.report is None and chip_gib:  # refused by the TPU compiler
      if note := aot.refusal_note(e.needed_gib, chip_gib, _MEMORY_BUDGET.value):
        print(note)
    if _OUTPUT.value:
      result = {
          'fits': False,
          'needed_gib': e.needed_gib,
          'available_gib': e.available_gib,
          'reason': e.args[0],
      }
      if e.report is not None:
        result['report'] = aot.to_dict(e.report)
      with open(_OUTPUT.value, 'w') as f:
        json.dump(result, f, indent=2)
    sys.exit(1)
  print(f'compiled for {where} in {time.perf_counter() - start:.0f} s')
  print(aot.format_report(report, [accelerator] if accelerator else list(aot.ACCELERATORS)))
  fits = aot.fits(report.footprint, accelerator) if accelerator else None
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      json.dump({**aot.to_dict(report), 'fits': fits}, f, indent=2)
  if fits is False:
    sys.exit(1)


if __name__ == '__main__':
  cli.run_main(main)
