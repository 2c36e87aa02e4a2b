"""A workdir written by an earlier version still evaluates, generates and trains.

tests/testdata/workdir_538be93 was written by commit 538be93 (before the package was split
into model/, data/ and tools/), with

  python scripts/train.py --config=configs/tiny.py --workdir=W --config.model.vocab_size=512
    --config.model.hidden_size=32 --config.model.num_heads=2 --config.model.num_kv_heads=1
    --config.model.head_dim=16 --config.model.intermediate_size=32
    --config.model.intermediate_size_mlp=64 --config.model.attention_chunk_size=16
    --config.data.seq_len=32 --config.data.builtin_max_bytes=200000
    --config.data.tokenizer_train_bytes=200000 --config.train.batch_size=4 --config.train.steps=2
    --config.train.log_every=1 --config.train.checkpoint_every=2 --config.train.eval_every=0
    --config.train.sample_tokens=0 --config.eval.batch_size=4 --config.eval.max_batches=1
    --config.optim.warmup_steps=1

and the expected values below are what that commit's eval.py and generate.py printed for it.
"""

import json
import os
import shutil

import numpy as np
import pytest

from llama4_jax import evaluation
from llama4_jax import workdir as workdir_lib
from llama4_jax.data import text as text_data

import small_run

pytestmark = pytest.mark.slow

OLD_WORKDIR = os.path.join(os.path.dirname(__file__), 'testdata', 'workdir_538be93')
OLD_EVAL_LOSS = 6.24710750579834  # eval.py --tokens=<TOKENS> --seq_len=32
OLD_GREEDY_IDS = [47, 95, 380, 242, 205, 480]  # generate.py --prompt_ids=1,5,7 --max_new_tokens=6
MODEL = {
    'vocab_size': 512,
    'hidden_size': 32,
    'num_heads': 2,
    'num_kv_heads': 1,
    'head_dim': 16,
    'intermediate_size': 32,
    'intermediate_size_mlp': 64,
    'attention_chunk_size': 16,
}


@pytest.fixture
def old_workdir(tmp_path):
  workdir = tmp_path / 'old'
  shutil.copytree(OLD_WORKDIR, workdir)
  return workdir


def test_old_workdir_evaluates_and_generates_as_before(old_workdir, tmp_path):
  tokens = tmp_path / 'tokens.npy'
  np.save(tokens, ((np.arange(330) * 7) % 509 + 3).astype(np.int32))
  result = small_run.run_script(
      'eval.py',
      f'--workdir={old_workdir}',
      f'--tokens={tokens}',
      '--seq_len=32',
      f'--output={tmp_path}/eval.json',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  scored = json.loads((tmp_path / 'eval.json').read_text())
  # eval.py now scores each of the 329 predictions once (windows sharing their end tokens);
  # that commit cut 10 windows of 33 tokens apart, 320 predictions, which score as before.
  model, _, _ = workdir_lib.load_model(str(old_workdir))
  stream = np.load(tokens)
  old_windows = stream.reshape(10, 33)
  old = evaluation.evaluate_batches(model, text_data.windows_to_batches(old_windows, 4, 32))
  np.testing.assert_allclose(old['loss'], OLD_EVAL_LOSS, rtol=1e-5)
  windows = text_data.token_windows(stream, 32)
  new = evaluation.evaluate_batches(model, text_data.windows_to_batches(windows, 4, 32))
  assert scored['step'] == 2 and scored['tokens'] == new['tokens'] == 329
  np.testing.assert_allclose(scored['loss'], new['loss'], rtol=1e-5)

  result = small_run.run_script(
      'generate.py',
      f'--workdir={old_workdir}',
      '--prompt_ids=1,5,7',
      '--max_new_tokens=6',
      f'--output={tmp_path}/ids.json',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads((tmp_path / 'ids.json').read_text())['ids'] == [OLD_GREEDY_IDS]


def test_old_workdir_resumes_training(old_workdir):
  """On one device, as it was trained (its batch of 4 does not split over 8)."""
  tokenizer = next((old_workdir / 'tokenizer').glob('*.model'))  # named for the Python version
  overrides = {f'model__{k}': v for k, v in MODEL.items()}
  result = small_run.run_train(
      old_workdir,
      **overrides,
      data__seq_len=32,
      data__tokenizer=str(tokenizer),
      data__builtin_max_bytes=200_000,
      data__tokenizer_train_bytes=200_000,
      train__batch_size=4,
      train__steps=3,
      train__checkpoint_every=1,
      eval__batch_size=4,
      eval__max_batches=1,
      optim__warmup_steps=1,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resumed from step 2' in result.stdout
  logged = [json.loads(line) for line in open(old_workdir / 'metrics.jsonl')]
  assert [m['step'] for m in logged if 'loss' in m] == [3]
