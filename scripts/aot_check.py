"""Will a config fit? Compiles its train step for a TPU slice or N simulated devices, allocating nothing.

  python scripts/aot_check.py --config=configs/scout.py --topology=v5p-256 [--num_slices=2]
  python scripts/aot_check.py --config=configs/scout.py --devices=256 [--accelerator=h100]
      [--num_layers=4] [--config.train.batch_size=...] [--output=report.json]

--topology compiles with the TPU compiler for that slice (v4-N, v5p-N, v5e-N, v6e-N; needs
libtpu, requirements-compile.txt, and no TPU): its memory figures are the ones a TPU run gets,
and a program that does not fit is reported as "needs X GiB of Y" with exit status 1.
--devices compiles for that many fake CPU devices on any machine: exact for parameters,
optimizer state and batch, an estimate for the temporaries. See llama4_jax/tools/aot.py.
Prints per-device memory (parameters, optimizer state, batch, temporaries, total), FLOPs per step
and the fit. --accelerator checks one accelerator and exits 1 if the config does not fit it.
--num_layers keeps the first N layers (real widths), for quick checks.
"""

import json
import sys
import time

import jax
from absl import flags

from llama4_jax import cli
from llama4_jax.tools import aot

_CONFIG = cli.define_config_flag()
_TOPOLOGY = flags.DEFINE_string('topology', None, 'TPU slice to compile for, e.g. v5p-256.')
_NUM_SLICES = flags.DEFINE_integer(
    'num_slices', 1, 'With --topology: slices (multi-slice).', lower_bound=1
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
_NUM_LAYERS = flags.DEFINE_integer('num_layers', None, 'Keep only the first N layers.')
_OUTPUT = flags.DEFINE_string('output', None, 'Also write the report here as JSON.')


def main(argv):
  del argv
  if (_TOPOLOGY.value is None) == (_DEVICES.value is None):
    raise ValueError('give --topology (a TPU slice) or --devices (fake CPU devices), one of them')
  accelerator = _ACCELERATOR.value.lower() if _ACCELERATOR.value else None
  if _TOPOLOGY.value:
    target = aot.tpu_slice(_TOPOLOGY.value)
    jax.config.update('jax_platforms', 'cpu')  # the TPU compiler is needed, not a TPU
    jax.config.update('jax_enable_compilation_cache', False)  # no TPU client to load entries
    devices = aot.tpu_devices(target, _NUM_SLICES.value)
    accelerator = accelerator or target.accelerator
    where = (f'{_NUM_SLICES.value} x ' if _NUM_SLICES.value > 1 else '') + (
        f'{target.name} ({target.topology}, {target.chips} chips), the TPU compiler'
    )
  else:
    aot.use_fake_cpu_devices(_DEVICES.value)  # before anything touches a device
    devices = None
    where = f'{_DEVICES.value} fake CPU devices, the CPU compiler'
  config = _CONFIG.value
  if _NUM_LAYERS.value:
    config = aot.truncate_layers(config, _NUM_LAYERS.value)
  start = time.perf_counter()
  try:
    report = aot.check_fit(config, devices)
  except aot.OutOfMemory as e:
    print(f'{where}: {e}')
    if _OUTPUT.value:
      with open(_OUTPUT.value, 'w') as f:
        json.dump(
            {
                'fits': False,
                'needed_gib': e.needed_gib,
                'available_gib': e.available_gib,
                'reason': e.args[0],
            },
            f,
            indent=2,
        )
    sys.exit(1)
  print(f'compiled for {where} in {time.perf_counter() - start:.0f} s')
  print(aot.format_report(report, [accelerator] if accelerator else list(aot.ACCELERATORS)))
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      json.dump(aot.to_dict(report), f, indent=2)
  if accelerator and not aot.fits(report.total, accelerator):
    sys.exit(1)


if __name__ == '__main__':
  cli.run_main(main)
