"""Tests for llama4_jax.data.text."""

import json

import ml_collections as mlc
import numpy as np
import pytest

from llama4_jax.data import text as text_data
from llama4_jax.data import tokenizer as tokenizer_lib

SEQ_LEN = 32
MAX_BYTES = 200_000


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.train_tokenizer(text_data.read_texts('', MAX_BYTES), 512)


def _config(train_files='', eval_files='', **kwargs):
  return mlc.ConfigDict(
      dict(
          train_files=train_files,
          eval_files=eval_files,
          tokenizer='',
          builtin_max_bytes=MAX_BYTES,
          **kwargs,
      )
  )


def _write_jsonl(path, texts):
  path.write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
  return str(path)


def _pieces(batches):
  """Token lists of the packed pieces, read back from the batches."""
  pieces = []
  for batch in batches:
    for inputs, targets, segments, weights in zip(
        batch['inputs'], batch['targets'], batch['segment_ids'], batch['weights']
    ):
      for segment in np.unique(segments[segments > 0]):
        idx = np.flatnonzero(segments == segment)
        last = [targets[idx[-1]]] if weights[idx[-1]] else []
        pieces.append([int(t) for t in inputs[idx]] + [int(t) for t in last])
  return pieces


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ---------------------------------------------------------------- corpus ---


def test_builtin_split_is_deterministic_and_disjoint():
  train = text_data.builtin_documents('train', 0)
  valid = text_data.builtin_documents('validation', 0)
  train_names = {name for name, _ in train}
  valid_names = {name for name, _ in valid}
  assert not train_names & valid_names
  assert 0.005 < len(valid) / (len(train) + len(valid)) < 0.05
  assert any(n.startswith('pydoc_data/topics/') for n in train_names)
  assert not any('site-packages' in n or '/test/' in n for n in train_names)
  assert 'pydoc_data/topics.py' not in train_names | valid_names
  capped = text_data.builtin_documents('train', MAX_BYTES)
  assert sum(len(t.encode()) for _, t in capped) <= MAX_BYTES
  assert capped == train[: len(capped)]  # A prefix in a stable order.


def test_split_document_overlaps_by_one():
  doc = np.arange(10)
  pieces = text_data.split_document(doc, 4)
  assert [p.tolist() for p in pieces] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
  assert [p.tolist() for p in text_data.split_document(doc[:4], 4)] == [[0, 1, 2, 3]]
  # Targets of all pieces are exactly the document's targets.
  assert sum(len(p) - 1 for p in text_data.split_document(doc, 3)) == 9


def test_split_at_eos():
  bos, eos = 1, 2
  docs = text_data.split_at_eos(np.array([5, 6, 2, 1, 7, 2, 8]), bos, eos)
  assert [d.tolist() for d in docs] == [[1, 5, 6, 2], [1, 7, 2], [1, 8, 2]]
  assert [d.tolist() for d in text_data.split_at_eos(np.array([5]), bos, eos)] == [[1, 5, 2]]


# --------------------------------------------------------------- batches ---


def test_batch_format(tok):
  batch = next(text_data.make_train_iterator(_config(), tok, batch_size=4, seq_len=SEQ_LEN, seed=0))
  assert sorted(batch) == ['inputs', 'positions', 'segment_ids', 'targets', 'weights']
  for key, value in batch.items():
    assert value.shape == (4, SEQ_LEN), key
    assert value.dtype == (np.float32 if key == 'weights' else np.int32), key
  inputs, targets, segments = (batch['inputs'], batch['targets'], batch['segment_ids'])
  # Rows are contiguous token runs; targets are the next tokens.
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  # Positions restart with each piece and count up within it.
  starts = np.concatenate([np.ones((4, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
  pos = batch['positions']
  assert np.all(pos[starts & (segments > 0)] == 0)
  assert np.all(pos[:, 1:][~starts[:, 1:]] == pos[:, :-1][~starts[:, 1:]] + 1)
  # Segment ids count 1, 2, ... within each row; padding is 0 and unweighted.
  for row in segments:
    ids = row[row > 0]
    assert ids[0] == 1 and np.all(np.diff(ids) >= 0)
  assert np.all(batch['weights'][segments == 0] == 0)
  assert np.all(inputs[segments == 0] == tok.pad_id)
  # No weight on the BOS target: a prediction never crosses documents.
  assert np.all(batch['weights'][targets == tok.bos_id] == 0)
  assert batch['weights'].mean() > 0.8  # Packing is tight.


def test_eval_batches_hold_every_document_once(tok, tmp_path):
  texts = [f'document {i}: ' + 'word ' * (i % 7) for i in range(50)]
  files = _write_jsonl(tmp_path / 'docs.jsonl', texts)
  batches = text_data.make_eval_batches(
      _config(eval_files=files), tok, batch_size=4, seq_len=SEQ_LEN
  )
  expected = sorted(tok.encode(t, bos=True, eos=True) for t in texts)
  assert sorted(_pieces(batches)) == expected
  assert all(b['inputs'].shape == (4, SEQ_LEN) for b in batches)
  again = text_data.make_eval_batches(_config(eval_files=files), tok, batch_size=4, seq_len=SEQ_LEN)
  _assert_batches_equal(batches, again)
  limited = text_data.make_eval_batches(
      _config(eval_files=files), tok, batch_size=4, seq_len=SEQ_LEN, max_batches=2
  )
  _assert_batches_equal(limited, batches[:2])


def test_long_document_is_split_into_pieces(tok, tmp_path):
  text = ' '.join(f'token{i}' for i in range(300))
  path = tmp_path / 'long.txt'
  path.write_text(text)
  batches = text_data.make_eval_batches(
      _config(eval_files=str(path)), tok, batch_size=2, seq_len=SEQ_LEN
  )
  pieces = _pieces(batches)
  assert max(len(p) for p in pieces) == SEQ_LEN + 1
  joined = pieces[0] + [t for p in pieces[1:] for t in p[1:]]
  assert joined == tok.encode(text, bos=True, eos=True)


def test_npy_tokens(tok, tmp_path):
  docs = [
      tok.encode('first doc', bos=True, eos=True),
      tok.encode('second', eos=True),
      tok.encode('tail'),
  ]
  path = tmp_path / 'tokens.npy'
  np.save(path, np.concatenate(docs).astype(np.uint16))
  batches = text_data.make_eval_batches(
      _config(eval_files=str(path)), tok, batch_size=2, seq_len=SEQ_LEN
  )
  assert _pieces(batches) == [
      tok.encode(t, bos=True, eos=True) for t in ('first doc', 'second', 'tail')
  ]


def test_eval_default_is_builtin_validation(tok):
  batches = text_data.make_eval_batches(
      _config(), tok, batch_size=4, seq_len=SEQ_LEN, max_batches=3
  )
  assert len(batches) == 3


# ------------------------------------------------- iterator and sharding ---


def test_train_iterator_is_deterministic(tok):
  def first(seed):
    return _take(
        text_data.make_train_iterator(_config(), tok, batch_size=4, seq_len=SEQ_LEN, seed=seed), 3
    )

  _assert_batches_equal(first(0), first(0))
  assert not np.array_equal(first(0)[0]['inputs'], first(1)[0]['inputs'])


def test_resume_from_checkpointed_state(tok, tmp_path):
  # A tiny corpus, so the M batches after the checkpoint cross epochs.
  files = _write_jsonl(tmp_path / 'small.jsonl', [f'sample number {i} ' * 3 for i in range(40)])

  def make():
    return text_data.make_train_iterator(
        _config(train_files=files), tok, batch_size=4, seq_len=SEQ_LEN, seed=3
    )

  iterator = make()
  _take(iterator, 5)
  state = json.loads(json.dumps(iterator.get_state()))  # As a checkpoint.
  expected = _take(iterator, 12)
  resumed = make()
  assert not np.array_equal(next(resumed)['inputs'], expected[0]['inputs'])
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 12), expected)


def test_processes_split_the_same_global_batch(tok, tmp_path):
  """A process keeps its rows of the batch one process would see: any rows, far apart where
  a model axis spans the hosts (sharding.process_batch_rows)."""
  files = _write_jsonl(tmp_path / 'docs.jsonl', [f'unique text {i}' for i in range(60)])
  make = lambda rows: text_data.make_train_iterator(
      _config(train_files=files), tok, batch_size=4, seq_len=SEQ_LEN, seed=0, rows=rows
  )
  whole = _take(make(None), 10)
  parts = [np.array([0, 3]), np.array([1, 2])]
  halves = [_take(make(text_data.BatchRows(indices, 4)), 10) for indices in parts]
  assert halves[0][0]['inputs'].shape == (2, SEQ_LEN)
  for step, batch in enumerate(whole):
    for key, x in batch.items():
      for indices, half in zip(parts, halves):
        np.testing.assert_array_equal(half[step][key], x[indices])


def test_evaluation_pads_the_batch_to_fill_the_shards_with_weight_0_rows(tok, tmp_path):
  """Filling the mesh's batch shards adds padding rows, not more of the data: the loss does
  not depend on the number of devices."""
  files = _write_jsonl(tmp_path / 'docs.jsonl', [f'unique text {i}' for i in range(60)])
  make = lambda rows: text_data.make_eval_batches(
      _config(eval_files=files), tok, batch_size=3, seq_len=SEQ_LEN, rows=rows
  )
  whole = make(None)
  filled = make(text_data.BatchRows(np.arange(4), 4))  # 3 rows on 4 devices
  second = make(text_data.BatchRows(np.array([2, 3]), 4))  # a process with the last two
  assert len(whole) == len(filled) == len(second) > 1
  for batch, padded, last_two in zip(whole, filled, second):
    for key, x in batch.items():
      np.testing.assert_array_equal(padded[key][:3], x)
      np.testing.assert_array_equal(last_two[key], padded[key][2:])
    assert not padded['weights'][3].any() and not padded['segment_ids'][3].any()


# ---------------------------------------------------------------- errors ---


def _train(tok, files, **kwargs):
  return text_data.make_train_iterator(
      _config(train_files=files), tok, batch_size=4, seq_len=SEQ_LEN, seed=0, **kwargs
  )


def test_missing_files(tok, tmp_path):
  with pytest.raises(text_data.DataError, match='No files match.*nothing'):
    _train(tok, str(tmp_path / 'nothing*.txt'))
  good = _write_jsonl(tmp_path / 'ok.jsonl', ['x' * 1000])
  with pytest.raises(text_data.DataError, match='missing.txt'):
    _train(tok, f'{good}, {tmp_path}/missing.txt')


@pytest.mark.parametrize('name', ['empty.txt', 'empty.jsonl', 'empty.npy'])
def test_empty_file(tok, tmp_path, name):
  (tmp_path / name).write_bytes(b'')
  with pytest.raises(text_data.DataError, match=f'{name}: file is empty'):
    _train(tok, str(tmp_path / name))


def test_undecodable_bytes(tok, tmp_path):
  path = tmp_path / 'bad.txt'
  path.write_bytes(b'hello \xff world')
  with pytest.raises(text_data.DataError, match='bad.txt: invalid UTF-8 at byte offset 6'):
    _train(tok, str(path))


def test_bad_json_lines(tok, tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"text": "fine"}\n{"text": oops}\n')
  with pytest.raises(text_data.DataError, match='bad.jsonl:2: not valid JSON'):
    _train(tok, str(path))
  path.write_text('{"text": "fine"}\n{"body": "no text"}\n')
  with pytest.raises(text_data.DataError, match='bad.jsonl:2: expected'):
    _train(tok, str(path))


def test_token_ids_outside_vocab(tok, tmp_path):
  path = tmp_path / 'ids.npy'
  np.save(path, np.array([1, 5, tok.vocab_size + 3, 2], np.int32))
  with pytest.raises(
      text_data.DataError,
      match=f'ids.npy: token id {tok.vocab_size + 3} at index 2'
      f'.*vocabulary \\(size {tok.vocab_size}\\)',
  ):
    _train(tok, str(path))
  np.save(path, np.zeros((2, 3), np.int32))
  with pytest.raises(text_data.DataError, match='ids.npy: expected a 1-D'):
    _train(tok, str(path))


def test_corpus_too_small(tok, tmp_path):
  files = _write_jsonl(tmp_path / 'tiny.jsonl', ['hi'])
  have, needed = len(tok.encode('hi')) + 2, 4 * (SEQ_LEN + 1)
  with pytest.raises(text_data.DataError, match=f'too small.* has {have} tokens.*needs {needed}'):
    _train(tok, files)


def test_read_texts(tmp_path):
  files = _write_jsonl(tmp_path / 'a.jsonl', ['one', 'two', 'three'])
  assert text_data.read_texts(files) == ['one', 'two', 'three']
  assert text_data.read_texts(files, max_bytes=6) == ['one', 'two']
  assert text_data.read_texts(files, max_bytes=5) == ['one']
  np.save(tmp_path / 'b.npy', np.arange(3))
  with pytest.raises(text_data.DataError, match='b.npy'):
    text_data.read_texts(str(tmp_path / 'b.npy'))
