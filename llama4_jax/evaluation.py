"""Scoring checkpoints: mean next-token NLL (nats/token), perplexity, token counts.

Training's validation and scripts/eval.py share `make_eval_step` and
`evaluate`; `CheckpointEvaluator` restores a workdir's checkpoints onto the
run's mesh and scores them on fixed batches, compiling once for all steps.
"""

import contextlib
import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from llama4_jax import checkpoint, config_lib, data, image_text, losses
from llama4_jax import model as model_lib
from llama4_jax import sharding
from llama4_jax import tokenizer as tokenizer_lib
from llama4_jax import workdir as workdir_lib

STEP_TABLE = 'eval_steps'  # .md, .csv and .png of `write_step_table`


# Token windows -----------------------------------------------------------------


def token_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Consecutive non-overlapping windows of seq_len + 1 tokens; the remainder is dropped."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f'expected a 1-D array of token ids, got shape {tokens.shape}')
  n = len(tokens) // (seq_len + 1)
  if n == 0:
    raise ValueError(f'{len(tokens)} tokens are fewer than one window of seq_len + 1 = '
                     f'{seq_len + 1}')
  return tokens[:n * (seq_len + 1)].reshape(n, seq_len + 1)


def windows_to_batches(windows: np.ndarray, batch_size: int) -> Iterable[dict[str, np.ndarray]]:
  """Batches of inputs/targets/weights; the last batch is padded with weight-0 rows."""
  for start in range(0, len(windows), batch_size):
    rows = windows[start:start + batch_size]
    weights = np.ones((len(rows), rows.shape[1] - 1), np.float32)
    if len(rows) < batch_size:
      pad = batch_size - len(rows)
      rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), rows.dtype)])
      weights = np.concatenate([weights, np.zeros((pad, weights.shape[1]), np.float32)])
    yield {'inputs': rows[:, :-1].astype(np.int32), 'targets': rows[:, 1:].astype(np.int32),
           'weights': weights}


def read_token_file(path: str, vocab_size: int) -> np.ndarray:
  """A 1-D integer token array from a .npy file, every id in [0, vocab_size)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  if os.path.getsize(path) == 0:
    raise ValueError(f'{path}: file is empty')
  try:
    tokens = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f'{path}: not a readable .npy array ({e})') from None
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
    raise ValueError(f'{path}: expected a non-empty 1-D integer array, got {tokens.dtype} of '
                     f'shape {tokens.shape}')
  if tokens.min() < 0 or tokens.max() >= vocab_size:
    raise ValueError(f'{path}: token ids must lie in [0, {vocab_size}), '
                     f'found [{tokens.min()}, {tokens.max()}]')
  return tokens


# The step and the loop -----------------------------------------------------------


def make_eval_step(graphdef, param_shardings=None, batch_sharding=None):
  """Jitted (params, batch) -> (sum of weighted next-token NLL, sum of weights).

  With shardings (training, or a restored run on its mesh) the inputs are
  pinned to them; without, arrays stay where they are.
  """

  def eval_step(params, batch):
    model = nnx.merge(graphdef, params)
    logits_BTV, _ = model(batch['inputs'], batch.get('segment_ids'), batch.get('pixels'))
    return losses.cross_entropy_sums(logits_BTV, batch['targets'], batch['weights'])

  if param_shardings is None:
    return jax.jit(eval_step)
  return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding))


def make_row_score_fn(graphdef, params):
  """Jitted batch -> per-row summed log-likelihood of the weighted targets [B]."""

  @jax.jit
  def score(params, batch):
    model = nnx.merge(graphdef, params)
    logits_BTV, _ = model(batch['inputs'], batch.get('segment_ids'), batch.get('pixels'))
    return jnp.sum(losses.target_log_probs(logits_BTV, batch['targets']) * batch['weights'], axis=-1)

  return lambda batch: score(params, batch)


def evaluate(eval_fn, params, batches: Iterable[dict[str, np.ndarray]],
             batch_sharding=None) -> dict[str, float]:
  """Mean NLL (nats per predicted token), perplexity and token count over batches.

  Batches are process-local rows; with `batch_sharding` they are assembled into
  global arrays (every process must pass the same number of batches).
  """
  sums = []
  for batch in batches:
    if batch_sharding is None:
      batch = {k: jnp.asarray(v) for k, v in batch.items()}
    else:
      batch = sharding.to_global_batch(batch, batch_sharding)
    sums.append(eval_fn(params, batch))  # no host sync per batch: dispatch runs ahead
  nll, count = np.sum(np.asarray(jax.device_get(sums), np.float64).reshape(-1, 2), axis=0)
  if count == 0:
    raise ValueError('no tokens to evaluate')
  loss = float(nll / count)
  return {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)), 'tokens': int(count)}


def evaluate_batches(model, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
  """`evaluate` of an in-memory model, on whatever devices its arrays are."""
  graphdef, params = nnx.split(model)
  return evaluate(make_eval_step(graphdef), params, batches)


# Restoring a run -------------------------------------------------------------------


def eval_mesh(config: mlc.ConfigDict, devices: Sequence[jax.Device] | None = None):
  """The run's mesh when the devices fit it, else a mesh of one device."""
  devices = jax.devices() if devices is None else list(devices)
  try:
    return sharding.make_mesh(dict(config.mesh), devices)
  except ValueError:
    return sharding.make_mesh({}, devices[:1])


def batch_devices(mesh: jax.sharding.Mesh) -> int:
  """How many ways the batch dimension is split on `mesh`."""
  return int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))


class TokenIds(NamedTuple):
  """What reading .npy token files needs of a tokenizer, when there is none."""
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int


def run_tokenizer(workdir: str, config: mlc.ConfigDict, path: str = ''):
  """The tokenizer file at `path`, else the run's (`tokenizer.find_run_tokenizer`)."""
  if path and not os.path.exists(path):
    raise FileNotFoundError(f'{path}: tokenizer file not found')
  tokenizer = (tokenizer_lib.Tokenizer.load(path) if path
               else tokenizer_lib.find_run_tokenizer(config, workdir))
  if tokenizer is None:
    cache_dir = config.data.get('tokenizer_cache') or os.path.join(workdir, 'tokenizer')
    raise FileNotFoundError(
        f'{workdir}: no tokenizer: config.data.tokenizer is empty and {cache_dir} holds no '
        f'built-in tokenizer for this model; pass the tokenizer .model file (--tokenizer)')
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f'tokenizer has {tokenizer.vocab_size} ids but the model only '
                     f'{config.model.vocab_size}')
  return tokenizer


def data_tokenizer(workdir: str, config: mlc.ConfigDict, files: str = '', path: str = ''):
  """`run_tokenizer`, or, for .npy token files only, the model's special ids."""
  if files and all(f.endswith('.npy') for f in data.expand_globs(files)):
    try:
      return run_tokenizer(workdir, config, path)
    except FileNotFoundError:
      cfg = config_lib.model_config(config)
      return TokenIds(cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_ids[0], cfg.pad_token_id)
  return run_tokenizer(workdir, config, path)


def eval_batches(config: mlc.ConfigDict, tokenizer, *, files: str = '', batch_size: int,
                 seq_len: int, max_batches: int = 0, workdir: str = ''
                 ) -> list[dict[str, np.ndarray]]:
  """Packed batches of `files` (text, JSONL, .npy globs), or of the run's validation data.

  An image-text run's data (and `files`, one JSON Lines file of image records)
  are scored as its training scored them (image_text.make_eval_batches).
  """
  config = mlc.ConfigDict(config.to_dict())
  if files:
    config.data.eval_files = files
  if image_text.is_image_text(config):
    config.data.seq_len, config.eval.batch_size = seq_len, batch_size
    config.eval.max_batches = max_batches
    return image_text.make_eval_batches(config, config_lib.model_config(config), tokenizer,
                                        workdir=workdir)
  return data.make_eval_batches(config.data, tokenizer, batch_size=batch_size, seq_len=seq_len,
                                max_batches=max_batches)


class CheckpointEvaluator:
  """Restores a workdir's checkpoints on a mesh and scores them; compiles once."""

  def __init__(self, workdir: str, mesh: jax.sharding.Mesh | None = None):
    self.workdir = workdir
    self.config = config_lib.load(workdir)
    self.cfg = config_lib.model_config(self.config)
    self.mesh = eval_mesh(self.config) if mesh is None else mesh
    with self.context():
      self._abstract_model = model_lib.abstract_model(self.cfg)
      graphdef, abstract_params = nnx.split(self._abstract_model)
      param_shardings = sharding.state_shardings(abstract_params, self.mesh)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self._eval_fn = make_eval_step(graphdef, param_shardings, self.batch_sharding)

  @contextlib.contextmanager
  def context(self):
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(sharding.LOGICAL_RULES):
      yield

  def steps(self, step: int | None = None, all_steps: bool = False) -> list[int]:
    """The saved steps to score: all, `step`, or the newest; errors name what is saved."""
    if all_steps:
      saved = checkpoint.all_steps(self.workdir)
      if not saved:
        raise FileNotFoundError(f'{checkpoint.checkpoint_root(self.workdir)}: no complete '
                                f'checkpoint')
      return saved
    return [workdir_lib.resolve_checkpoint(self.workdir, step)[1]]

  def batches(self, *, files: str = '', tokens: str = '', tokenizer: str = '',
              seq_len: int | None = None, batch_size: int | None = None,
              max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
    """The batches to score (see scripts/eval.py); None = the run's setting.

    Default data is the run's validation data with `eval.max_batches` batches,
    as in training; `files` (globs) and `tokens` (a .npy token stream cut into
    windows) are scored whole unless `max_batches` is given.
    """
    config, cfg = self.config, self.cfg
    if tokens and files:
      raise ValueError('give tokens or files, not both')
    seq_len = seq_len or config.data.seq_len
    if not 0 < seq_len <= cfg.max_position_embeddings:
      raise ValueError(f'seq_len={seq_len} must lie in [1, max_position_embeddings='
                       f'{cfg.max_position_embeddings}]')
    # Rows are split over the mesh's batch devices: round the batch up to fill them.
    shards = batch_devices(self.mesh)
    batch_size = -(-(batch_size or config.eval.batch_size) // shards) * shards
    if max_batches is None:
      max_batches = 0 if (files or tokens) else config.eval.max_batches
    if tokens:
      windows = token_windows(read_token_file(tokens, cfg.vocab_size), seq_len)
      batches = list(windows_to_batches(windows, batch_size))
      return batches[:max_batches] if max_batches else batches
    return eval_batches(config, data_tokenizer(self.workdir, config, files, tokenizer),
                        files=files, batch_size=batch_size, seq_len=seq_len,
                        max_batches=max_batches, workdir=self.workdir)

  def score(self, step: int, batches: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """{'step', 'loss', 'perplexity', 'tokens'} of checkpoint `step` on `batches`."""
    path, step = workdir_lib.resolve_checkpoint(self.workdir, step)
    with self.context():
      model = workdir_lib.load_params_into(self._abstract_model, path, self.mesh)
      result = evaluate(self._eval_fn, nnx.state(model), batches, self.batch_sharding)
    return {'step': step, **result}


def evaluate_workdir(workdir: str, *, step: int | None = None, all_steps: bool = False,
                     tag: str = '', table_dir: str | None = None, log=print,
                     **batch_args) -> list[dict[str, float]]:
  """Scores the chosen checkpoints of a workdir; logs them to its TensorBoard.

  Returns one row {'step', 'loss', 'perplexity', 'tokens'} per checkpoint;
  with `all_steps`, also writes the loss-versus-step table to `table_dir`
  (default: the workdir). `batch_args` go to `CheckpointEvaluator.batches`.
  The TensorBoard tag prefix `tag` defaults to `eval` for the run's validation
  data and `eval_files` / `eval_tokens` for other data.
  """
  if not tag:
    tag = ('eval_files' if batch_args.get('files') else
           'eval_tokens' if batch_args.get('tokens') else 'eval')
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'{workdir}: no such workdir')
  if all_steps and step is not None:
    raise ValueError('give a step or all steps, not both')
  evaluator = CheckpointEvaluator(workdir)
  steps = evaluator.steps(step, all_steps)  # checked before the data is read
  batches = evaluator.batches(**batch_args)
  rows = []
  for s in steps:
    rows.append(evaluator.score(s, batches))
    log(json.dumps(rows[-1]))
  write_tensorboard(workdir, rows, tag)
  if all_steps:
    log('wrote ' + ', '.join(write_step_table(rows, table_dir or workdir)))
  return rows


# Reports ---------------------------------------------------------------------------


def write_tensorboard(workdir: str, rows: Sequence[dict], tag: str = 'eval'):
  """`tag`/loss and `tag`/perplexity at each row's step, in <workdir>/tensorboard."""
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))
  for row in rows:
    writer.add_scalar(f'{tag}/loss', row['loss'], row['step'])
    writer.add_scalar(f'{tag}/perplexity', row['perplexity'], row['step'])
  writer.close()


def write_step_table(rows: Sequence[dict], out_dir: str) -> list[str]:
  """Loss versus step as Markdown, CSV and a PNG plot; returns the three paths."""
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, STEP_TABLE)
  columns = ('step', 'loss', 'perplexity', 'tokens')
  with open(base + '.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, columns, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  lines = ['| step | loss | perplexity | tokens |', '| ---: | ---: | ---: | ---: |']
  lines += [f'| {r["step"]} | {r["loss"]:.4f} | {r["perplexity"]:.2f} | {r["tokens"]} |'
            for r in rows]
  with open(base + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # files only, no display
  from matplotlib import pyplot as plt, ticker  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r['step'] for r in rows], [r['loss'] for r in rows], marker='o')
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats/token)')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(base + '.png', dpi=100)
  plt.close(fig)
  return [base + '.md', base + '.csv', base + '.png']
