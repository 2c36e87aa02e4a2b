"""Run logs: metrics.jsonl (one JSON object per logged step), TensorBoard, console progress."""

import json
import os
import sys
from collections.abc import Sequence

import tqdm

METRICS_FILE = 'metrics.jsonl'  # in the workdir; sweep summaries read it
TENSORBOARD_DIR = 'tensorboard'  # in the workdir


def tensorboard_writer(workdir: str):
  """A TensorBoard writer for <workdir>/tensorboard."""
  from tensorboardX import SummaryWriter  # imported here: only process 0 writes logs

  return SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))


def _add_scalars(writer, step: int, metrics: dict, prefix: str = ''):
  for key, value in metrics.items():
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      writer.add_scalar(prefix + key, value, step)
    elif key == 'expert_load':  # [moe layers][experts] fractions: log the imbalance
      writer.add_scalar('moe/max_expert_load', max(max(row) for row in value), step)


class MetricsWriter:
  """Appends metrics to <workdir>/metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')
    self._tb = tensorboard_writer(workdir)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self._jsonl.flush()
    _add_scalars(self._tb, step, metrics)
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def write_tensorboard(workdir: str, rows: Sequence[dict], tag: str, keys=('loss', 'perplexity')):
  """`tag`/key at each row's step (evaluation results), in <workdir>/tensorboard."""
  writer = tensorboard_writer(workdir)
  for row in rows:
    _add_scalars(writer, row['step'], {k: row[k] for k in keys}, prefix=f'{tag}/')
  writer.close()


class Progress:
  """Training progress on the console: a progress bar on a terminal, else log lines.

  Cluster logs (SLURM, CI) are not terminals: there a bar's hundreds of redraws become one
  line per logged step.
  """

  def __init__(self, start: int, total: int, enabled: bool = True, stream=None):
    self.stream = stream or sys.stdout
    self.total = total
    self.enabled = enabled
    self.bar = None
    if enabled and self.stream.isatty():
      self.bar = tqdm.tqdm(
          initial=start,
          total=total,
          dynamic_ncols=True,
          desc='train',
          unit='step',
          file=self.stream,
      )

  def log(self, step: int, **fields: str):
    """Shows the latest logged values (the bar's postfix, or one line)."""
    if self.bar is not None:
      self.bar.set_postfix(fields, refresh=False)
    elif self.enabled:
      values = ' '.join(f'{k}={v}' for k, v in fields.items())
      print(f'step {step}/{self.total}: {values}', file=self.stream, flush=True)

  def write(self, message: str):
    """A line of its own (above the bar, if there is one)."""
    if self.bar is not None:
      self.bar.write(message, file=self.stream)
    elif self.enabled:
      print(message, file=self.stream, flush=True)

  def update(self, step: int):
    if self.bar is not None:
      self.bar.update(step - self.bar.n)

  def close(self):
    if self.bar is not None:
      self.bar.close()
