"""Run logs: metrics.jsonl (one JSON object per logged step), TensorBoard, a progress bar."""

import json
import os

import tqdm

METRICS_FILE = 'metrics.jsonl'  # in the workdir; sweep summaries read it


class MetricsWriter:
  """Appends metrics to <workdir>/metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # imported here: only process 0 writes logs
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self._jsonl.flush()
    for key, value in metrics.items():
      if isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)
      elif key == 'expert_load':  # [moe layers][experts] fractions: log the imbalance
        self._tb.add_scalar('moe/max_expert_load', max(max(row) for row in value), step)
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def progress_bar(start: int, total: int, enabled: bool = True) -> tqdm.tqdm:
  return tqdm.tqdm(initial=start, total=total, disable=not enabled, dynamic_ncols=True,
                   desc='train', unit='step')
