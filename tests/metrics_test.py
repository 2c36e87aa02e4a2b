"""Run logs: console progress off a terminal, metrics.jsonl and TensorBoard."""

import io
import json
import subprocess
import sys

from llama4_jax import metrics

import small_run

REPO = small_run.REPO


class Terminal(io.StringIO):

  def isatty(self):
    return True


def test_progress_off_a_terminal_is_one_line_per_log():
  """SLURM and CI logs get a line per logged step, not a redrawn bar."""
  stream = io.StringIO()
  progress = metrics.Progress(0, 100, stream=stream)
  for step in range(1, 101):
    if step % 20 == 0:
      progress.log(step, loss='1.234')
    progress.update(step)
  progress.write('step 100: validation loss 1.2000')
  progress.close()
  lines = stream.getvalue().splitlines()
  assert lines[:2] == ['step 20/100: loss=1.234', 'step 40/100: loss=1.234']
  assert len(lines) == 6 and lines[-1] == 'step 100: validation loss 1.2000'


def test_progress_on_a_terminal_is_a_bar():
  stream = Terminal()
  progress = metrics.Progress(0, 10, stream=stream)
  progress.log(5, loss='1.0')
  progress.update(5)
  progress.close()
  assert 'step 5/10' not in stream.getvalue() and '5/10' in stream.getvalue()


def test_other_processes_print_nothing():
  stream = io.StringIO()
  progress = metrics.Progress(0, 10, enabled=False, stream=stream)
  progress.log(5, loss='1.0')
  progress.write('hello')
  assert stream.getvalue() == ''


def test_metrics_writer_appends_json_lines(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write(1, {'loss': 2.5, 'expert_load': [[0.25, 0.75]]})
  writer.write(2, {'eval_loss': 2.0})
  writer.close()
  lines = [json.loads(line) for line in open(tmp_path / metrics.METRICS_FILE)]
  assert lines == [
      {'step': 1, 'loss': 2.5, 'expert_load': [[0.25, 0.75]]},
      {'step': 2, 'eval_loss': 2.0},
  ]
  assert list((tmp_path / metrics.TENSORBOARD_DIR).iterdir())


def test_metrics_and_tensorboard_go_to_a_non_local_workdir(fake_gcs):
  """A gs:// workdir: the files land in the store (not in ./gs:/...), and a resumed run's
  metrics.jsonl keeps the lines saved before it although the store cannot append."""
  workdir = 'gs://bucket/run'
  for steps in ([1, 2], [3]):  # a run, then its resumption
    writer = metrics.MetricsWriter(workdir)
    for step in steps:
      writer.write(step, {'loss': 2.5})
    writer.close()
  metrics.write_tensorboard(workdir, [{'step': 3, 'loss': 2.0, 'perplexity': 7.4}], 'eval')
  lines = fake_gcs.cat(f'{workdir}/{metrics.METRICS_FILE}').decode().splitlines()
  assert [json.loads(line)['step'] for line in lines] == [1, 2, 3]
  events = fake_gcs.ls(f'{workdir}/{metrics.TENSORBOARD_DIR}', detail=False)
  assert events and all(fake_gcs.size(e) > 0 for e in events)


def test_tensorboard_writer_does_not_import_torch(tmp_path):
  """tensorboardX imports torch where it is installed (as in the tests' environment), seconds
  of every run's start; the writer leaves it out, and torch still imports afterwards."""
  probe = (
      'import sys; from llama4_jax import metrics\n'
      f'metrics.tensorboard_writer({str(tmp_path)!r}).close()\n'
      'assert "torch" not in sys.modules, "tensorboardX imported torch"\n'
      'import torch; print(torch.__name__)\n'
  )
  result = subprocess.run(
      [sys.executable, '-c', probe], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ['torch']
