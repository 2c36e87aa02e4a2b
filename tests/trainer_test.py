"""The train step on several meshes, accumulation, non-finite losses, multi-process runs.

Resuming after SIGKILL and other faults: reliability_test.py.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama4_jax import checkpoint, optim, sharding, trainer
from llama4_jax import metrics as metrics_lib
from llama4_jax.data import text as text_data
from llama4_jax.data import tokenizer as tokenizer_lib
from llama4_jax.tools import profiling

import small_run


@pytest.fixture(scope='module')
def batches(tmp_path_factory):
  config = small_run.config()
  tok = tokenizer_lib.load_tokenizer(
      config, config.model.vocab_size, workdir=str(tmp_path_factory.mktemp('run'))
  )
  it = text_data.make_train_iterator(config.data, tok, batch_size=8, seq_len=64, seed=0)
  return [next(it) for _ in range(3)]


def losses_on_mesh(mesh_shape, batches, devices=None, **overrides):
  config = small_run.config(**overrides)
  mesh = sharding.make_mesh(mesh_shape, devices=devices)
  with sharding.mesh_context(mesh):
    setup = trainer.make_setup(config, mesh)
    state = trainer.init_state(setup, seed=0)
    train_fn, _ = trainer.compile_steps(setup)
    out = []
    for batch in batches:
      state, metrics = train_fn(state, sharding.to_global_batch(batch, setup.batch_sharding))
      out.append(float(metrics['loss']))
  return np.array(out), state


@pytest.fixture(scope='module')
def single_device_losses(batches):
  return losses_on_mesh({}, batches, devices=jax.devices()[:1])[0]


# Every mesh axis, alone at full width where it shards weights (fsdp) or experts, and combined.
@pytest.mark.slow
@pytest.mark.parametrize(
    'mesh_shape',
    [
        dict(fsdp=8),
        dict(data=2, expert=4),
        dict(data=2, fsdp=2, tensor=2),
        dict(fsdp=2, expert=2, tensor=2),
    ],
    ids=lambda m: 'x'.join(f'{k}{v}' for k, v in m.items()),
)
def test_sharded_losses_match_single_device(devices, batches, single_device_losses, mesh_shape):
  losses, state = losses_on_mesh(mesh_shape, batches)
  assert single_device_losses[-1] < single_device_losses[0]
  np.testing.assert_allclose(losses, single_device_losses, rtol=2e-5)
  expert_kernel = state['params']['stages'][0]['layers'][1]['ffn']['wi_gate'][...]
  assert len(expert_kernel.sharding.device_set) == 8


@pytest.mark.slow
def test_loss_in_chunks_trains_as_the_whole_loss(devices, batches, single_device_losses):
  """train.loss_chunk takes the logits 16 positions at a time, on 8 devices: same losses."""
  losses, _ = losses_on_mesh(dict(fsdp=8), batches, train__loss_chunk=16)
  np.testing.assert_allclose(losses, single_device_losses, rtol=2e-5)


@pytest.mark.slow
def test_gradient_accumulation_and_expert_parallelism_keep_aux_losses_exact(devices, batches):
  """With the MoE auxiliary losses on: 4 micro-batches, or experts over 4 devices, change nothing."""
  aux = dict(train__load_balance_coef=0.1, train__router_z_coef=0.01)
  single, _ = losses_on_mesh({}, batches, devices=jax.devices()[:1], **aux)
  accumulated, _ = losses_on_mesh(
      {}, batches, devices=jax.devices()[:1], train__grad_accum_steps=4, **aux
  )
  expert_parallel, _ = losses_on_mesh(dict(data=2, expert=4), batches, **aux)
  np.testing.assert_allclose(accumulated, single, rtol=2e-5)
  np.testing.assert_allclose(expert_parallel, single, rtol=2e-5)


@pytest.mark.slow
def test_bf16_compute_with_remat_trains(devices, batches):
  losses, state = losses_on_mesh(
      dict(fsdp=8), batches, model__dtype='bfloat16', model__remat='full'
  )
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert jax.tree.leaves(state['params'])[0].dtype == np.float32


@pytest.mark.parametrize('platform', ['cpu', 'tpu'])
def test_a_nonfinite_step_leaves_the_state_as_it_was(monkeypatch, platform):
  """CPUs skip the update as a branch, TPUs and GPUs select the old state after it."""
  monkeypatch.setattr(sharding, 'platform', lambda: platform)
  state = ({'w': jnp.arange(4.0)}, (jnp.ones(3), jnp.int32(7)))
  update = lambda params, opt: ({'w': params['w'] - 1}, (opt[0] * 2, opt[1] + 1))
  step = jax.jit(lambda finite, state: trainer.update_if(finite, update, *state))
  for finite, want in ((True, update(*state)), (False, state)):
    got = step(finite, state)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), got, want))
  lowered = step.lower(True, state).as_text()
  assert ('stablehlo.case' in lowered) == (platform == 'cpu')


def test_the_whole_state_update_is_in_the_optimizer_scope(batches):
  """The step profiler (`tools/profiling.py`) sorts ops by named scope, so every new value of
  the train state, the non-finite guard's select included, must come from an op under
  'optimizer'. The guard was outside it: 80m-e32's profile counted 0.3 s of AdamW as "other"."""
  config = small_run.config()
  mesh = sharding.make_mesh(config.mesh)
  with sharding.mesh_context(mesh):
    setup = trainer.make_setup(config, mesh)
    state = trainer.init_state(setup, seed=0)
    train_fn, _ = trainer.compile_steps(setup)
    batch = sharding.to_global_batch(batches[0], setup.batch_sharding)
    text = train_fn.lower(state, batch).compile().as_text()
  paths = profiling._op_paths(text)
  entry = text[text.index('\nENTRY ') :]
  outputs = re.search(r'ROOT .* tuple\((.*)\)', entry).group(1)  # (new state, metrics)
  new_state = re.findall(r'%([\w.\-]+)', outputs)[: len(jax.tree.leaves(state))]

  def producer(op):  # a copy that XLA inserted has no name path: what does it copy?
    while not paths[op] and (copied := re.search(rf'%{re.escape(op)} = .* copy\(%(\S+)\)', entry)):
      op = copied.group(1)
    return op

  outside = [
      (op, paths[producer(op)]) for op in new_state if '/optimizer' not in paths[producer(op)]
  ]
  assert new_state and not outside, outside


def final_params(workdir):
  return small_run.saved_params(workdir, checkpoint.latest_step(str(workdir)))


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step(tmp_path):
  result = small_run.run_train(
      tmp_path,
      optim__lr=1e30,
      optim__warmup_steps=0,
      optim__clip_norm=0.0,
      train__checkpoint_every=1,
  )
  assert result.returncode == 1
  message = [line for line in result.stderr.splitlines() if line.startswith('error:')][-1]
  assert 'non-finite' in message and 'at step' in message
  failed_step = int(message.split('at step ')[1].split()[0])
  saved = checkpoint.all_steps(str(tmp_path))
  assert all(step < failed_step for step in saved)
  for value in final_params(tmp_path).values() if saved else []:
    assert np.all(np.isfinite(value))


@pytest.mark.slow
def test_skip_nonfinite_counts_skipped_steps(tmp_path):
  """Every update after the first is non-finite: each step adds one to the run's count, and
  a run resumed from step 4 counts on as the uninterrupted one did."""
  overrides = dict(
      optim__lr=1e30, optim__warmup_steps=0, optim__clip_norm=0.0, train__skip_nonfinite=True
  )
  result = small_run.run_train(tmp_path, **overrides)
  assert result.returncode == 0, result.stderr[-2000:]
  logs = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl') if '"loss"' in line]
  assert [row['skipped_steps'] for row in logs] == [0, 1, 2, 3, 4, 5]
  shutil.rmtree(os.path.join(checkpoint.checkpoint_root(str(tmp_path)), '6'))
  resumed = small_run.run_train(tmp_path, **overrides)
  assert resumed.returncode == 0 and 'resumed from step 4' in resumed.stdout, resumed.stderr
  relogged = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl') if '"loss"' in line]
  assert [row['skipped_steps'] for row in relogged] == [0, 1, 2, 3, 4, 5]
  # The logged learning rate is the one each update applied: the schedule counts applied
  # updates only (a row per step: train.log_every is 1).
  config = small_run.config(optim__lr=1e30, optim__warmup_steps=0)
  schedule = optim.learning_rate_schedule(config.optim, config.train.steps)
  assert [row['step'] for row in logs] == list(range(1, config.train.steps + 1))
  skipped_before = 0
  for row in logs:
    applied_before = row['step'] - 1 - skipped_before
    assert row['learning_rate'] == pytest.approx(float(schedule(applied_before)), rel=1e-6)
    skipped_before = row['skipped_steps']


def test_throughput_times_the_train_steps_alone(tmp_path, monkeypatch):
  """tokens_per_sec (and mfu) leave out the compile, evaluations and saves: a window after a
  slow evaluation reads like any other."""
  evaluate = trainer.evaluate

  def slow_evaluate(*args):
    time.sleep(2.0)
    return evaluate(*args)

  monkeypatch.setattr(trainer, 'evaluate', slow_evaluate)
  config = small_run.config(train__steps=6, train__eval_every=2)
  trainer.train_and_evaluate(config, str(tmp_path))
  rows = [row for row in metrics_lib.read_metrics(str(tmp_path)) if 'tokens_per_sec' in row]
  tokens_per_step = config.train.batch_size * config.data.seq_len
  seconds = {row['step']: tokens_per_step / row['tokens_per_sec'] for row in rows}
  assert sorted(seconds) == [1, 2, 3, 4, 5, 6]
  # Step 1 would hold the compile, steps 3 and 5 the evaluations of steps 2 and 4 (2 s each).
  assert max(seconds.values()) < 1.0, seconds


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def logged_losses(workdir):
  return np.array(
      [json.loads(line)['loss'] for line in open(workdir / 'metrics.jsonl') if '"loss"' in line]
  )


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  """2 CPU processes x 4 devices (gloo collectives) give the losses of 1 process x 8.

  The mesh's tensor axis of 8 spans both processes, as Maverick's tensor axis of 4 spans
  v5p hosts: every device holds every row, so each process feeds the whole batch, alike
  (sharding.process_batch_rows). Feeding a block of rows each, they gave their shared shards
  different rows."""
  single_mesh, multi_mesh = dict(mesh__fsdp=-1), dict(mesh__fsdp=1, mesh__tensor=8)
  single = small_run.run_train(tmp_path / 'single', devices=8, train__steps=4, **single_mesh)
  assert single.returncode == 0, single.stderr[-3000:]

  env = small_run.script_env(devices=4)
  port = free_port()
  processes = [
      subprocess.Popen(
          small_run.train_command(tmp_path / 'multi', train__steps=4, **multi_mesh)
          + [f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'],
          cwd=small_run.REPO,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=300) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  assert '8 devices' in outputs[0][0]
  for key in ('loss', 'eval_loss'):
    logged = [
        [row[key] for row in metrics_lib.read_metrics(str(tmp_path / run)) if key in row]
        for run in ('multi', 'single')
    ]
    assert logged[1], key
    np.testing.assert_allclose(*logged, rtol=1e-5, err_msg=key)
  # Resumed by one process, the 2-process run's data goes on where it stopped (the input
  # state is global): its next steps are those of the single-process run resumed alike.
  for run, mesh in (('single', single_mesh), ('multi', multi_mesh)):
    resumed = small_run.run_train(tmp_path / run, devices=8, train__steps=7, **mesh)
    assert resumed.returncode == 0 and 'resumed from step 4' in resumed.stdout, resumed.stderr
  np.testing.assert_allclose(
      logged_losses(tmp_path / 'multi'), logged_losses(tmp_path / 'single'), rtol=1e-5
  )
  assert len(logged_losses(tmp_path / 'multi')) == 7


@pytest.mark.slow
def test_a_resume_logs_each_step_once_and_the_evaluation_it_missed(tmp_path):
  """A resumed run drops the rows its predecessor logged after the last checkpoint (it logs
  those steps again), and evaluates that checkpoint's step if the predecessor stopped between
  the save and the evaluation."""
  first = small_run.run_train(tmp_path, train__steps=4, train__eval_every=2)
  assert first.returncode == 0, first.stderr[-3000:]
  rows = metrics_lib.read_metrics(str(tmp_path))
  [eval_4] = [row['eval_loss'] for row in rows if row['step'] == 4 and 'eval_loss' in row]
  # As if killed after step 4's checkpoint, before its evaluation, with a step 5 logged and a
  # line cut short: the state a run with more steps and a crash at the wrong moment leaves.
  cut = [row for row in rows if not (row['step'] == 4 and 'eval_loss' in row)]
  cut.append({'step': 5, 'loss': 1.0})
  text = ''.join(json.dumps(row) + '\n' for row in cut) + '{"step": 6, "lo'
  (tmp_path / 'metrics.jsonl').write_text(text)
  again = small_run.run_train(tmp_path, train__steps=4, train__eval_every=2)
  assert again.returncode == 0, again.stderr[-3000:]
  rows = metrics_lib.read_metrics(str(tmp_path))
  assert max(row['step'] for row in rows) == 4
  assert [row['eval_loss'] for row in rows if row['step'] == 4 and 'eval_loss' in row] == [eval_4]
  assert (tmp_path / 'metrics.jsonl').read_text().endswith('\n')
  # Resumed again, with nothing missing, it evaluates nothing and logs nothing new.
  before = (tmp_path / 'metrics.jsonl').read_text()
  third = small_run.run_train(tmp_path, train__steps=4, train__eval_every=2)
  assert third.returncode == 0, third.stderr[-3000:]
  assert (tmp_path / 'metrics.jsonl').read_text() == before


@pytest.mark.slow
def test_init_from_another_run_and_keep_last_checkpoints(tmp_path):
  first = small_run.run_train(tmp_path / 'first', train__steps=6, train__keep_checkpoints=2)
  assert first.returncode == 0, first.stderr[-3000:]
  assert checkpoint.all_steps(str(tmp_path / 'first')) == [4, 6]
  # Fine-tuning with a zero learning rate keeps the initial parameters exactly.
  second = small_run.run_train(
      tmp_path / 'second', train__steps=1, optim__lr=0.0, train__init_from=str(tmp_path / 'first')
  )
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'initialised from' in second.stdout
  small_run.assert_same_params(final_params(tmp_path / 'first'), final_params(tmp_path / 'second'))
