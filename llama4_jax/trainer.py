"""Training: sharded state, the jitted train step, evaluation and the loop.

The train state is one pytree, {'params': nnx.State, 'opt_state': optax state,
'step': int32}, created inside `jax.jit` with out_shardings so it is born
sharded, donated to every step, and checkpointed as a whole.
"""

import contextlib
import dataclasses
import functools
import itertools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from llama4_jax import (
    checkpoint,
    config_lib,
    end_of_run,
    evaluation,
    flops,
    losses,
    optim,
    sharding,
)
from llama4_jax import metrics as metrics_lib
from llama4_jax import model as model_lib
from llama4_jax import workdir as workdir_lib
from llama4_jax.data import image_text, pipeline
from llama4_jax.data import text as text_data
from llama4_jax.data import tokenizer as tokenizer_lib


class TrainingError(ValueError):
  """The run cannot go on (e.g. a non-finite loss); the message names the step."""


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a run: model structure, optimizer, shardings."""

  config: mlc.ConfigDict
  cfg: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  graphdef: Any
  tx: optax.GradientTransformation
  abstract_state: Any
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding


def make_setup(config: mlc.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
  cfg = config_lib.model_config(config)
  graphdef, abstract_params = nnx.split(model_lib.abstract_model(cfg))
  tx = optim.make_optimizer(
      config.optim, config.train.steps, abstract_params, config.train.get('freeze', '')
  )
  abstract_state = {
      'params': abstract_params,
      'opt_state': jax.eval_shape(tx.init, abstract_params),
      'step': jax.ShapeDtypeStruct((), jnp.int32),
  }
  shardings = sharding.state_shardings(abstract_state, mesh)
  return Setup(
      config, cfg, mesh, graphdef, tx, abstract_state, shardings, sharding.batch_sharding(mesh)
  )


def init_state(setup: Setup, seed: int):
  """A fresh train state, created on the devices in its final sharding."""

  @functools.partial(jax.jit, out_shardings=setup.state_shardings)
  def init():
    model = model_lib.Llama4(setup.cfg, rngs=nnx.Rngs(params=jax.random.key(seed)))
    params = nnx.state(model, nnx.Param)
    return {'params': params, 'opt_state': setup.tx.init(params), 'step': jnp.zeros((), jnp.int32)}

  return init()


# The step -----------------------------------------------------------------------


def _moe_terms(stats, train: mlc.ConfigDict):
  """(auxiliary loss, statistics to log) from the stacked per-MoE-layer statistics."""
  if stats is None:
    return jnp.zeros((), jnp.float32), {}
  load_balance = jnp.mean(stats['load_balance_loss'])
  z_loss = jnp.mean(stats['router_z_loss'])
  counts_LE = stats['tokens_per_expert']
  logged = {
      'load_balance_loss': load_balance,
      'router_z_loss': z_loss,
      'dropped_fraction': jnp.mean(stats['dropped_fraction']),
      'expert_load': counts_LE / jnp.maximum(jnp.sum(counts_LE, -1, keepdims=True), 1.0),
  }
  return train.load_balance_coef * load_balance + train.router_z_coef * z_loss, logged


def update_if(finite, update, *state):
  """update(*state) where `finite` is True, else the state as it was."""
  if sharding.platform() == 'cpu':
    # A branch: on CPU a select of the new and old values is a pass of its own over the
    # whole state (AdamW on 200M parameters: 0.42 s with the select, 0.28 s as a branch).
    return jax.lax.cond(finite, update, lambda *old: old, *state)
  # A select: the TPU compiler fuses it into the update, and plans a branch with the old and
  # new state apart (Maverick on a v5p-256: 77.08 GiB per chip, 75.72 as a select).
  return jax.tree.map(lambda new, old: jnp.where(finite, new, old), update(*state), state)


def train_step(state, batch, *, setup: Setup):
  """One optimizer update over the global batch (split into grad_accum_steps micro-batches)."""
  train = setup.config.train
  accum = train.grad_accum_steps
  total_weight = jnp.maximum(jnp.sum(batch['weights']), 1.0)

  def micro_loss(params, micro):
    model = nnx.merge(setup.graphdef, params)
    h_BTD, stats = model.hidden_states(micro['inputs'], micro['segment_ids'], micro.get('pixels'))
    nll_sum, _ = losses.chunked_cross_entropy_sums(
        model.logits, h_BTD, micro['targets'], micro['weights'], train.get('loss_chunk', 0)
    )
    aux_loss, moe_metrics = _moe_terms(stats, train)
    return nll_sum / total_weight + aux_loss / accum, (nll_sum, moe_metrics)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  if accum == 1:
    (_, (nll_sum, moe_metrics)), grads = grad_fn(state['params'], batch)
  else:
    # Micro-batch i takes every accum-th row, so each device keeps its own rows.
    micro_batches = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch
    )

    def accumulate(carry, micro):
      grads, nll_sum = carry
      (_, (nll, moe_metrics)), g = grad_fn(state['params'], micro)
      return (jax.tree.map(jnp.add, grads, g), nll_sum + nll), moe_metrics

    zeros = jax.tree.map(jnp.zeros_like, state['params'])
    (grads, nll_sum), moe_metrics = jax.lax.scan(accumulate, (zeros, 0.0), micro_batches)
    moe_metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), moe_metrics)

  grad_norm = optax.tree.norm(grads)
  loss = nll_sum / total_weight
  # A non-finite loss or gradient never reaches the parameters: the update is
  # skipped here, and the host stops the run or counts the skip (train.skip_nonfinite).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(params, opt_state):
    updates, opt_state = setup.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  with jax.named_scope('optimizer'):
    params, opt_state = update_if(finite, update, state['params'], state['opt_state'])
    new_state = {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}
  # The rate this step's update applied (the schedule's own count: skipped steps do not count).
  lr = optim.learning_rate_schedule(setup.config.optim, train.steps)(
      optim.schedule_step(state['opt_state'])
  )
  metrics = {
      'loss': loss,
      'grad_norm': grad_norm,
      'learning_rate': lr,
      'finite': finite,
      'tokens': total_weight,
      **moe_metrics,
  }
  return new_state, metrics


def compile_steps(setup: Setup):
  """The jitted train and eval steps with pinned shardings; the state is donated."""
  s = setup.state_shardings
  train = jax.jit(
      functools.partial(train_step, setup=setup),
      in_shardings=(s, setup.batch_sharding),
      out_shardings=(s, None),
      donate_argnums=0,
  )
  evaluate = evaluation.make_eval_step(
      setup.graphdef, s['params'], setup.batch_sharding, setup.config.train.get('loss_chunk', 0)
  )
  return train, evaluate


def evaluate(eval_fn, params, batches, batch_sharding, global_rows: int) -> float:
  """Mean validation NLL over the given (process-local) batches (see evaluation.evaluate)."""
  return evaluation.evaluate(eval_fn, params, batches, batch_sharding, global_rows)['loss']


# The loop -------------------------------------------------------------------------


def _gather_strings(text: str) -> list[str]:
  """Every process's string, on every process (for per-process iterator states)."""
  if jax.process_count() == 1:
    return [text]
  raw = np.frombuffer(text.encode(), np.uint8)
  length = int(np.max(multihost_utils.process_allgather(np.array([len(raw)]))))
  padded = np.zeros(length, np.uint8)
  padded[: len(raw)] = raw
  gathered = multihost_utils.process_allgather(padded)
  return [bytes(row).rstrip(b'\0').decode() for row in np.asarray(gathered).reshape(-1, length)]


def _restore_or_init(setup: Setup, ckpt: checkpoint.TrainCheckpointer, train_iter):
  """Resume order: newest checkpoint in the workdir, then train.init_from, then scratch."""
  config = setup.config
  # An unreadable newest checkpoint is skipped (with a warning naming it) for the one before.
  restored = ckpt.restore_latest(setup.abstract_state, setup.state_shardings)
  if restored is not None:
    step, state, data_states = restored
    # Every process reads the global batch and keeps its own rows (data/text.py), so the
    # input state is global: each process saved the same one, and any number of processes
    # resumes it where the run stopped.
    train_iter.set_state(json.loads(data_states[0]))
    return state, f'resumed from step {step}'
  state = init_state(setup, config.seed)
  if config.train.init_from:
    path, from_step = checkpoint.resolve_checkpoint(config.train.init_from)
    state['params'] = checkpoint.load_params_tree(
        path, setup.abstract_state['params'], setup.state_shardings['params']
    )
    return state, f'initialised from {config.train.init_from} (step {from_step})'
  return state, 'initialised from scratch'


def _eval_loss_at(workdir: str, step: int) -> float | None:
  """Step's validation loss in metrics.jsonl (None if it has none), as process 0 reads it, on
  every process."""
  rows = metrics_lib.read_metrics(workdir) if jax.process_index() == 0 else []
  losses = [row['eval_loss'] for row in rows if row.get('step') == step and 'eval_loss' in row]
  found_loss = np.array([bool(losses), losses[-1] if losses else 0.0], np.float64)
  if jax.process_count() > 1:  # a logged NaN is a loss, not a missing row
    found_loss = np.asarray(multihost_utils.broadcast_one_to_all(found_loss))
  return float(found_loss[1]) if found_loss[0] else None


def train_and_evaluate(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final metrics."""
  config = config_lib.with_init_model(config, workdir)
  cfg = config_lib.validate(config, jax.device_count())
  workdir_lib.check_resumable(config, workdir)
  is_main = jax.process_index() == 0
  if is_main:
    config_lib.save(config, workdir)
  train_cfg = config.train
  tokenizer = tokenizer_lib.load_tokenizer(config, cfg.vocab_size, workdir)
  seq_len = config.data.seq_len
  mesh = sharding.make_mesh(dict(config.mesh))
  # Each process feeds the rows of each global batch that its devices hold; evaluation pads
  # its batches with rows of weight 0 to fill the mesh's batch shards.
  train_rows = text_data.BatchRows(
      sharding.process_batch_rows(mesh, train_cfg.batch_size), train_cfg.batch_size
  )
  eval_size = sharding.fill_batch_shards(config.eval.batch_size, sharding.batch_shards(mesh))
  eval_rows = text_data.BatchRows(sharding.process_batch_rows(mesh, eval_size), eval_size)
  train_iter, eval_batches = pipeline.train_and_eval_data(
      config, cfg, tokenizer, workdir, train_rows=train_rows, eval_rows=eval_rows
  )

  ckpt = checkpoint.TrainCheckpointer(workdir, train_cfg.keep_checkpoints)
  with sharding.mesh_context(mesh):
    setup = make_setup(config, mesh)
    state, how = _restore_or_init(setup, ckpt, train_iter)
    train_fn, eval_fn = compile_steps(setup)
    start = int(jax.device_get(state['step']))
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main, start=start)
    peak, peak_source = flops.device_peak_flops()
    flops_per_token = (
        flops.train_flops_per_row(cfg, seq_len, image_text.tiles_per_row(config, cfg)) / seq_len
    )  # images included
    num_params = model_lib.count_params(setup.abstract_state['params'])
    if is_main:
      print(
          f'{how}; {jax.device_count()} devices, mesh {dict(mesh.shape)}; '
          f'{num_params:,} parameters; '
          f'MFU against {peak * jax.device_count() / 1e9:.1f} GFLOP/s ({peak_source})',
          flush=True,
      )

    progress = metrics_lib.Progress(start, train_cfg.steps, enabled=is_main)
    tokens_per_step = train_cfg.batch_size * seq_len
    # Steps whose update was left out, over the whole run: the schedule counts applied ones.
    skipped = start - int(jax.device_get(optim.schedule_step(state['opt_state'])))
    final = {}

    def evaluate_and_log(step: int, params, note: str = '') -> float:
      eval_loss = evaluate(
          eval_fn, params, eval_batches, setup.batch_sharding, eval_rows.global_size
      )
      writer.write(step, {'eval_loss': eval_loss})
      progress.write(f'step {step}: validation loss {eval_loss:.4f}{note}')
      return eval_loss

    def is_eval_step(step: int) -> bool:
      return bool(train_cfg.eval_every and step % train_cfg.eval_every == 0) or (
          step == train_cfg.steps
      )

    before = {}
    if train_cfg.init_from:  # what fine-tuning starts from, to compare with (logged at step 0)
      loss = (
          _eval_loss_at(workdir, 0) if start else evaluate_and_log(0, state['params'], f' ({how})')
      )
      if loss is not None:
        before['eval_loss_before'] = loss
    if start and is_eval_step(start) and _eval_loss_at(workdir, start) is None:
      # The run it resumes stopped between this step's checkpoint and its evaluation.
      final['eval_loss'] = evaluate_and_log(start, state['params'])
    try:
      batches = (
          sharding.to_global_batch(b, setup.batch_sharding, train_rows.global_size)
          for b in train_iter
      )
      if start < train_cfg.steps:  # compiled on the first batch before the clock starts
        first = next(batches)
        train_fn = train_fn.lower(state, first).compile()
        batches = itertools.chain([first], batches)
      # tokens_per_sec and mfu time the train steps of each logging window: not the compile,
      # the evaluations or the checkpoint saves (`paused`).
      window_start, window_steps, paused = time.perf_counter(), 0, 0.0
      unchecked = []  # (step, metrics) whose finiteness the host has not looked at yet
      # zip asks the range first: no batch is drawn past the last step.
      for step, batch in zip(range(start + 1, train_cfg.steps + 1), batches):
        state, metrics = train_fn(state, batch)
        unchecked.append((step, metrics))
        window_steps += 1
        must_save = step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps
        must_log = step % train_cfg.log_every == 0 or step == train_cfg.steps
        # Look at finished steps while this one runs; wait for this one only before
        # logging or saving it, so that no checkpoint follows a non-finite step.
        to_check = unchecked if (must_save or must_log) else unchecked[:-1]
        for s, m in to_check:
          if not bool(m['finite']):
            if not train_cfg.skip_nonfinite:
              ckpt.wait()  # the checkpoint the message names is committed
              progress.close()
              raise TrainingError(
                  f'non-finite loss or gradient at step {s} (loss={float(m["loss"])}, '
                  f'grad_norm={float(m["grad_norm"])}); the update was not applied and the last '
                  f'checkpoint is step {ckpt.latest_step()}. Set train.skip_nonfinite=True to skip '
                  f'such updates instead.'
              )
            skipped += 1
        unchecked = unchecked[len(to_check) :]
        if must_log:
          m = jax.device_get(metrics)
          seconds = time.perf_counter() - window_start - paused
          tokens_per_sec = window_steps * tokens_per_step / seconds
          final = {
              'loss': float(m['loss']),
              'learning_rate': float(m['learning_rate']),
              'grad_norm': float(m['grad_norm']),
              'tokens_per_sec': tokens_per_sec,
              'mfu': tokens_per_sec * flops_per_token / (peak * jax.device_count()),
              'skipped_steps': skipped,
          }
          for key in ('load_balance_loss', 'router_z_loss', 'dropped_fraction'):
            if key in m:
              final[key] = float(m[key])
          if 'expert_load' in m:
            final['expert_load'] = np.round(np.asarray(m['expert_load']), 4).tolist()
          writer.write(step, final)
          progress.log(
              step,
              loss=f'{final["loss"]:.3f}',
              tok_s=f'{tokens_per_sec:,.0f}',
              mfu=f'{100 * final["mfu"]:.1f}%',
          )
          window_start, window_steps, paused = time.perf_counter(), 0, 0.0
        if must_save or is_eval_step(step):
          jax.block_until_ready(metrics)  # the step's own time stays in the window
          pause_start = time.perf_counter()
          # Save before evaluating: no evaluation failure stands between a step and its
          # checkpoint.
          if must_save:
            ckpt.save(step, state, _gather_strings(json.dumps(train_iter.get_state())))
          if is_eval_step(step):
            final['eval_loss'] = evaluate_and_log(step, state['params'])
          paused += time.perf_counter() - pause_start
        progress.update(step)
    except BaseException:
      # Let the save in flight finish (its own failure aside: the error under way is the one to
      # report) before the error ends the run.
      with contextlib.suppress(checkpoint.CheckpointError):
        ckpt.wait()
      raise
    progress.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    final['step'] = int(jax.device_get(state['step']))
    final.update(before)
    show_end = end_of_run.wanted(config, num_params, start, jax.process_count())
    params = jax.device_get(state['params']) if show_end else None
  if show_end:
    final.update(end_of_run.report(config, cfg, setup.graphdef, params, tokenizer, workdir))
  return final
