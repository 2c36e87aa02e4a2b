"""Sweeps: expansion, checks before any run, local runs with skip/resume, SLURM script, summary."""

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import ml_collections as mlc
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from llama4_jax import checkpoint, config_lib
from llama4_jax import metrics as metrics_lib
from llama4_jax.tools import sweep

import small_run
import xla_env

TINY = os.path.join(small_run.REPO, 'configs', 'tiny.py')

# Two learning rates of the small test model; evaluations at steps 3 and 6.
SMALL = {**small_run.SMALL, 'train.eval_every': 3}


def sweep_file(tmp_path, body: str) -> str:
  """A config file that is tiny.py plus the sweep `body` (lines of `sweep`)."""
  path = tmp_path / 'sweep_config.py'
  path.write_text(
      f'import runpy\n\nget_config = runpy.run_path({TINY!r})["get_config"]\n\n\n'
      'def sweep(add, arg=None):\n' + body
  )
  return str(path)


def test_tiny_sweep_expands_into_named_runs(tmp_path):
  runs = sweep.plan(TINY, str(tmp_path))
  assert [r.name for r in runs] == ['lr=0.001', 'lr=0.003', 'lr=0.01']
  assert [r.config.optim.lr for r in runs] == [1e-3, 3e-3, 1e-2]
  assert runs[0].workdir == str(tmp_path / 'lr=0.001')
  assert runs[0].command[-2:] == (f'--workdir={tmp_path}/lr=0.001', '--config.optim.lr=0.001')
  assert not os.listdir(tmp_path)  # planning writes nothing


def test_base_overrides_reach_every_run_and_the_swept_key_wins(tmp_path):
  runs = sweep.plan(TINY, str(tmp_path), {'train.steps': 7, 'optim.lr': 0.5})
  assert [(r.config.train.steps, r.config.optim.lr) for r in runs] == [
      (7, 1e-3),
      (7, 3e-3),
      (7, 1e-2),
  ]
  assert '--config.train.steps=7' in runs[0].command
  assert '--config.optim.lr=0.5' not in runs[0].command


@pytest.mark.parametrize(
    'entry,message',
    [
        ("{'optim.lrr': 1e-3}", 'config.optim.lrr: no such key; did you mean optim.lr'),
        ("{'optimizer.lr': 1e-3}", 'config.optimizer.lr: no such key'),
        ("{'optim.lr': 'fast'}", 'config.optim.lr: expects float'),
        ("{'train.steps': 2.5}", 'config.train.steps: expects int'),
        ("{'train.skip_nonfinite': 1}", 'config.train.skip_nonfinite: expects bool'),
        ("{'model.num_kv_heads': 3}", 'num_kv_heads'),  # a type-correct value validate() refuses
    ],
)
def test_bad_entry_fails_before_any_run_naming_the_key(tmp_path, entry, message):
  config = sweep_file(tmp_path, f"  add(**{{'optim.lr': 1e-3}})\n  add(**{entry})\n")
  with pytest.raises(config_lib.ConfigError, match='sweep entry 1') as error:
    sweep.plan(config, str(tmp_path / 'root'))
  assert message in str(error.value)
  assert not (tmp_path / 'root').exists()


@pytest.mark.slow
def test_script_refuses_a_bad_key_in_one_line_before_any_run(tmp_path):
  config = sweep_file(tmp_path, "  add(**{'optim.lr': 1e-3})\n  add(**{'train.stepz': 5})\n")
  result = subprocess.run(
      [sys.executable, 'scripts/sweep.py', f'--config={config}', f'--workdir={tmp_path}/root'],
      cwd=small_run.REPO,
      capture_output=True,
      text=True,
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: sweep entry 1 ({'train.stepz': 5}): config.train.stepz: no such key; "
      'did you mean train.steps?'
  )
  assert not (tmp_path / 'root').exists()


def test_duplicate_runs_and_empty_sweeps_are_refused(tmp_path):
  with pytest.raises(sweep.SweepError, match="entries 0 and 1 both make run 'lr=0.001'"):
    sweep.plan(sweep_file(tmp_path, "  add(**{'optim.lr': 1e-3})\n" * 2), str(tmp_path))
  with pytest.raises(sweep.SweepError, match='added no runs'):
    sweep.plan(sweep_file(tmp_path, '  pass\n'), str(tmp_path))


@pytest.mark.parametrize(
    'key,value',
    [
        ('optim.lr', 1e-05),
        ('optim.lr', 0.003),
        ('train.steps', 12),
        ('model.moe_layers', (1,)),
        ('model.moe_layers', (0, 2)),
        ('train.skip_nonfinite', True),
        ('model.remat', 'full'),
    ],
)
def test_command_flags_parse_back_to_the_swept_value(key, value):
  """What train.py's flag parser reads from a run's command is the value that was swept."""
  args = ['prog', f'--config={TINY}', f'--config.{key}={sweep.flag_value(value)}']
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, lock_config=True, sys_argv=args)
  values(args)
  assert values['config'].override_values == {key: value}


def test_results_of_a_resumed_run_being_written(tmp_path):
  """A resumed run re-logs steps (the newest value counts); a line being written is skipped."""
  lines = [
      {'step': 2, 'loss': 6.0},
      {'step': 2, 'eval_loss': 5.5},
      {'step': 4, 'eval_loss': 5.2},
      {'step': 3, 'loss': 5.8},
      {'step': 4, 'eval_loss': 5.3},
  ]  # killed after 4, resumed at 2
  with open(tmp_path / sweep.METRICS_FILE, 'w') as f:
    f.writelines(json.dumps(line) + '\n' for line in lines)
    f.write('{"step": 6, "eval_lo')
  row = sweep.run_result(str(tmp_path))
  assert row['status'] == 'partial' and row['step'] == 4 and row['train_loss'] == 5.8
  assert (row['final_eval_step'], row['final_eval_loss']) == (4, 5.3)
  assert (row['best_eval_step'], row['best_eval_loss']) == (4, 5.3)


def finished_run(workdir, steps: int, checkpoint_step: int, eval_steps) -> str:
  """A run's workdir as the trainer leaves it: config.json, a checkpoint at `checkpoint_step`
  (a tiny state: run_status only lists checkpoints) and validation losses at `eval_steps`."""
  config_lib.save(mlc.ConfigDict({'train': {'steps': steps}}), str(workdir))
  ckpt = checkpoint.TrainCheckpointer(str(workdir), keep=1)
  state = {'params': {}, 'opt_state': {}, 'step': np.array(checkpoint_step, np.int32)}
  ckpt.save(checkpoint_step, state, ['{}'])
  ckpt.close()
  rows = [{'step': s, 'eval_loss': 6.0 - s / 10} for s in eval_steps]
  with open(workdir / sweep.METRICS_FILE, 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows)
  return str(workdir)


def test_a_run_killed_in_its_final_evaluation_is_resumed_not_done(tmp_path):
  """The trainer saves the last step's checkpoint before evaluating it: without that
  evaluation the run is partial (its rerun evaluates), and no earlier one is taken as final."""
  workdir = finished_run(tmp_path / 'run', steps=6, checkpoint_step=6, eval_steps=[3])
  assert sweep.run_status(workdir, 6) == 'partial'
  row = sweep.run_result(workdir)
  assert row['status'] == 'partial' and row['final_eval_step'] == 3
  run = sweep.Run('run', {}, workdir, mlc.ConfigDict({'train': {'steps': 6}}), ('true',))
  assert sweep.emit([run], str(tmp_path), 'commands') == [str(tmp_path / sweep.COMMANDS_FILE)]

  with open(tmp_path / 'run' / sweep.METRICS_FILE, 'a') as f:
    f.write(json.dumps({'step': 6, 'eval_loss': 5.4}) + '\n')
  assert sweep.run_status(workdir, 6) == 'done'
  assert sweep.run_result(workdir)['status'] == 'done'
  assert sweep.emit([run], str(tmp_path), 'commands') == []
  # A checkpoint past the steps (a longer run's): a rerun would neither train nor evaluate.
  assert sweep.run_status(workdir, 4) == 'done'


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_small_sweep_end_to_end(tmp_path, monkeypatch):
  """Two runs two at a time; the SLURM script; resume a run cut in its final evaluation and one
  cut mid-run, then skip both; summary."""
  monkeypatch.setenv('XLA_FLAGS', xla_env.xla_flags(1))  # cheapest runs
  root = tmp_path / 'root'
  config = sweep_file(tmp_path, "  for lr in (3e-3, 1e-2):\n    add(**{'optim.lr': lr})\n")
  runs = sweep.plan(config, str(root), SMALL)

  paths = sweep.emit(runs, str(root), 'slurm', sbatch_options=['--gpus-per-task=1'])
  script = open(root / sweep.SLURM_FILE).read()
  assert paths == [str(root / sweep.COMMANDS_FILE), str(root / sweep.SLURM_FILE)]
  assert '#SBATCH --array=0-1\n' in script and '#SBATCH --gpus-per-task=1\n' in script
  for index, run in enumerate(runs):
    assert f'  {index})  # {run.name}\n    srun {shlex.join(run.command)} ;;' in script
  assert subprocess.run(['bash', '-n', str(root / sweep.SLURM_FILE)]).returncode == 0
  commands = open(root / sweep.COMMANDS_FILE).read().splitlines()
  assert commands == [shlex.join(r.command) for r in runs]

  log = []
  sweep.run_local(runs, parallel=2, log=log.append, poll_s=0.1)
  assert sorted(log) == sorted([f'{r.name}: {w}' for r in runs for w in ('starting', 'finished')])
  for run in runs:
    assert json.load(open(os.path.join(run.workdir, sweep.OVERRIDES_FILE))) == run.overrides
    assert sweep.run_status(run.workdir, 6) == 'done'

  # As if killed: the first run in its final evaluation (after the final checkpoint), the
  # second back at its step-4 checkpoint.
  metrics_path = os.path.join(runs[0].workdir, sweep.METRICS_FILE)
  metrics = metrics_lib.read_metrics(runs[0].workdir)
  kept = [m for m in metrics if not (m['step'] == 6 and 'eval_loss' in m)]
  assert len(kept) == len(metrics) - 1
  with open(metrics_path, 'w') as f:
    f.writelines(json.dumps(m) + '\n' for m in kept)
  shutil.rmtree(checkpoint.step_path(runs[1].workdir, 6))
  rows, _ = sweep.summarize(str(root))  # a summary of a sweep in progress
  assert [r['status'] for r in rows] == ['partial', 'partial']
  log.clear()
  sweep.run_local(runs, log=log.append, poll_s=0.1)
  assert log == [f'{r.name}: {w}' for r in runs for w in ('resuming', 'finished')]
  rerun = open(os.path.join(runs[0].workdir, sweep.LOG_FILE)).read().split('$ ')[-1]
  assert 'resumed from step 6' in rerun and 'step 6: validation loss' in rerun
  assert 'resumed from step 4' in open(os.path.join(runs[1].workdir, sweep.LOG_FILE)).read()
  log.clear()
  sweep.run_local(runs, log=log.append, poll_s=0.1)
  assert log == [f'{r.name}: done, skipped' for r in runs]
  assert open(os.path.join(runs[0].workdir, sweep.LOG_FILE)).read().count('$ ') == 2
  assert sweep.emit(runs, str(root), 'slurm') == []  # nothing left to launch

  rows, paths = sweep.summarize(str(root))
  assert paths == [str(root / f'summary.{ext}') for ext in ('md', 'csv', 'png')]
  table = read_csv(root / 'summary.csv')
  assert [r['name'] for r in table] == ['lr=0.003', 'lr=0.01']
  assert [float(r['optim.lr']) for r in table] == [3e-3, 1e-2]
  for run, row in zip(runs, table):
    evals = {
        m['step']: m['eval_loss'] for m in metrics_lib.read_metrics(run.workdir) if 'eval_loss' in m
    }
    assert sorted(evals) == [3, 6]
    assert row['status'] == 'done' and int(row['final_eval_step']) == 6
    assert float(row['final_eval_loss']) == pytest.approx(evals[6])
    assert float(row['best_eval_loss']) == pytest.approx(min(evals.values()))
  markdown = open(root / 'summary.md').read().splitlines()
  assert markdown[0].startswith('| name | optim.lr | status |')
  assert markdown[2].startswith('| lr=0.003 | 0.0030 | done | 6 |')
  with open(root / 'summary.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize(
    'root, options, named',
    [
        ('/tmp/my sweep', [], "the sweep root '/tmp/my sweep'"),  # a space ends the #SBATCH value
        ('/tmp/a\n#SBATCH --x=1', [], 'the sweep root'),  # a newline would inject a directive
        ('/tmp/100%', [], "contains '%'"),  # % starts a SLURM filename pattern
        ('/tmp/ok', ['--gpus=1\n#SBATCH --account=other'], 'an #SBATCH option'),
    ],
)
def test_slurm_script_refuses_text_sbatch_lines_cannot_hold(root, options, named):
  run = sweep.Run('lr=0.1\nrm -rf ~', {}, '/tmp/ok/run', None, ('python', 'train.py'))
  with pytest.raises(ValueError, match=re.escape(named)):
    sweep.slurm_script([run], root, sbatch_options=options)
  script = sweep.slurm_script([run], '/tmp/ok')
  assert '  0)  # lr=0.1 rm -rf ~\n' in script  # the run name stays in its comment line
