"""Faults, each real: SIGKILL (ten times, five of them inside a checkpoint save), damaged
checkpoints, a full disk, a resume on fewer devices, and bit-identical reruns.

Runs are scripts/train.py in subprocesses, started through tests/faulty_train.py (which
skips the start-up MFU peak measurement and can fill the disk), on 1 fake CPU device,
where a short run is cheapest, unless the test is about devices.
"""

import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from llama4_jax import checkpoint, sharding, trainer

import small_run

# Its module fixtures are expensive: one test worker runs the whole file (pyproject.toml).
pytestmark = pytest.mark.xdist_group(__name__)

STEPS = 18
RUN = dict(train__steps=STEPS, train__checkpoint_every=1)
SAVING = '.orbax-checkpoint-tmp'  # Orbax writes checkpoint <step> here, then renames it
RUN_TIMEOUT = 300  # seconds; a hung run fails the test instead of the suite


@pytest.fixture(scope='module')
def tokenizer_cache(tmp_path_factory):
  """One built-in tokenizer for every run of the module (the first run trains it)."""
  return tmp_path_factory.mktemp('tokenizer')


def launch(workdir, tokenizer_cache, devices=1, fault_env=None, **overrides) -> subprocess.Popen:
  """Starts a run printing to <workdir>.log (a file keeps what a killed run said)."""
  flags = small_run.flag_list(**{**RUN, 'data__tokenizer_cache': tokenizer_cache, **overrides})
  env = dict(small_run.script_env(devices), PYTHONUNBUFFERED='1', **(fault_env or {}))
  with open(f'{workdir}.log', 'a') as log:
    return subprocess.Popen(
        [
            sys.executable,
            os.path.join(small_run.REPO, 'tests', 'faulty_train.py'),
            f'--workdir={workdir}',
            *flags,
        ],
        cwd=small_run.REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def log_text(workdir) -> str:
  """What every run in `workdir` printed so far."""
  try:
    with open(f'{workdir}.log') as f:
      return f.read()
  except FileNotFoundError:
    return ''


def run(workdir, tokenizer_cache, **kwargs) -> tuple[int, str]:
  """A run to its end: (exit status, what it printed)."""
  offset = len(log_text(workdir))
  process = launch(workdir, tokenizer_cache, **kwargs)
  try:
    process.wait(timeout=RUN_TIMEOUT)
  finally:
    process.kill()
  return process.returncode, log_text(workdir)[offset:]


def started_from(output: str) -> str | None:
  """What the (last) run says it started from, once it has restored: 'scratch' or a step."""
  found = re.findall(r'resumed from step (\d+)|initialised from scratch', output)
  return (found[-1] or 'scratch') if found else None


def logged_losses(workdir) -> list[tuple[int, float]]:
  """(step, loss) of every logged step; a resumed run logs again the steps it redoes."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(m['step'], m['loss']) for m in map(json.loads, f) if 'loss' in m]


def logged_lines(workdir) -> int:
  """Lines of metrics.jsonl written so far (safe to call while a run appends to it)."""
  try:
    with open(os.path.join(workdir, 'metrics.jsonl'), 'rb') as f:
      return f.read().count(b'\n')
  except FileNotFoundError:
    return 0


def newest(workdir) -> int | None:
  """The newest committed checkpoint: Orbax commits <step> by renaming its temporary directory,
  so a directory named by a number is complete (safe to call while a run saves and deletes)."""
  try:
    steps = [int(name) for name in os.listdir(workdir / 'checkpoints') if name.isdigit()]
  except FileNotFoundError:
    return None
  return max(steps, default=None)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, tokenizer_cache):
  """An uninterrupted run that keeps every checkpoint."""
  workdir = tmp_path_factory.mktemp('runs') / 'reference'
  status, output = run(workdir, tokenizer_cache, train__keep_checkpoints=STEPS)
  assert status == 0, output[-3000:]
  assert checkpoint.all_steps(str(workdir)) == list(range(1, STEPS + 1))
  return workdir


@pytest.mark.slow
def test_same_seed_config_and_devices_give_bit_identical_losses(
    reference, tokenizer_cache, tmp_path
):
  status, output = run(tmp_path / 'again', tokenizer_cache)
  assert status == 0, output[-3000:]
  losses = logged_losses(tmp_path / 'again')
  assert [step for step, _ in losses] == list(range(1, STEPS + 1))
  assert losses == logged_losses(reference)  # JSON keeps every bit of a float
  small_run.assert_same_params(
      small_run.saved_params(reference, STEPS), small_run.saved_params(tmp_path / 'again', STEPS)
  )


# SIGKILL ----------------------------------------------------------------------------------


def wait_for(condition, process) -> bool:
  """Polls `condition` every 2 ms while the process runs; False if it ended first."""
  deadline = time.monotonic() + RUN_TIMEOUT
  while process.poll() is None:
    if condition():
      return True
    if time.monotonic() > deadline:
      process.kill()
      raise AssertionError('the run hung')
    time.sleep(0.002)
  return False


def saves_in_flight(workdir) -> list[str]:
  try:
    return sorted(name for name in os.listdir(workdir / 'checkpoints') if SAVING in name)
  except FileNotFoundError:
    return []


def all_threads_stopped(pid: int) -> bool:
  """Whether SIGSTOP has reached every thread (it is delivered asynchronously)."""
  try:
    for tid in os.listdir(f'/proc/{pid}/task'):
      with open(f'/proc/{pid}/task/{tid}/stat') as f:
        if f.read().rsplit(')', 1)[1].split()[0] not in 'tT':  # the state follows "(name)"
          return False
  except FileNotFoundError:  # a thread ended while we looked
    return False
  return True


def kill_mid_save(process, workdir, rng, after_step: int) -> str | None:
  """SIGKILLs the run while it writes the checkpoint of a step > after_step.

  When a save's temporary directory appears, the run is frozen (SIGSTOP) a random
  moment later; if the save is still uncommitted then, it is killed frozen, so the
  kill provably lands inside the save. Otherwise it continues until the next save.
  Returns the name of the interrupted save's directory (None if the run ended).
  """
  later_saves = lambda: [n for n in saves_in_flight(workdir) if int(n.split('.')[0]) > after_step]
  while wait_for(later_saves, process):
    time.sleep(rng.uniform(0.0, 0.005))
    process.send_signal(signal.SIGSTOP)
    while not all_threads_stopped(process.pid):
      if process.poll() is not None:
        return None
      time.sleep(0.001)
    interrupted = later_saves()
    if interrupted:
      process.send_signal(signal.SIGKILL)
      process.wait()
      return interrupted[0]
    process.send_signal(signal.SIGCONT)  # it committed meanwhile; try the next save
  return None


def kill_anywhere(process, workdir, rng) -> bool:
  """SIGKILLs the run a random moment after it logs its next step: in a step, a log or a save."""
  logged = logged_lines(workdir)
  if not wait_for(lambda: logged_lines(workdir) > logged, process):
    return False
  time.sleep(rng.uniform(0.0, 0.3))
  process.kill()
  return process.wait() == -signal.SIGKILL


def kill_in_start_up(process, rng) -> bool:
  """SIGKILLs the run a random moment into its start: imports, restore, compilation."""
  time.sleep(rng.uniform(0.5, 4.0))
  process.kill()
  return process.wait() == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_ten_times_including_mid_save_then_resume_is_bit_exact(
    reference, tokenizer_cache, tmp_path
):
  """Every restart resumes from the newest complete checkpoint; every step any run logged has
  the uninterrupted run's loss, and the final parameters are the uninterrupted run's."""
  rng = random.Random(0)
  workdir = tmp_path / 'killed'
  kinds = ['start-up'] + ['mid-save', 'anywhere'] * 4 + ['mid-save']
  for i, kind in enumerate(kinds):
    resume_from = newest(workdir)
    offset = len(log_text(workdir))
    process = launch(workdir, tokenizer_cache)
    if kind == 'mid-save':
      # after resume_from + 1: each launch commits at least one new checkpoint
      interrupted = kill_mid_save(process, workdir, rng, after_step=(resume_from or 0) + 1)
      killed = interrupted is not None
      if killed:  # its half-written directory is left behind, never mistaken for a checkpoint
        assert (workdir / 'checkpoints' / interrupted).is_dir() and newest(workdir) is not None
        assert newest(workdir) < int(interrupted.split('.')[0])
    elif kind == 'anywhere':
      killed = kill_anywhere(process, workdir, rng)
    else:
      killed = kill_in_start_up(process, rng)
    output = log_text(workdir)[offset:]
    assert killed, f'launch {i} ({kind}) ended before it was killed:\n{output[-3000:]}'
    said = started_from(output)
    if kind != 'start-up':
      assert said is not None, output[-3000:]
    if said is not None:
      assert said == ('scratch' if resume_from is None else str(resume_from)), (i, kind, said)

  resume_from = newest(workdir)
  status, output = run(workdir, tokenizer_cache)
  assert status == 0, output[-3000:]
  assert started_from(output) == str(resume_from)
  assert not saves_in_flight(workdir)  # the interrupted saves were cleaned up on restart

  expected = dict(logged_losses(reference))
  losses = logged_losses(workdir)
  assert {step for step, _ in losses} == set(expected)
  for step, loss in losses:
    assert loss == expected[step], step
  small_run.assert_same_params(
      small_run.saved_params(reference, STEPS), small_run.saved_params(workdir, STEPS)
  )


# A full disk, and a resume on fewer devices ------------------------------------------------


@pytest.mark.slow
def test_full_disk_stops_the_run_and_keeps_written_checkpoints(
    reference, tokenizer_cache, tmp_path
):
  """The disk fills up after 3 checkpoints: the run stops naming the step and the cause; the
  3 checkpoints are the uninterrupted run's, and a rerun resumes and ends bit-exactly."""
  workdir = tmp_path / 'full'
  status, output = run(workdir, tokenizer_cache, fault_env={'FAULT_DISK_FULL_AFTER_SAVES': '3'})
  assert status == 1, output[-3000:]
  errors = re.findall(r'^error: (.*)$', output, re.M)
  assert len(errors) == 1, output[-3000:]
  assert errors[0].startswith('could not write checkpoint step 4 ')
  assert 'No space left on device' in errors[0]
  assert 'complete checkpoints [1, 2, 3] are intact (a rerun resumes from step 3)' in errors[0]
  assert 'Traceback' not in output
  assert checkpoint.all_steps(str(workdir)) == [1, 2, 3]
  for step in (1, 2, 3):
    small_run.assert_same_params(
        small_run.saved_params(reference, step), small_run.saved_params(workdir, step)
    )

  status, output = run(workdir, tokenizer_cache)  # the disk has room again
  assert status == 0, output[-3000:]
  assert started_from(output) == '3'
  small_run.assert_same_params(
      small_run.saved_params(reference, STEPS), small_run.saved_params(workdir, STEPS)
  )


@pytest.mark.slow
def test_preempted_on_8_devices_resumes_on_4(reference, tokenizer_cache, tmp_path):
  """Killed on 8 devices once checkpoint 3 exists; resharded onto 4 devices, it goes on to the
  end with the losses of the 1-device run (within float reassociation)."""
  workdir = tmp_path / 'devices'
  process = launch(workdir, tokenizer_cache, devices=8)
  assert wait_for(lambda: (newest(workdir) or 0) >= 3, process), log_text(workdir)[-3000:]
  process.kill()
  process.wait()
  resume_from = newest(workdir)
  status, output = run(workdir, tokenizer_cache, devices=4)
  assert status == 0, output[-3000:]
  assert started_from(output) == str(resume_from)
  assert "4 devices, mesh {'data': 1, 'fsdp': 4, 'tensor': 1, 'expert': 1}" in output
  expected = dict(logged_losses(reference))
  losses = logged_losses(workdir)
  assert {step for step, _ in losses} == set(expected)
  for step, loss in losses:
    np.testing.assert_allclose(loss, expected[step], rtol=2e-5, err_msg=f'step {step}')


# Damaged checkpoints (in-process: the trainer's restore path) --------------------------------


@pytest.fixture(scope='module')
def setup(devices):
  """The run's abstract state and shardings on the 8-device mesh (no compilation)."""
  config = small_run.config(**RUN)
  mesh = sharding.make_mesh(dict(config.mesh))
  with sharding.mesh_context(mesh):
    return trainer.make_setup(config, mesh)


@pytest.fixture
def last_two(reference, tmp_path):
  """A workdir holding copies of the reference's last two checkpoints."""
  for step in (STEPS - 1, STEPS):
    shutil.copytree(
        checkpoint.step_path(str(reference), step), checkpoint.step_path(str(tmp_path), step)
    )
  return tmp_path


def damage(workdir, step: int, pattern: str, how: str):
  """Truncates to half, or deletes, the file(s) of checkpoint `step` matching `pattern`."""
  files = [f for f in checkpoint.step_path(str(workdir), step).glob(pattern) if f.is_file()]
  assert files, pattern
  for file in files:
    if how == 'truncate':
      data = file.read_bytes()
      file.write_bytes(data[: len(data) // 2])
    else:
      file.unlink()


def restore_latest(workdir, setup):
  with sharding.mesh_context(setup.mesh):
    # No waits between the retries of a damaged checkpoint's reads: it fails every time.
    ckpt = checkpoint.TrainCheckpointer(str(workdir), keep=3, retry_delay=0)
    return ckpt, ckpt.restore_latest(setup.abstract_state, setup.state_shardings)


@pytest.mark.slow
@pytest.mark.parametrize(
    'pattern,how',
    [
        ('state/ocdbt.process_0/d/*', 'truncate'),  # the array data
        ('state/ocdbt.process_0/d/*', 'delete'),
        ('state/_METADATA', 'truncate'),  # the tree
        ('state/manifest.ocdbt', 'delete'),  # the index of the data
        ('state/_strings.json', 'delete'),  # the input iterator's state
    ],
    ids=[
        'data-truncated',
        'data-deleted',
        'tree-truncated',
        'manifest-deleted',
        'iterator-state-deleted',
    ],
)
# Orbax's event loop, closed after the failed read, cannot take the damaged read's last callback.
@pytest.mark.filterwarnings(
    'ignore:Exception ignored in. None:pytest.PytestUnraisableExceptionWarning'
)
def test_damaged_newest_checkpoint_is_skipped_with_a_warning(
    reference, last_two, setup, caplog, pattern, how
):
  damage(last_two, STEPS, pattern, how)
  with caplog.at_level(logging.WARNING):
    ckpt, (step, state, data_states) = restore_latest(last_two, setup)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(w.startswith(f'checkpoint step {STEPS} cannot be read') for w in warnings), warnings
  # The previous checkpoint, exactly (it was written on 1 device, restored onto 8).
  assert step == STEPS - 1 and int(state['step']) == STEPS - 1 and len(data_states) == 1
  restored = checkpoint.flatten_tree(jax.device_get(state['params']))
  small_run.assert_same_params(small_run.saved_params(reference, STEPS - 1), restored)
  # The unreadable one is kept aside, so that the resumed run can save that step again.
  assert (last_two / 'checkpoints' / f'{STEPS}.unreadable').is_dir()
  assert ckpt.steps() == [STEPS - 1]
  with jax.set_mesh(setup.mesh):
    ckpt.save(STEPS, state, data_states)
    ckpt.close()
  assert checkpoint.all_steps(str(last_two)) == [STEPS - 1, STEPS]


@pytest.mark.slow
def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(last_two, setup):
  damage(last_two, STEPS, 'state/_METADATA', 'truncate')
  damage(last_two, STEPS - 1, 'state/ocdbt.process_0/d/*', 'delete')
  with pytest.raises(
      checkpoint.CheckpointError,
      match=f'no checkpoint can be read; step {STEPS}: .*; step {STEPS - 1}: ',
  ):
    restore_latest(last_two, setup)
  assert checkpoint.all_steps(str(last_two)) == [STEPS - 1, STEPS]  # nothing was moved


# Transient read errors and several processes -------------------------------------------------


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
  """A workdir with checkpoints 1 and 2 of a tiny train state: (workdir, abstract state,
  shardings). Reads are retried without waiting."""
  monkeypatch.setattr(checkpoint, 'RETRY_DELAY_S', 0, raising=False)

  def state(step):
    return {
        'params': {'w': jax.numpy.full((4,), float(step))},
        'opt_state': {'m': jax.numpy.zeros((4,))},
        'step': jax.numpy.array(step, jax.numpy.int32),
    }

  ckpt = checkpoint.TrainCheckpointer(str(tmp_path), keep=3)
  for step in (1, 2):
    ckpt.save(step, state(step), ['{}'])
  ckpt.close()
  abstract = jax.eval_shape(lambda: state(0))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return tmp_path, abstract, jax.tree.map(lambda _: device, abstract)


def failing_loads(ckpt, monkeypatch, fails: int) -> list[int]:
  """Orbax's reads of `ckpt` raise a storage error `fails` times, then read; the steps asked."""
  load, calls = ckpt._ckpt.load, []

  def flaky(step, *args, **kwargs):
    calls.append(step)
    if len(calls) <= fails:
      raise TimeoutError('[Errno 110] reading from storage timed out')
    return load(step, *args, **kwargs)

  monkeypatch.setattr(ckpt._ckpt, 'load', flaky)
  return calls


def test_a_transient_read_error_is_retried_not_set_aside(tiny_run, monkeypatch, caplog):
  workdir, abstract, shardings = tiny_run
  ckpt = checkpoint.TrainCheckpointer(str(workdir), keep=3)
  calls = failing_loads(ckpt, monkeypatch, fails=1)
  with caplog.at_level(logging.WARNING):
    step, state, _ = ckpt.restore_latest(abstract, shardings)
  assert step == 2 and calls == [2, 2] and float(state['params']['w'][0]) == 2.0
  assert 'checkpoint step 2: read failed, trying again' in caplog.text
  assert 'cannot be read' not in caplog.text
  assert sorted(p.name for p in checkpoint.checkpoint_root(str(workdir)).iterdir()) == ['1', '2']


def test_a_read_error_that_stays_sets_the_checkpoint_aside(tiny_run, monkeypatch, caplog):
  workdir, abstract, shardings = tiny_run
  ckpt = checkpoint.TrainCheckpointer(str(workdir), keep=3)
  calls = failing_loads(ckpt, monkeypatch, fails=1 + checkpoint.READ_RETRIES)
  with caplog.at_level(logging.WARNING):
    step, state, _ = ckpt.restore_latest(abstract, shardings)
  assert calls == [2] * (1 + checkpoint.READ_RETRIES) + [1]
  assert step == 1 and float(state['params']['w'][0]) == 1.0
  assert 'checkpoint step 2 cannot be read, trying an older one' in caplog.text
  assert (checkpoint.checkpoint_root(str(workdir)) / '2.unreadable').is_dir()
  assert ckpt.steps() == [1]


class SimulatedProcesses:
  """`n` processes as threads: process i's all-gather waits for every process's array."""

  def __init__(self, n: int):
    self.arrays = [None] * n
    # A process left waiting for one that failed gives up (BrokenBarrierError) after 10 s.
    self.barrier = threading.Barrier(n, timeout=10)

  def of(self, index: int):
    def allgather(x):
      self.arrays[index] = np.asarray(x)
      self.barrier.wait()
      gathered = np.stack(self.arrays)
      self.barrier.wait()  # no process writes its next array before every one has read these
      return gathered

    return checkpoint.Processes(index, allgather)

  def run(self, main) -> list:
    """main(processes) on every process; each one's result, or the exception it raised."""
    results = [None] * len(self.arrays)

    def run_one(i):
      try:
        results[i] = main(self.of(i))
      except Exception as e:  # returned: the test checks that all fail alike
        results[i] = e

    threads = [
        threading.Thread(target=run_one, args=(i,), name=f'process {i}')
        for i in range(len(self.arrays))
    ]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join(timeout=60)
    return results


def resume(workdir, steps_of, cannot_read):
  """restore_latest's decision on a simulated process: cannot_read(process, step, attempt)
  says when its read of a step fails. Returns (step, value, unreadable, reads per step)."""

  def main(processes):
    reads = {}

    def read(step):
      reads[step] = reads.get(step, 0) + 1
      if cannot_read(processes.index, step, reads[step]):
        raise checkpoint.CheckpointError(f'step {step}: damaged on process {processes.index}')
      return f'step {step} read by process {processes.index}'

    steps = steps_of(processes.index)
    step, value, unreadable = checkpoint.read_newest(
        str(workdir), steps, read, retry_delay=0, processes=processes
    )
    checkpoint.set_aside(str(workdir), unreadable, processes)
    return step, value, unreadable, reads

  return main


@pytest.fixture
def renames(tmp_path, monkeypatch):
  """Checkpoints 1-3 as folders; the names of the threads that rename a folder."""
  for step in (1, 2, 3):
    checkpoint.step_path(str(tmp_path), step).mkdir(parents=True)
  path_type, done = type(checkpoint.step_path(str(tmp_path), 1)), []
  rename = path_type.rename

  def recorded(self, target):
    done.append(threading.current_thread().name)
    return rename(self, target)

  monkeypatch.setattr(path_type, 'rename', recorded)
  return done


def test_processes_agree_on_the_step_and_only_process_0_sets_aside(tmp_path, renames):
  """Process 1 cannot read step 3 (the others can): every process resumes from step 2 after
  the same number of tries, and step 3 is moved aside once, by process 0."""
  never = lambda i, step, attempt: i == 1 and step == 3
  results = SimulatedProcesses(3).run(resume(tmp_path, lambda i: [1, 2, 3], never))
  tries = 1 + checkpoint.READ_RETRIES
  for i, (step, value, unreadable, reads) in enumerate(results):
    assert (step, unreadable, reads) == (2, [3], {3: tries, 2: 1}), i
    assert value == f'step 2 read by process {i}'
  assert renames == ['process 0']
  assert sorted(p.name for p in checkpoint.checkpoint_root(str(tmp_path)).iterdir()) == [
      '1',
      '2',
      '3.unreadable',
  ]


def test_one_process_failing_once_is_retried_by_all(tmp_path, renames):
  once = lambda i, step, attempt: i == 2 and step == 3 and attempt == 1
  results = SimulatedProcesses(3).run(resume(tmp_path, lambda i: [1, 2, 3], once))
  assert [r[:3] for r in results] == [(3, f'step 3 read by process {i}', []) for i in range(3)]
  assert [r[3] for r in results] == [{3: 2}] * 3 and renames == []


def test_processes_that_list_other_checkpoints_stop(tmp_path, renames):
  """A process that does not see step 3 would pair its answers with other steps' answers."""
  results = SimulatedProcesses(2).run(
      resume(tmp_path, lambda i: [1, 2, 3][: 3 - i], lambda *_: False)
  )
  for result in results:
    assert isinstance(result, checkpoint.CheckpointError), result
    assert 'processes see different checkpoints (the step each one tries: [3, 2])' in str(result)
  assert renames == []


AGREE_IN_A_PROCESS = """
import json, sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
port, index, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f'localhost:{port}', 2, index)
from llama4_jax import checkpoint

def read(step):
  if index == 1 and step == 3:
    raise checkpoint.CheckpointError(f'step {step}: damaged on process 1')
  return f'step {step} read by process {index}'

step, value, unreadable = checkpoint.read_newest(workdir, [1, 2, 3], read, retry_delay=0)
checkpoint.set_aside(workdir, unreadable)
print(json.dumps([step, value, unreadable]))
"""


@pytest.mark.slow
def test_two_jax_processes_agree_through_their_collectives(tmp_path):
  """As above, with the run's own exchange (`checkpoint.run_processes`): 2 JAX processes."""
  for step in (1, 2, 3):
    checkpoint.step_path(str(tmp_path), step).mkdir(parents=True)
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(small_run.script_env(2), JAX_PLATFORMS='cpu')
  processes = [
      subprocess.Popen(
          [sys.executable, '-c', AGREE_IN_A_PROCESS, str(port), str(i), str(tmp_path)],
          cwd=small_run.REPO,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=120) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  decided = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]  # gloo logs too
  assert decided == [[2, f'step 2 read by process {i}', [3]] for i in range(2)]
  assert sorted(p.name for p in checkpoint.checkpoint_root(str(tmp_path)).iterdir()) == [
      '1',
      '2',
      '3.unreadable',
  ]


def test_a_streamed_write_killed_before_its_finalize_can_be_written_again(tmp_path):
  """A conversion killed mid-write leaves Orbax's partial save, which Orbax refuses to add to;
  the next conversion starts it afresh and commits the whole checkpoint."""
  path = tmp_path / 'checkpoints' / '0'
  arrays = {'embed': np.arange(6.0).reshape(2, 3), 'norm': np.ones(3)}

  def killed_after_the_first_group():
    yield 'embed', arrays['embed']
    raise KeyboardInterrupt  # as a kill would: no finalize

  with pytest.raises(KeyboardInterrupt):
    checkpoint.write_params_streaming(path, killed_after_the_first_group(), group_bytes=1)
  assert not path.exists() and path.with_name('0' + checkpoint.PARTIAL_SAVE_SUFFIX).exists()
  checkpoint.write_params_streaming(path, arrays.items(), group_bytes=1)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=one_device) for k, v in arrays.items()
  }
  restored = checkpoint.load_params(str(path), abstract)
  for key, value in arrays.items():
    np.testing.assert_array_equal(restored[key], value)
