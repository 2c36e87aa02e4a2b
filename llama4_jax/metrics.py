"""Run logs: metrics.jsonl (one JSON object per logged step), TensorBoard, console progress."""

import json
import sys
from collections.abc import Sequence

import tqdm
from etils import epath

METRICS_FILE = 'metrics.jsonl'  # in the workdir; sweep summaries read it
TENSORBOARD_DIR = 'tensorboard'  # in the workdir


def _is_local(path: epath.Path) -> bool:
  return '://' not in str(path)


class _EventFile:
  """A TensorBoard event file written through epath.

  It has no `fileno`: tensorboardX fsyncs any file that has one, and fsspec's files have one
  that raises.
  """

  def __init__(self, path: str):
    self._file = epath.Path(path).open('wb')

  def write(self, data: bytes):
    self._file.write(data)

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


class _EventFiles:
  """tensorboardX's writer factory for a non-local scheme: epath, like every workdir file
  (its own `gs://` writer needs google-cloud-storage and ignores epath's backends)."""

  def open(self, path: str) -> _EventFile:
    return _EventFile(path)

  def directory_check(self, path: str):
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _import_tensorboardx():
  """tensorboardX's writer and writer registry, without importing torch.

  Its writer imports torch when it is installed, only to accept torch tensors (this project
  logs Python numbers); that took 2.8 s of every run's start where torch is installed.
  """
  torch_unseen = 'torch' not in sys.modules
  if torch_unseen:
    sys.modules['torch'] = None  # `import torch` raises ImportError, which tensorboardX expects
  try:
    from tensorboardX import SummaryWriter, record_writer
  finally:
    if torch_unseen:
      del sys.modules['torch']  # a later `import torch` imports it
  return SummaryWriter, record_writer


def tensorboard_writer(workdir: str):
  """A TensorBoard writer for <workdir>/tensorboard (a local or an epath path: gs://...)."""
  SummaryWriter, record_writer = _import_tensorboardx()  # here: only process 0 writes logs

  logdir = epath.Path(workdir) / TENSORBOARD_DIR
  if not _is_local(logdir):
    record_writer.register_writer_factory(str(logdir).split('://')[0], _EventFiles())
  return SummaryWriter(str(logdir))


def _open_to_append(path: epath.Path):
  """`path` opened to add text at its end.

  Object stores cannot append (gcsfs silently truncates a file opened with 'a'), so there
  the saved text is written again first; the store shows the file when the backend uploads
  it (at close, or block by block).
  """
  if _is_local(path) or not path.exists():
    return path.open('a')
  saved = path.read_text()
  file = path.open('w')
  file.write(saved)
  return file


def _add_scalars(writer, step: int, metrics: dict, prefix: str = ''):
  for key, value in metrics.items():
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      writer.add_scalar(prefix + key, value, step)
    elif key == 'expert_load':  # [moe layers][experts] fractions: log the imbalance
      writer.add_scalar('moe/max_expert_load', max(max(row) for row in value), step)


def _rows(text: str) -> list[dict]:
  """The JSON lines of `text`; a last line cut short by a crash is left out."""
  rows = []
  for line in text.splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return rows


def read_metrics(workdir: str) -> list[dict]:
  """The rows of <workdir>/metrics.jsonl (none before it exists), also while a run writes it."""
  path = epath.Path(workdir) / METRICS_FILE
  return _rows(path.read_text()) if path.exists() else []


def _keep_rows_through(workdir: str, step: int):
  """Leaves only whole rows of steps up to `step` in metrics.jsonl, none for step 0: a run
  that starts anew (atomically: a rename)."""
  path = epath.Path(workdir) / METRICS_FILE
  text = path.read_text() if path.exists() else ''
  rows = _rows(text)
  kept = [row for row in rows if row.get('step', 0) <= step] if step else []  # 0: a new run
  if not text or (len(kept) == len(rows) and text.endswith('\n')):
    return
  tmp = path.parent / f'.{METRICS_FILE}.tmp'
  tmp.write_text(''.join(json.dumps(row) + '\n' for row in kept))
  tmp.replace(path)


class MetricsWriter:
  """Appends metrics to <workdir>/metrics.jsonl and TensorBoard (process 0 only).

  Given the step a run resumes at, `start`, it first drops the rows of later steps, which the
  run it resumes logged after its last checkpoint (they are logged again). The workdir may be
  any epath path (gs://...): every file goes through epath.
  """

  def __init__(self, workdir: str, enabled: bool = True, start: int | None = None):
    self.enabled = enabled
    if not enabled:
      return
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    if start is not None:
      _keep_rows_through(workdir, start)
    self._jsonl = _open_to_append(epath.Path(workdir) / METRICS_FILE)
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
