"""Will a config fit? Compiles its train step for N simulated devices, allocating nothing.

  python scripts/aot_check.py --config=configs/scout.py --devices=256 [--accelerator=h100]
      [--num_layers=4] [--config.train.batch_size=...] [--output=report.json]

Prints per-device memory (parameters, optimizer state, batch, temporaries,
total), FLOPs per step and the fit on common accelerators. The devices are
fake CPU devices, so this runs on any machine; see llama4_jax/aot.py for what
the numbers mean. --accelerator checks one accelerator and exits 1 if the
config does not fit it. --num_layers keeps the first N layers (real widths),
for quick checks.
"""

import json
import sys
import time

from absl import flags

from llama4_jax import cli
from llama4_jax.tools import aot

_CONFIG = cli.define_config_flag()
_DEVICES = flags.DEFINE_integer(
    'devices', None, 'Simulated devices (the mesh spans them).', required=True, lower_bound=1
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
  aot.use_fake_cpu_devices(_DEVICES.value)  # before anything touches a device
  config = _CONFIG.value
  if _NUM_LAYERS.value:
    config = aot.truncate_layers(config, _NUM_LAYERS.value)
  start = time.perf_counter()
  report = aot.check(config)
  accelerators = [_ACCELERATOR.value.lower()] if _ACCELERATOR.value else list(aot.ACCELERATORS)
  print(aot.format_report(report, accelerators))
  print(f'compiled in {time.perf_counter() - start:.0f} s')
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      json.dump(aot.to_dict(report), f, indent=2)
  if _ACCELERATOR.value and not aot.fits(report.total, _ACCELERATOR.value.lower()):
    sys.exit(1)


if __name__ == '__main__':
  cli.run_main(main)
