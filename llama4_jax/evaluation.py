"""Scoring checkpoints: mean next-token NLL (nats/token), perplexity, token counts.

Training's validation and scripts/eval.py share `make_eval_step` and
`evaluate`; `CheckpointEvaluator` restores a workdir's checkpoints onto the
run's mesh and scores them on fixed batches, compiling once for all steps;
`evaluate_workdir` is scripts/eval.py.
"""

import json
import math
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from etils import epath
from flax import nnx

from llama4_jax import checkpoint, config_lib, losses, sharding
from llama4_jax import metrics as metrics_lib
from llama4_jax import model as model_lib
from llama4_jax import workdir as workdir_lib
from llama4_jax.data import pipeline
from llama4_jax.data import text as text_data
from llama4_jax.data import tokenizer as tokenizer_lib
from llama4_jax.tools import tables

STEP_TABLE = 'eval_steps'  # .md, .csv and .png of `evaluate_workdir(all_steps=True)`


# The step and the loop -----------------------------------------------------------


def make_eval_step(graphdef, param_shardings=None, batch_sharding=None, loss_chunk: int = 0):
  """Jitted (params, batch) -> (sum of weighted next-token NLL, sum of weights).

  With shardings (training, or a restored run on its mesh) the inputs are
  pinned to them; without, arrays stay where they are. The logits are computed
  `loss_chunk` positions at a time, as in training (train.loss_chunk), where that
  divides the batch's length; else all at once.
  """

  def eval_step(params, batch):
    model = nnx.merge(graphdef, params)
    h_BTD, _ = model.hidden_states(batch['inputs'], batch.get('segment_ids'), batch.get('pixels'))
    chunk = loss_chunk if loss_chunk and h_BTD.shape[1] % loss_chunk == 0 else 0
    return losses.chunked_cross_entropy_sums(
        model.logits, h_BTD, batch['targets'], batch['weights'], chunk
    )

  if param_shardings is None:
    return jax.jit(eval_step)
  return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding))


def make_row_score_fn(graphdef, params):
  """Jitted batch -> per-row summed log-likelihood of the weighted targets [B]."""

  @jax.jit
  def score(params, batch):
    model = nnx.merge(graphdef, params)
    logits_BTV, _ = model(batch['inputs'], batch.get('segment_ids'), batch.get('pixels'))
    return jnp.sum(
        losses.target_log_probs(logits_BTV, batch['targets']) * batch['weights'], axis=-1
    )

  return lambda batch: score(params, batch)


def evaluate(
    eval_fn,
    params,
    batches: Iterable[dict[str, np.ndarray]],
    batch_sharding=None,
    global_rows: int | None = None,
) -> dict[str, float]:
  """Mean NLL (nats per predicted token), perplexity and token count over batches.

  Batches are process-local rows; with `batch_sharding` they are assembled into
  global arrays of `global_rows` (None: one process holds them all; every process
  must pass the same number of batches).
  """
  sums = []
  for batch in batches:
    if batch_sharding is None:
      batch = {k: jnp.asarray(v) for k, v in batch.items()}
    else:
      batch = sharding.to_global_batch(batch, batch_sharding, global_rows)
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


class CheckpointEvaluator:
  """Restores a workdir's checkpoints on a mesh and scores them; compiles once."""

  def __init__(self, workdir: str, mesh: jax.sharding.Mesh | None = None):
    self.workdir = workdir
    self.config = config_lib.load(workdir)
    self.cfg = config_lib.model_config(self.config)
    self.mesh = eval_mesh(self.config) if mesh is None else mesh
    with sharding.mesh_context(self.mesh):
      self._abstract_model = model_lib.abstract_model(self.cfg)
      graphdef, abstract_params = nnx.split(self._abstract_model)
      param_shardings = sharding.state_shardings(abstract_params, self.mesh)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self._eval_fn = make_eval_step(
        graphdef, param_shardings, self.batch_sharding, self.config.train.get('loss_chunk', 0)
    )

  def steps(self, step: int | None = None, all_steps: bool = False) -> list[int | None]:
    """The saved steps to score: all, `step`, or [None], the newest readable one; errors
    name what is saved."""
    if all_steps:
      return checkpoint.saved_steps(self.workdir)
    if step is None:
      checkpoint.saved_steps(self.workdir)  # raises if there is none
      return [None]
    return [checkpoint.resolve_checkpoint(self.workdir, step)[1]]

  def batches(
      self,
      *,
      files: str = '',
      tokens: str = '',
      tokenizer: str = '',
      seq_len: int | None = None,
      batch_size: int | None = None,
      max_batches: int | None = None,
  ) -> list[dict[str, np.ndarray]]:
    """The batches to score (see scripts/eval.py); None = the run's setting.

    Default data is the run's validation data with `eval.max_batches` batches,
    as in training; `files` (globs) and `tokens` (a .npy token stream cut into
    windows that share their end tokens: each prediction once) are scored whole
    unless `max_batches` is given.
    """
    config, cfg = self.config, self.cfg
    if tokens and files:
      raise ValueError('give tokens or files, not both')
    seq_len = seq_len or config.data.seq_len
    if not 0 < seq_len <= cfg.max_position_embeddings:
      raise ValueError(
          f'seq_len={seq_len} must lie in [1, max_position_embeddings='
          f'{cfg.max_position_embeddings}]'
      )
    batch_size = batch_size or config.eval.batch_size
    # Rows are split over the mesh's batch devices: padding rows (weight 0) fill them, so the
    # loss does not depend on the number of devices.
    filled = sharding.fill_batch_shards(batch_size, sharding.batch_shards(self.mesh))
    rows = text_data.BatchRows(np.arange(filled), filled)
    if max_batches is None:
      max_batches = 0 if (files or tokens) else config.eval.max_batches
    if tokens:
      windows = text_data.token_windows(text_data.read_token_file(tokens, cfg.vocab_size), seq_len)
      batches = text_data.windows_to_batches(windows, batch_size, seq_len)
      batches = batches[:max_batches] if max_batches else batches
      return [text_data.take_rows(batch, rows) for batch in batches]
    tokenizer = tokenizer_lib.tokenizer_for_files(self.workdir, config, files, tokenizer)
    return pipeline.eval_batches(
        config,
        cfg,
        tokenizer,
        files=files,
        batch_size=batch_size,
        seq_len=seq_len,
        max_batches=max_batches,
        workdir=self.workdir,
        rows=rows,
    )

  def score(self, step: int | None, batches: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """{'step', 'loss', 'perplexity', 'tokens'} of checkpoint `step` (None: the newest
    readable) on `batches`."""
    with sharding.mesh_context(self.mesh):
      model, step = workdir_lib.load_checkpoint(self.workdir, self._abstract_model, step, self.mesh)
      result = evaluate(self._eval_fn, nnx.state(model), batches, self.batch_sharding)
    return {'step': step, **result}


def evaluate_workdir(
    workdir: str,
    *,
    step: int | None = None,
    all_steps: bool = False,
    tag: str = '',
    table_dir: str | None = None,
    log=print,
    **batch_args,
) -> list[dict[str, float]]:
  """Scores the chosen checkpoints of a workdir; logs them to its TensorBoard.

  Returns one row {'step', 'loss', 'perplexity', 'tokens'} per checkpoint;
  with `all_steps`, also writes the loss-versus-step table to `table_dir`
  (default: the workdir). `batch_args` go to `CheckpointEvaluator.batches`.
  The TensorBoard tag prefix `tag` defaults to `eval` for the run's validation
  data and `eval_files` / `eval_tokens` for other data.
  """
  if not tag:
    tag = (
        'eval_files'
        if batch_args.get('files')
        else 'eval_tokens'
        if batch_args.get('tokens')
        else 'eval'
    )
  if not epath.Path(workdir).is_dir():
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
  metrics_lib.write_tensorboard(workdir, rows, tag)
  if all_steps:
    log('wrote ' + ', '.join(write_step_table(rows, table_dir or workdir)))
  return rows


def write_step_table(rows: Sequence[dict], out_dir: str) -> list[str]:
  """Loss versus step as Markdown, CSV and a PNG plot; returns the three paths."""
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  base = str(epath.Path(out_dir) / STEP_TABLE)  # the workdir by default: any epath path
  paths = tables.write_table(rows, ('step', 'loss', 'perplexity', 'tokens'), base)
  loss = tables.Series('loss', [r['loss'] for r in rows], 'o-')
  panel = tables.Panel([r['step'] for r in rows], [loss], 'step', 'loss (nats/token)')
  return paths + [tables.write_plot([panel], base + '.png')]
