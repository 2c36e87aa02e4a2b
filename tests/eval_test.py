"""scripts/eval.py and evaluation.py: against transformers' loss, on a trained run, bad input."""

import csv
import glob
import json
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from llama4_jax import checkpoint, evaluation, sharding
from llama4_jax import workdir as workdir_lib
from llama4_jax.data import text as text_data
from llama4_jax.data import tokenizer as tokenizer_lib

import hf_reference
import small_run

# Its module fixtures are expensive: one test worker runs the whole file (pyproject.toml).
pytestmark = pytest.mark.xdist_group(__name__)


def run_eval(*args):
  return small_run.run_script('eval.py', *args)


def tensorboard_scalars(workdir) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from the event files (TFRecord framing: length, crc, event, crc)."""
  from tensorboardX.proto import event_pb2

  scalars = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'tensorboard', 'events*'))):
    raw, i = open(path, 'rb').read(), 0
    while i < len(raw):
      n = struct.unpack('<Q', raw[i : i + 8])[0]
      event = event_pb2.Event.FromString(raw[i + 12 : i + 12 + n])
      i += 16 + n
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


# A converted random model: eval.py against transformers --------------------------


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  path = tmp_path_factory.mktemp('converted')
  hf = hf_reference.text_model(num_experts_per_tok=2)
  hf.save_pretrained(path / 'hf', max_shard_size='100KB')
  converted = small_run.run_script(
      'convert_checkpoint.py', f'--hf_dir={path}/hf', f'--workdir={path}/ours'
  )
  assert converted.returncode == 0, converted.stderr[-2000:]
  return hf, path / 'ours'


def hf_window_loss(hf_model, windows):
  with torch.no_grad():
    logits = hf_model(input_ids=torch.as_tensor(windows[:, :-1], dtype=torch.long)).logits
    nll = torch.nn.functional.cross_entropy(
        logits.double().reshape(-1, logits.shape[-1]),
        torch.as_tensor(windows[:, 1:], dtype=torch.long).reshape(-1),
    )
  return float(nll)


@pytest.mark.reference
@pytest.mark.slow
def test_eval_loss_equals_transformers(converted, tmp_path):
  hf, workdir = converted
  tokens = np.random.default_rng(0).integers(0, 128, 1000).astype(np.int32)
  np.save(tmp_path / 'tokens.npy', tokens)
  result = run_eval(
      f'--workdir={workdir}',
      f'--tokens={tmp_path}/tokens.npy',
      '--seq_len=32',
      '--batch_size=8',
      f'--output={tmp_path}/result.json',
  )
  assert result.returncode == 0, result.stderr
  ours = json.loads((tmp_path / 'result.json').read_text())

  windows = text_data.token_windows(tokens, 32)
  # Each of the 999 predictions once: 31 windows of 33 tokens sharing their end tokens, and
  # the 8 tokens left.
  assert [len(w) for w in windows] == [33] * 31 + [8] and ours['tokens'] == 999
  full, rest = hf_window_loss(hf, np.stack(windows[:-1])), hf_window_loss(hf, windows[-1][None])
  reference = (full * 31 * 32 + rest * 7) / 999
  assert reference > 1.0
  assert abs(ours['loss'] - reference) / reference <= 1e-5
  assert abs(ours['perplexity'] - np.exp(reference)) / np.exp(reference) <= 1e-4


@pytest.mark.reference
@pytest.mark.slow
def test_eval_rejects_out_of_vocabulary_tokens(converted, tmp_path):
  np.save(tmp_path / 'tokens.npy', np.array([1, 2, 500] * 50))
  result = run_eval(f'--workdir={converted[1]}', f'--tokens={tmp_path}/tokens.npy', '--seq_len=8')
  assert result.returncode == 1 and 'tokens.npy' in result.stderr and '500' in result.stderr


@pytest.mark.reference
@pytest.mark.slow
def test_npy_files_need_no_tokenizer_but_validation_data_does(converted, tmp_path):
  """A converted run has no tokenizer: .npy documents use the model's special ids."""
  hf, workdir = converted
  doc = np.random.default_rng(1).integers(3, 128, 40).astype(np.int32)
  np.save(tmp_path / 'doc.npy', doc)
  rows = evaluation.evaluate_workdir(
      str(workdir), files=str(tmp_path / 'doc.npy'), seq_len=64, log=lambda _: None
  )
  full = np.concatenate([[1], doc, [2]])[None]  # BOS + doc + EOS, one row
  assert rows[0]['tokens'] == full.shape[1] - 1
  assert abs(rows[0]['loss'] - hf_window_loss(hf, full)) <= 1e-5 * rows[0]['loss']
  with pytest.raises(FileNotFoundError, match='no tokenizer'):
    evaluation.evaluate_workdir(str(workdir), log=lambda _: None)


# A small trained run -----------------------------------------------------------------


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """4 steps with checkpoints at 2 and 4, validated at the end (eval.max_batches=2)."""
  workdir = tmp_path_factory.mktemp('run')
  result = small_run.run_train(workdir, train__steps=4, train__checkpoint_every=2)
  assert result.returncode == 0, result.stderr[-3000:]
  logged = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  return workdir, [m['eval_loss'] for m in logged if 'eval_loss' in m][-1]


@pytest.mark.slow
def test_default_data_is_the_runs_validation_as_in_training(trained, tmp_path):
  workdir, training_eval_loss = trained
  result = run_eval(f'--workdir={workdir}', f'--output={tmp_path}/result.json')
  assert result.returncode == 0, result.stderr[-3000:]
  ours = json.loads((tmp_path / 'result.json').read_text())
  assert ours['step'] == 4 and ours['tokens'] > 500
  np.testing.assert_allclose(ours['loss'], training_eval_loss, rtol=1e-6)
  np.testing.assert_allclose(ours['perplexity'], np.exp(ours['loss']), rtol=1e-9)
  scalars = tensorboard_scalars(workdir)
  np.testing.assert_allclose(scalars['eval/loss'][4], ours['loss'], rtol=1e-6)


@pytest.mark.slow
def test_the_loss_does_not_depend_on_the_number_of_devices(trained, devices):
  """3 rows a batch on 8 devices: padding rows fill the batch shards, not more data."""
  workdir, _ = trained
  scores = []
  for mesh_devices in (devices[:1], devices):
    evaluator = evaluation.CheckpointEvaluator(
        str(workdir), sharding.make_mesh({'fsdp': -1}, mesh_devices)
    )
    scores.append(evaluator.score(4, evaluator.batches(batch_size=3, max_batches=2)))
  one, eight = scores
  assert one['tokens'] == eight['tokens']
  np.testing.assert_allclose(eight['loss'], one['loss'], rtol=1e-5)


@pytest.mark.slow
def test_all_steps_writes_one_row_per_checkpoint(trained, tmp_path):
  workdir, training_eval_loss = trained
  rows = evaluation.evaluate_workdir(
      str(workdir), all_steps=True, table_dir=str(tmp_path), log=lambda _: None
  )
  steps = checkpoint.all_steps(str(workdir))
  assert steps == [2, 4] and [r['step'] for r in rows] == steps
  assert len({r['tokens'] for r in rows}) == 1  # the same data for every step
  assert rows[0]['loss'] > rows[1]['loss']
  np.testing.assert_allclose(rows[1]['loss'], training_eval_loss, rtol=1e-6)
  with open(tmp_path / 'eval_steps.csv') as f:
    table = list(csv.DictReader(f))
  assert [int(r['step']) for r in table] == steps
  np.testing.assert_allclose([float(r['loss']) for r in table], [r['loss'] for r in rows])
  markdown = (tmp_path / 'eval_steps.md').read_text().splitlines()
  assert len(markdown) == 2 + len(steps) and markdown[2].startswith('| 2 |')
  assert Image.open(tmp_path / 'eval_steps.png').size[0] > 100
  assert set(tensorboard_scalars(workdir)['eval/loss']) >= {2, 4}


def test_step_table_goes_to_a_non_local_workdir(fake_gcs):
  """The table's default folder is the workdir, which may be gs://."""
  rows = [{'step': s, 'loss': 3.0 / s, 'perplexity': 1.0, 'tokens': 512} for s in (2, 4)]
  paths = evaluation.write_step_table(rows, 'gs://bucket/run')
  assert [p.rsplit('/', 1)[1] for p in paths] == [
      'eval_steps.md',
      'eval_steps.csv',
      'eval_steps.png',
  ]
  assert fake_gcs.cat(paths[1]).decode().splitlines()[1].startswith('2,1.5,')
  assert fake_gcs.cat(paths[2]).startswith(b'\x89PNG')


@pytest.mark.slow
def test_jsonl_files_at_a_step_equal_a_direct_computation(trained, tmp_path):
  """Packed rows (several documents per row) score each document as if alone."""
  workdir, _ = trained
  texts = ['def main():\n  return 0\n', 'import os\nprint(os.getcwd())\n', 'x = [1, 2, 3]\n']
  (tmp_path / 'docs.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
  result = run_eval(
      f'--workdir={workdir}',
      f'--files={tmp_path}/docs.jsonl',
      '--step=2',
      f'--output={tmp_path}/result.json',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  ours = json.loads((tmp_path / 'result.json').read_text())

  config = small_run.config()
  tokenizer = tokenizer_lib.load_tokenizer(config, config.model.vocab_size, workdir=str(workdir))
  model, _, step = workdir_lib.load_model(str(workdir), 2)
  nll, count = 0.0, 0
  for text in texts:
    ids = np.array([tokenizer.encode(text, bos=True, eos=True)], np.int32)
    assert ids.shape[1] <= 65  # one piece each
    result = evaluation.evaluate_batches(
        model, text_data.windows_to_batches(ids, 1, ids.shape[1] - 1)
    )
    nll += result['loss'] * result['tokens']
    count += result['tokens']
  assert ours['step'] == step == 2 and ours['tokens'] == count
  np.testing.assert_allclose(ours['loss'], nll / count, rtol=1e-5)
  np.testing.assert_allclose(
      tensorboard_scalars(workdir)['eval_files/loss'][2], ours['loss'], rtol=1e-6
  )


@pytest.mark.slow
def test_bad_input_is_one_line(trained, tmp_path):
  workdir, _ = trained
  quiet = dict(log=lambda _: None)
  with pytest.raises(FileNotFoundError, match='no such workdir'):
    evaluation.evaluate_workdir(str(tmp_path / 'missing'), **quiet)
  with pytest.raises(FileNotFoundError, match='no complete checkpoint'):
    os.makedirs(tmp_path / 'empty')
    (tmp_path / 'empty' / 'config.json').write_text((workdir / 'config.json').read_text())
    evaluation.evaluate_workdir(str(tmp_path / 'empty'), **quiet)
  with pytest.raises(FileNotFoundError, match=r'no checkpoint for step 3; saved steps: \[2, 4\]'):
    evaluation.evaluate_workdir(str(workdir), step=3, **quiet)
  (tmp_path / 'empty.jsonl').write_text('')
  with pytest.raises(ValueError, match='empty.jsonl: file is empty'):
    evaluation.evaluate_workdir(str(workdir), files=str(tmp_path / 'empty.jsonl'), **quiet)
  with pytest.raises(ValueError, match='No files match'):
    evaluation.evaluate_workdir(str(workdir), files=str(tmp_path / 'none*.txt'), **quiet)
  result = run_eval(f'--workdir={workdir}', '--step=3')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('error: ') and 'step 3' in result.stderr
