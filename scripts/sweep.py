"""Expands a config file's sweep(add, arg) into runs; runs, emits or summarizes them.

  python scripts/sweep.py --config=configs/tiny.py --workdir=ROOT [--parallel=N]
  python scripts/sweep.py --config=configs/tiny.py --workdir=ROOT --emit=slurm \\
      [--sbatch=--gpus-per-task=1 --sbatch=--time=4:00:00]
  python scripts/sweep.py --summarize=ROOT

Each run trains in ROOT/<name> (e.g. ROOT/lr=0.001, holding overrides.json);
--config.key=value flags apply to every run. Running again skips finished runs
and resumes the others. --emit=commands writes ROOT/commands.txt; --emit=slurm
also writes ROOT/sweep.sbatch (an array job: `sbatch ROOT/sweep.sbatch`).
--summarize writes ROOT/summary.md, .csv and .png (works while runs are going).
"""

import sys

from absl import flags
from ml_collections import config_flags

from llama4_jax import cli
from llama4_jax.tools import sweep

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep root: one workdir per run under it.')
_PARALLEL = flags.DEFINE_integer(
    'parallel',
    None,
    'Runs at a time: locally (default 1), or the SLURM array throttle (default none).',
    lower_bound=1,
)
_EMIT = flags.DEFINE_enum(
    'emit', None, ['commands', 'slurm'], 'Write launch files instead of running.'
)
_SBATCH = flags.DEFINE_multi_string('sbatch', [], 'Extra #SBATCH option (repeatable).')
_SUMMARIZE = flags.DEFINE_string('summarize', None, 'Summarize the sweep under this root.')


def main(argv):
  del argv
  if _SUMMARIZE.value:
    rows, paths = sweep.summarize(_SUMMARIZE.value)
    print(sweep.format_rows(rows))
    print('wrote ' + ', '.join(paths))
    return
  if not (_CONFIG.value and _WORKDIR.value):
    raise ValueError('give --config and --workdir, or --summarize=ROOT')
  config_flag = flags.FLAGS['config']
  runs = sweep.plan(
      config_flags.get_config_filename(config_flag),
      _WORKDIR.value,
      config_flags.get_override_values(config_flag),
  )
  print(f'{len(runs)} runs: ' + ', '.join(r.name for r in runs))
  if _EMIT.value:
    paths = sweep.emit(
        runs,
        _WORKDIR.value,
        _EMIT.value,
        parallel=_PARALLEL.value or 0,
        sbatch_options=_SBATCH.value,
    )
    print('wrote ' + ', '.join(paths) if paths else 'every run is finished; nothing to launch')
    return
  sweep.run_local(runs, parallel=_PARALLEL.value or 1, log=lambda m: print(m, flush=True))
  print(
      f'all runs finished; summarize with: {sys.executable} scripts/sweep.py '
      f'--summarize={_WORKDIR.value}'
  )


if __name__ == '__main__':
  cli.run_main(main)
