"""Sweeps: a config file's `sweep(add, arg=None)` expanded into training runs.

A config file sweeps itself, big_vision style:

  def sweep(add, arg=None):
    for lr in (1e-3, 3e-3, 1e-2):
      add(**{'optim.lr': lr})

Each `add(...)` call is one run: a workdir ROOT/<name> (the name is made of the
swept values, e.g. `lr=0.001`) holding `overrides.json`, and the command
`scripts/train.py --config=FILE --workdir=ROOT/<name> --config.optim.lr=0.001`.
Every entry is checked (keys exist, types match, `config_lib.validate`) before
any run starts. Runs go one after another or N at a time on this machine, or
into a SLURM array script. A run whose final checkpoint exists and whose final
validation loss is logged is skipped; any other resumes from its newest checkpoint
(the trainer's resume, which also evaluates a final checkpoint not yet evaluated).

`summarize(ROOT)` reads each run's metrics.jsonl (also while runs are going)
and writes summary.md, summary.csv and summary.png (validation loss against
each swept value).
"""

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections as mlc

from llama4_jax import checkpoint, config_lib
from llama4_jax import metrics as metrics_lib
from llama4_jax.tools import tables

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # llama4_jax/tools/..
TRAIN_SCRIPT = os.path.join(REPO, 'scripts', 'train.py')
OVERRIDES_FILE = 'overrides.json'  # in each run's workdir: {dotted key: value}
LOG_FILE = 'train.log'  # a local run's stdout and stderr
METRICS_FILE = metrics_lib.METRICS_FILE
SUMMARY = 'summary'  # ROOT/summary.md, .csv, .png
COMMANDS_FILE = 'commands.txt'
SLURM_FILE = 'sweep.sbatch'


class SweepError(ValueError):
  """A sweep that cannot be planned or whose runs failed; the message names them."""


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  overrides: dict[str, Any]  # the swept keys and values
  workdir: str
  config: mlc.ConfigDict  # the resolved config this run trains
  command: tuple[str, ...]


# Planning -----------------------------------------------------------------------


def load_config_file(spec: str):
  """(module, arg) of 'path/to/config.py[:arg]'; the file runs as code."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such config file')
  module_spec = importlib.util.spec_from_file_location('_sweep_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module, (arg or None)


def collect_entries(sweep_fn: Callable, arg) -> list[dict[str, Any]]:
  """The keyword arguments of every `add(...)` call, in order."""
  entries = []
  sweep_fn(lambda **overrides: entries.append(overrides), arg)
  return entries


def flag_value(value) -> str:
  """`value` written as a `--config.key=` flag value that ml_collections parses back to it."""
  if isinstance(value, (tuple, list)):
    items = ','.join(flag_value(v) for v in value)
    return f'({items},)' if len(value) == 1 else f'({items})'
  if isinstance(value, float):
    return repr(value)
  return str(value)


def run_name(overrides: Mapping[str, Any], swept_keys: Sequence[str] = ()) -> str:
  """A readable directory name from the swept values: `lr=0.001,warmup_steps=50`.

  A key is shortened to its last part unless another swept key shares it.
  """
  if not overrides:
    return 'default'
  leaves = [k.split('.')[-1] for k in set(swept_keys) | set(overrides)]
  parts = []
  for key, value in overrides.items():
    short = key.split('.')[-1]
    label = short if leaves.count(short) == 1 else key
    text = f'{value:g}' if isinstance(value, float) else flag_value(value)
    parts.append(f'{label}={text}')
  return re.sub(r'[^A-Za-z0-9_.=,+-]', '_', ','.join(parts))


def train_command(config_spec: str, workdir: str, overrides: Mapping[str, Any]) -> tuple[str, ...]:
  path, sep, arg = config_spec.partition(':')
  return (
      sys.executable,
      TRAIN_SCRIPT,
      f'--config={os.path.abspath(path)}{sep}{arg}',
      f'--workdir={workdir}',
      *(f'--config.{k}={flag_value(v)}' for k, v in overrides.items()),
  )


def resolve(base: mlc.ConfigDict, overrides: Mapping[str, Any]) -> mlc.ConfigDict:
  """A copy of `base` with the overrides applied and validated (ConfigError names the key)."""
  config = mlc.ConfigDict(base.to_dict())
  config.lock()  # as on the command line: no new keys
  for key, value in overrides.items():
    config_lib.set_override(config, key, value)
  config_lib.validate(config)
  return config


def plan(config_spec: str, root: str, base_overrides: Mapping[str, Any] | None = None) -> list[Run]:
  """The runs of the config file's sweep; every entry is checked before this returns.

  `base_overrides` (dotted keys, e.g. from `--config.x=y` flags) apply to every
  run; a swept key wins over them.
  """
  module, arg = load_config_file(config_spec)
  if not callable(getattr(module, 'sweep', None)):
    raise SweepError(f'{config_spec.partition(":")[0]}: no sweep(add, arg=None) function')
  base_overrides = dict(base_overrides or {})
  base = resolve(module.get_config(arg), base_overrides)
  entries = collect_entries(module.sweep, arg)
  if not entries:
    raise SweepError(f'{config_spec}: sweep() added no runs')
  configs = []
  for index, entry in enumerate(entries):  # every entry is checked before any run starts
    try:
      configs.append(resolve(base, entry))
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f'sweep entry {index} ({entry}): {e}') from None
  swept_keys = [k for entry in entries for k in entry]
  runs, seen = [], {}
  for index, (entry, config) in enumerate(zip(entries, configs)):
    name = run_name(entry, swept_keys)
    if name in seen:
      raise SweepError(f'sweep entries {seen[name]} and {index} both make run {name!r}')
    seen[name] = index
    workdir = os.path.join(os.path.abspath(root), name)
    runs.append(
        Run(
            name,
            dict(entry),
            workdir,
            config,
            train_command(config_spec, workdir, {**base_overrides, **entry}),
        )
    )
  return runs


def write_overrides(runs: Sequence[Run]):
  """Creates each run's workdir with its overrides.json (what summaries read)."""
  for run in runs:
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, OVERRIDES_FILE), 'w') as f:
      json.dump(run.overrides, f, indent=2)


# Run state --------------------------------------------------------------------------


def run_status(workdir: str, steps: int | None) -> str:
  """'done' (final checkpoint saved and its validation loss logged), 'partial' (started) or 'new'.

  Every run evaluates its last step (`train.eval_every` or not), after saving its checkpoint; a
  run killed in between is 'partial': its rerun evaluates that checkpoint (trainer.py).
  """
  latest = checkpoint.latest_step(workdir) if os.path.isdir(workdir) else None
  if latest is not None and steps is not None and latest >= steps:
    # A checkpoint past `steps` (a longer run's) leaves a rerun nothing to train or evaluate.
    if latest > steps or steps in _eval_losses(metrics_lib.read_metrics(workdir)):
      return 'done'
    return 'partial'
  started = any(
      os.path.exists(os.path.join(workdir, f))
      for f in (config_lib.CONFIG_FILE, METRICS_FILE, checkpoint.CHECKPOINT_DIR)
  )
  return 'partial' if started else 'new'


# Running -----------------------------------------------------------------------------


def _start(run: Run) -> subprocess.Popen:
  log = open(os.path.join(run.workdir, LOG_FILE), 'a')
  log.write(f'$ {shlex.join(run.command)}\n')
  log.flush()
  try:
    return subprocess.Popen(run.command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  finally:
    log.close()  # the child has its own handle


def run_local(runs: Sequence[Run], parallel: int = 1, log=print, poll_s: float = 0.5):
  """Trains the unfinished runs here, `parallel` at a time; finished ones are skipped.

  Each run appends its output to <workdir>/train.log. Raises SweepError naming
  the runs that failed, after the others have finished.
  """
  if parallel < 1:
    raise SweepError(f'parallel must be at least 1, got {parallel}')
  write_overrides(runs)
  pending = []  # (run, status), in sweep order
  for run in runs:
    status = run_status(run.workdir, run.config.train.steps)
    if status == 'done':
      log(f'{run.name}: done, skipped')
    else:
      pending.append((run, status))
  running: dict[subprocess.Popen, Run] = {}
  failed = []
  try:
    while pending or running:
      while pending and len(running) < parallel:
        run, status = pending.pop(0)
        log(f'{run.name}: {"resuming" if status == "partial" else "starting"}')
        running[_start(run)] = run
      time.sleep(poll_s)
      for process in [p for p in running if p.poll() is not None]:
        run = running.pop(process)
        if process.returncode:
          failed.append(run)
          log(f'{run.name}: failed (exit {process.returncode}); see {run.workdir}/{LOG_FILE}')
        else:
          log(f'{run.name}: finished')
  finally:
    for process in running:  # only on an exception (e.g. Ctrl-C): stop what we started
      process.terminate()
  if failed:
    raise SweepError(
        f'{len(failed)} of {len(runs)} runs failed: '
        + ', '.join(f'{r.name} (log {os.path.join(r.workdir, LOG_FILE)})' for r in failed)
    )


# Cluster launch --------------------------------------------------------------------


def write_commands(runs: Sequence[Run], root: str) -> str:
  """ROOT/commands.txt: one shell command per run, for any scheduler."""
  path = os.path.join(root, COMMANDS_FILE)
  os.makedirs(root, exist_ok=True)
  with open(path, 'w') as f:
    f.writelines(shlex.join(run.command) + '\n' for run in runs)
  return path


def _check_sbatch_text(text: str, what: str, forbidden: str):
  """#SBATCH lines are not shell: quoting does not work there, a newline starts a new line and
  % starts a filename pattern. Refuses `text` if it has a character of the regex class
  `forbidden`."""
  bad = sorted(set(re.findall(f'[{forbidden}]', text)))
  if bad:
    raise ValueError(
        f'{what} {text!r} cannot go into an #SBATCH line: it contains {", ".join(map(repr, bad))}'
    )


def slurm_script(
    runs: Sequence[Run], root: str, *, parallel: int = 0, sbatch_options: Sequence[str] = ()
) -> str:
  """A SLURM array script in which array task i trains run i under `srun`.

  The #SBATCH options decide a run's tasks (one per GPU, or one per host);
  train.py initialises jax.distributed from SLURM's variables.
  """
  throttle = f'%{parallel}' if parallel else ''
  _check_sbatch_text(os.path.abspath(root), 'the sweep root', r'\s"\'%#\\')
  for option in sbatch_options:
    _check_sbatch_text(option, 'an #SBATCH option', r'\n\r')
  lines = [
      '#!/bin/bash',
      f'#SBATCH --job-name=sweep-{os.path.basename(os.path.abspath(root))}',
      f'#SBATCH --array=0-{len(runs) - 1}{throttle}',
      f'#SBATCH --output={os.path.join(os.path.abspath(root), "slurm-%A_%a.out")}',
      *(f'#SBATCH {option}' for option in sbatch_options),
      '#',
      '# Written by scripts/sweep.py. Runs resume from their newest checkpoint if resubmitted;',
      '# runs already finished when this was written are not in the array.',
      'set -euo pipefail',
      f'cd {shlex.quote(REPO)}',
      'case "$SLURM_ARRAY_TASK_ID" in',
  ]
  for index, run in enumerate(runs):
    name = ' '.join(run.name.split())  # a comment: one line
    lines += [f'  {index})  # {name}', f'    srun {shlex.join(run.command)} ;;']
  lines += ['  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', 'esac']
  return '\n'.join(lines) + '\n'


def emit(
    runs: Sequence[Run],
    root: str,
    kind: str,
    *,
    parallel: int = 0,
    sbatch_options: Sequence[str] = (),
) -> list[str]:
  """Writes the launch files of the unfinished runs (`kind`: 'commands' or 'slurm').

  Returns the paths written; none when every run is finished.
  """
  if kind not in ('commands', 'slurm'):
    raise SweepError(f'emit must be "commands" or "slurm", got {kind!r}')
  write_overrides(runs)
  todo = [r for r in runs if run_status(r.workdir, r.config.train.steps) != 'done']
  if not todo:
    return []
  paths = [write_commands(todo, root)]
  if kind == 'slurm':
    paths.append(os.path.join(root, SLURM_FILE))
    with open(paths[-1], 'w') as f:
      f.write(slurm_script(todo, root, parallel=parallel, sbatch_options=sbatch_options))
  return paths


# Summaries -------------------------------------------------------------------------


def _eval_losses(metrics: Sequence[dict]) -> dict[int, float]:
  """Validation loss per step; should a step hold two, the newest counts."""
  return {row['step']: row['eval_loss'] for row in metrics if 'eval_loss' in row}


def _steps(workdir: str) -> int | None:
  try:
    return int(config_lib.load(workdir).train.steps)
  except (FileNotFoundError, config_lib.ConfigError, AttributeError):
    return None  # not started yet


def run_result(workdir: str) -> dict[str, Any]:
  """A run's row: name, status, last logged step, final and best validation loss."""
  metrics = metrics_lib.read_metrics(workdir)
  evals = _eval_losses(metrics)
  train_losses = [row for row in metrics if 'loss' in row]
  row = {
      'name': os.path.basename(workdir),
      'status': run_status(workdir, _steps(workdir)),
      'step': max((r['step'] for r in metrics), default=None),
      'train_loss': train_losses[-1]['loss'] if train_losses else None,
      'final_eval_loss': None,
      'final_eval_step': None,
      'best_eval_loss': None,
      'best_eval_step': None,
  }
  if evals:
    final_step = max(evals)
    best_step = min(evals, key=lambda s: (evals[s], s))
    row.update(
        final_eval_loss=evals[final_step],
        final_eval_step=final_step,
        best_eval_loss=evals[best_step],
        best_eval_step=best_step,
    )
  return row


def _sort_key(value):
  """Numbers by value, then everything else by text."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return (0, value, '')
  return (1, 0, str(value))


def collect_results(root: str) -> tuple[list[dict], list[str]]:
  """(one row per run under ROOT, the swept keys), sorted by the swept values."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'{root}: no such sweep directory')
  rows, keys = [], []
  for name in sorted(os.listdir(root)):
    path = os.path.join(root, name, OVERRIDES_FILE)
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      overrides = json.load(f)
    keys += [k for k in overrides if k not in keys]
    rows.append({**overrides, **run_result(os.path.join(root, name))})
  if not rows:
    raise FileNotFoundError(f'{root}: no runs (no */{OVERRIDES_FILE}); is it a sweep directory?')
  rows.sort(key=lambda r: tuple(_sort_key(r.get(k)) for k in keys))
  return rows, keys


RESULT_COLUMNS = (
    'status',
    'step',
    'train_loss',
    'final_eval_loss',
    'final_eval_step',
    'best_eval_loss',
    'best_eval_step',
)


def plot_panels(rows: Sequence[dict], keys: Sequence[str]) -> list[tables.Panel]:
  """One panel per swept key: final and best validation loss against its value."""
  scored = [r for r in rows if r['final_eval_loss'] is not None]
  panels = []
  for key in list(keys) or ['name']:
    values = [r.get(key) for r in scored]
    # Learning rates and the like are swept geometrically: a log axis.
    log_x = (
        bool(values)
        and tables.is_numeric(values)
        and all(v > 0 for v in values)
        and max(values) >= 10 * min(values)
    )
    series = [
        tables.Series('final', [r['final_eval_loss'] for r in scored], 'o'),
        tables.Series('best', [r['best_eval_loss'] for r in scored], 'x'),
    ]
    panels.append(tables.Panel(values, series, key, 'validation loss (nats/token)', log_x))
  return panels


def summarize(root: str) -> tuple[list[dict], list[str]]:
  """Writes ROOT/summary.md, .csv and .png; returns (rows, written paths)."""
  rows, keys = collect_results(root)
  base = os.path.join(root, SUMMARY)
  written = tables.write_table(rows, ['name', *keys, *RESULT_COLUMNS], base)
  return rows, written + [tables.write_plot(plot_panels(rows, keys), base + '.png')]


def format_rows(rows: Sequence[dict]) -> str:
  """A short console view of the summary."""
  return '\n'.join(
      f'{r["name"]:<32} {r["status"]:<8} step {tables.format_cell(r["step"]):>6}  '
      f'final {tables.format_cell(r["final_eval_loss"])}  best {tables.format_cell(r["best_eval_loss"])}'
      for r in rows
  )
