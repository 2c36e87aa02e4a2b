"""Chat fine-tuning end to end: from a trained run (train.init_from) on the built-in chat task,
its report, its workdir, and a resume after SIGKILL."""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from llama4_jax import checkpoint, sampling, sharding
from llama4_jax import workdir as workdir_lib
from llama4_jax.data import tokenizer as tokenizer_lib

import small_run

# Its module fixtures are expensive: one test worker runs the whole file (pyproject.toml).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(__name__)]


def sft_command(workdir, init_from, task_dir, **overrides) -> list[str]:
  """configs/sft.py:tiny starting from `init_from`, whose (small) model it takes."""
  tokenizer = {k: v for k, v in small_run.SMALL.items() if k.startswith('data.token')}
  values = {
      **tokenizer,
      'train.init_from': init_from,
      'data.seq_len': 128,
      'data.chat_task.dir': task_dir,
      'data.chat_task.train_examples': 400,
      'data.chat_task.eval_examples': 16,
      'train.steps': 6,
      'train.batch_size': 8,
      'train.checkpoint_every': 1,
      'train.keep_checkpoints': 6,
      'train.eval_every': 3,
      'train.log_every': 1,
      'train.sample_tokens': 0,
      'optim.warmup_steps': 2,
      **{k.replace('__', '.'): v for k, v in overrides.items()},
  }
  return [
      sys.executable,
      os.path.join(small_run.REPO, 'scripts', 'train.py'),
      '--config=configs/sft.py:tiny',
      f'--workdir={workdir}',
      *(f'--config.{k}={v}' for k, v in values.items()),
  ]


def run(command) -> subprocess.CompletedProcess:
  return subprocess.run(
      command,
      cwd=small_run.REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env=small_run.script_env(),
  )


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """A trained run to fine-tune (its SentencePiece tokenizer in its workdir)."""
  workdir = tmp_path_factory.mktemp('base') / 'run'
  result = small_run.run_train(workdir, train__steps=2)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def losses(workdir) -> dict[int, float]:
  with open(workdir / 'metrics.jsonl') as f:
    return {m['step']: m['loss'] for m in map(json.loads, f) if 'loss' in m}


@pytest.fixture(scope='module')
def fine_tuned(base, tmp_path_factory):
  """(workdir, completed process) of an uninterrupted fine-tune that reports at its end."""
  tmp = tmp_path_factory.mktemp('sft')
  result = run(sft_command(tmp / 'run', base, tmp / 'task', train__sample_tokens=4))
  assert result.returncode == 0, result.stderr[-3000:]
  return tmp / 'run', result


def test_fine_tune_reports_before_and_after_and_its_workdir_stands_alone(
    base, fine_tuned, tmp_path
):
  workdir, result = fine_tuned
  out = result.stdout
  assert f'initialised from {base} (step 2)' in result.stdout + result.stderr
  assert 'validation loss before fine-tuning' in out
  assert 'held-out exact match' in out and 'before fine-tuning)' in out
  # The fine-tune inherited the tokenizer it was taught with, so its workdir needs no flags.
  [trained] = [p for p in os.listdir(base / 'tokenizer') if p.endswith('.model')]
  inherited = (workdir / 'tokenizer' / 'tokenizer.model').read_bytes()
  assert inherited == (base / 'tokenizer' / trained).read_bytes()
  with open(workdir / 'metrics.jsonl') as f:
    evals = [(m['step'], m['eval_loss']) for m in map(json.loads, f) if 'eval_loss' in m]
  assert [s for s, _ in evals] == [0, 3, 6]
  scored = run(
      [
          sys.executable,
          os.path.join(small_run.REPO, 'scripts', 'eval.py'),
          f'--workdir={workdir}',
          f'--output={tmp_path}/eval.json',
          '--max_batches=0',
      ]
  )
  assert scored.returncode == 0, scored.stderr[-3000:]
  # eval.py scores the chat run's held-out data as training did: its assistant tokens.
  got = json.loads((tmp_path / 'eval.json').read_text())
  np.testing.assert_allclose(got['loss'], evals[-1][1], rtol=1e-5)


def test_fine_tune_killed_resumes_bit_exact(base, fine_tuned, tmp_path):
  """Killed once it has saved a checkpoint, the rerun resumes and ends as the uninterrupted
  fine-tune does: every logged loss and the final parameters, even with the model it started
  from gone by then (a converted checkpoint on scratch storage)."""
  whole, killed, init = fine_tuned[0], tmp_path / 'killed', tmp_path / 'init'
  shutil.copytree(base, init)
  process = subprocess.Popen(
      sft_command(killed, init, tmp_path / 'task'),
      cwd=small_run.REPO,
      env=small_run.script_env(),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 300
  while process.poll() is None and time.monotonic() < deadline:
    if checkpoint.latest_step(str(killed)) is not None and checkpoint.latest_step(str(killed)) >= 2:
      break
    time.sleep(0.01)
  process.kill()
  process.wait()
  assert checkpoint.latest_step(str(killed)) < 6, 'the run ended before it was killed'
  shutil.rmtree(init)
  result = run(sft_command(killed, init, tmp_path / 'task', train__sample_tokens=4))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resumed from step' in result.stdout + result.stderr
  # What it started from, as the uninterrupted run logged it at step 0.
  assert 'validation loss before fine-tuning' in result.stdout
  expected = losses(whole)
  assert losses(killed) == expected
  small_run.assert_same_params(small_run.saved_params(whole, 6), small_run.saved_params(killed, 6))


def test_generate_chat_answers_the_user_turn_until_eot(fine_tuned, tmp_path):
  """generate.py --chat: the prompt is a user turn in the chat format, and the answer is
  greedy generation from the assistant's header, cut at `<|eot|>`."""
  workdir, question, max_new = fine_tuned[0], 'How old is omar?', 24
  result = run(
      [
          sys.executable,
          os.path.join(small_run.REPO, 'scripts', 'generate.py'),
          f'--workdir={workdir}',
          '--chat',
          f'--prompt={question}',
          f'--max_new_tokens={max_new}',
          f'--output={tmp_path}/ids.json',
      ]
  )
  assert result.returncode == 0, result.stderr[-3000:]
  [answer] = json.loads((tmp_path / 'ids.json').read_text())['ids']

  one_device = sharding.make_mesh({}, devices=jax.devices()[:1])  # the script's one device
  model, config, _ = workdir_lib.load_model(str(workdir), mesh=one_device)
  tokenizer = tokenizer_lib.run_tokenizer(str(workdir), config, '')
  prompt = tokenizer.format_chat([{'role': 'user', 'content': question}])
  assert prompt[-1] != tokenizer.eot_id  # it ends with the assistant's header, not a turn
  [expected] = sampling.generate(
      model,
      [prompt],
      max_new_tokens=max_new,
      eos_ids=[*model.cfg.eos_token_ids, tokenizer.eot_id],
      pad_id=model.cfg.pad_token_id,
  )
  assert answer == expected
