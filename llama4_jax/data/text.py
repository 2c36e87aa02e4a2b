"""Text data: documents and token files -> token pieces -> packed [B, S] batches (grain).

Documents come from the built-in corpus (this interpreter's standard-library
sources and pydoc topics, so nothing is downloaded) or from user files:

  * text files (any other extension): one document per file;
  * `.jsonl`: one document per line, from its string field `text`;
  * `.npy`: a 1-D integer token stream, see `split_at_eos`.

Each document becomes [BOS] + tokens + [EOS] and is cut into pieces of at most
S + 1 tokens (`split_document`). Pieces are shuffled
(a new order each epoch) and packed first-fit into rows of S + 1 tokens; a row
gives `inputs = row[:-1]` and `targets = row[1:]`. Batches are dicts of numpy
arrays of shape [B, S], B the rows of each global batch a process feeds (`BatchRows`):

  inputs, targets: int32 token ids, pad_id in the padding.
  segment_ids: int32, 1, 2, ... per piece within the row, 0 = padding.
  positions: int32, restarting at 0 at the start of each piece.
  weights: float32, 1 where the target follows the input in the same piece.

Everything is tokenized up front and held in memory: fine for the corpora a
2-core CPU or a small research run uses (about 4 bytes per token).
"""

import functools
import glob
import hashlib
import itertools
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np
from etils import epath

VALIDATION_FRACTION = 0.02
# Vendored packages and test suites are not the stdlib's own prose and code.
_SKIP_DIRS = frozenset(
    {'site-packages', 'dist-packages', 'test', 'tests', 'idle_test', '__pycache__'}
)
# Its text is added per topic, as prose, rather than as one quoted dict.
_SKIP_FILES = frozenset({'pydoc_data/topics.py'})


class DataError(ValueError):
  """Bad input data; the message names the file and what is wrong."""


# ---------------------------------------------------------------- built-in ---


def _split_and_key(name: str) -> tuple[str, int]:
  """Stable split and sort key of a document name (no Python hash seed)."""
  key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], 'big')
  is_eval = key % 10_000 < VALIDATION_FRACTION * 10_000
  return ('validation' if is_eval else 'train'), key


def _read_stdlib_file(path: str) -> str:
  with open(path, encoding='utf-8', errors='replace') as f:
    return f.read()


def _builtin_loaders() -> dict[str, functools.partial]:
  """Name -> zero-argument loader of every built-in document."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  stdlib = sysconfig.get_paths()['stdlib']
  loaders = {}
  for root, dirs, files in os.walk(stdlib):
    dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
    for name in files:
      path = os.path.join(root, name)
      rel_path = os.path.relpath(path, stdlib).replace(os.sep, '/')
      if name.endswith('.py') and rel_path not in _SKIP_FILES:
        loaders[rel_path] = functools.partial(_read_stdlib_file, path)
  for topic in topics.topics:
    loaders[f'pydoc_data/topics/{topic}'] = functools.partial(topics.topics.get, topic)
  return loaders


def builtin_documents(split: str, max_bytes: int) -> list[tuple[str, str]]:
  """(name, text) of a built-in split, up to `max_bytes` of UTF-8 (0 = all).

  Documents go to 'train' or 'validation' by a hash of their relative path,
  and are taken in hash order, so the split and the subset under a cap are
  the same on every machine with the same Python version.
  """
  if split not in ('train', 'validation'):
    raise ValueError(f'Unknown split {split!r}.')
  keyed = []
  for name, load in _builtin_loaders().items():
    doc_split, key = _split_and_key(name)
    if doc_split == split:
      keyed.append((key, name, load))
  docs, total = [], 0
  for _, name, load in sorted(keyed, key=lambda t: t[:2]):
    text = load()
    size = len(text.encode())
    if not text.strip():
      continue
    if max_bytes and docs and total + size > max_bytes:
      break
    docs.append((name, text))
    total += size
  return docs


# ------------------------------------------------------------- user files ---


def expand_globs(patterns: str) -> list[str]:
  """Sorted files matching a comma-separated list of globs (`**` allowed)."""
  paths = []
  for pattern in (p.strip() for p in patterns.split(',')):
    if not pattern:
      continue
    matches = glob.glob(os.path.expanduser(pattern), recursive=True)
    matches = sorted(m for m in matches if os.path.isfile(m))
    if not matches:
      raise DataError(f'No files match {pattern!r}.')
    paths += matches
  if not paths:
    raise DataError(f'No data files given ({patterns!r}).')
  return list(dict.fromkeys(paths))


def _read_text(path: str) -> str:
  """A file's text (any epath); errors name the file."""
  raw = epath.Path(path).read_bytes()
  if not raw:
    raise DataError(f'{path}: file is empty.')
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise DataError(f'{path}: invalid UTF-8 at byte offset {e.start} ({e.reason}).') from None


def jsonl_records(path: str, kind: str) -> Iterator[tuple[str, Any]]:
  """(`file:line`, parsed value) of each non-blank line of a JSON Lines file (any epath).

  `kind` names the file in errors ('chat data'). A missing file, a line that is not JSON
  and a file without any record are errors that name the file (and line).
  """
  if not epath.Path(path).is_file():
    raise DataError(f'{path}: {kind} file not found')
  count = 0
  # Not splitlines(): it also splits at U+2028 etc. inside JSON strings.
  for line_no, line in enumerate(_read_text(path).split('\n'), start=1):
    if not line.strip():
      continue
    where = f'{path}:{line_no}'
    try:
      value = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f'{where}: not valid JSON ({e.msg})') from None
    count += 1
    yield where, value
  if not count:
    raise DataError(f'{path}: no JSON lines')


def _read_jsonl(path: str) -> list[str]:
  texts = []
  for where, record in jsonl_records(path, 'text data'):
    if not isinstance(record, dict) or not isinstance(record.get('text'), str):
      raise DataError(f'{where}: expected an object with a string "text" field.')
    texts.append(record['text'])
  return texts


def split_at_eos(tokens: np.ndarray, bos_id: int, eos_id: int) -> list[np.ndarray]:
  """Documents of a token stream: it is cut after every EOS.

  A BOS is prepended to each document that does not start with one, and an
  EOS appended to a trailing document that does not end with one; so an
  array without EOS is one document.
  """
  docs = []
  for doc in np.split(tokens, np.flatnonzero(tokens == eos_id) + 1):
    if doc.size == 0:
      continue
    if doc[0] != bos_id:
      doc = np.concatenate([[bos_id], doc])
    if doc[-1] != eos_id:
      doc = np.concatenate([doc, [eos_id]])
    docs.append(doc.astype(np.int32))
  return docs


def read_token_file(path: str, vocab_size: int) -> np.ndarray:
  """A validated 1-D token array from a `.npy` file (loaded without pickle)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  if os.path.getsize(path) == 0:
    raise DataError(f'{path}: file is empty.')
  try:
    tokens = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise DataError(f'{path}: not a readable .npy array ({e}).') from None
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise DataError(
        f'{path}: expected a 1-D integer array, got ' f'{tokens.dtype} of shape {tokens.shape}.'
    )
  if tokens.size == 0:
    raise DataError(f'{path}: token array is empty.')
  bad = (tokens < 0) | (tokens >= vocab_size)
  if bad.any():
    i = int(np.argmax(bad))
    raise DataError(
        f'{path}: token id {tokens[i]} at index {i} is outside '
        f'the vocabulary (size {vocab_size}).'
    )
  return tokens


def token_windows(tokens: np.ndarray, seq_len: int) -> list[np.ndarray]:
  """Windows of at most seq_len + 1 tokens that score each next-token prediction of the
  stream once: neighbours share a token (`split_document`), the last may be shorter."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f'expected a 1-D array of token ids, got shape {tokens.shape}')
  if len(tokens) < 2:
    raise ValueError(f'{len(tokens)} token(s), fewer than 2: no next token to predict')
  return split_document(tokens, seq_len + 1)


def windows_to_batches(
    windows: Sequence[np.ndarray], batch_size: int, seq_len: int
) -> list[dict[str, np.ndarray]]:
  """Batches of one window a row, in order, each row seq_len + 1 tokens; shorter windows and
  the last batch are padded with weight 0."""
  length = seq_len + 1
  batches = []
  for start in range(0, len(windows), batch_size):
    group = windows[start : start + batch_size]
    tokens = np.zeros((len(group), length), np.int32)
    for row, window in enumerate(group):
      tokens[row, : len(window)] = window
    lengths = np.array([len(window) for window in group])
    packed = {
        'tokens': tokens,
        'tokens_segment_ids': (np.arange(length) < lengths[:, None]).astype(np.int32),
        'tokens_positions': np.broadcast_to(np.arange(length), tokens.shape),
    }
    batches.append(_to_features(pad_rows(packed, rows=batch_size)))
  return batches


# ----------------------------------------------------------------- tokens ---


def _encode_texts(texts: list[str], tokenizer) -> list[np.ndarray]:
  bos, eos = [tokenizer.bos_id], [tokenizer.eos_id]
  return [np.array(bos + ids + eos, np.int32) for ids in tokenizer.encode_batch(texts)]


def _file_texts(path: str) -> list[str]:
  return _read_jsonl(path) if path.endswith('.jsonl') else [_read_text(path)]


def read_texts(files: str, max_bytes: int = 0) -> list[str]:
  """Texts of text and `.jsonl` files, or of the built-in train split.

  Args:
    files: comma-separated globs; empty = the built-in corpus train split.
    max_bytes: read texts while they total at most this much UTF-8 (0 = all).
  """
  if not files:
    return [text for _, text in builtin_documents('train', max_bytes)]
  texts, total = [], 0
  for path in expand_globs(files):
    if path.endswith('.npy'):
      raise DataError(f'{path}: token arrays have no text to read.')
    for text in _file_texts(path):
      total += len(text.encode())
      if max_bytes and texts and total > max_bytes:
        return texts
      texts.append(text)
  return texts


def load_documents(
    files: str, tokenizer, *, builtin_split: str, builtin_max_bytes: int
) -> list[np.ndarray]:
  """Token arrays [BOS, ..., EOS] of all documents; empty `files` = built-in."""
  if not files:
    docs = builtin_documents(builtin_split, builtin_max_bytes)
    return _encode_texts([text for _, text in docs], tokenizer)
  docs = []
  for path in expand_globs(files):
    if path.endswith('.npy'):
      tokens = read_token_file(path, tokenizer.vocab_size)
      docs += split_at_eos(tokens, tokenizer.bos_id, tokenizer.eos_id)
    else:
      docs += _encode_texts(_file_texts(path), tokenizer)
  return docs


def split_document(doc: np.ndarray, max_len: int) -> list[np.ndarray]:
  """Pieces of at most `max_len` tokens; neighbouring pieces share a token.

  The shared token is the last target of one piece and the first input of
  the next, so each next-token prediction of the document is made once.
  """
  stride = max_len - 1
  return [doc[i : i + max_len] for i in range(0, max(len(doc) - 1, 1), stride)]


def _load_pieces(
    files: str, tokenizer, *, split: str, max_bytes: int, seq_len: int
) -> list[np.ndarray]:
  docs = load_documents(files, tokenizer, builtin_split=split, builtin_max_bytes=max_bytes)
  return [piece for doc in docs for piece in split_document(doc, seq_len + 1)]


# ---------------------------------------------------------------- batches ---


def _as_packable(tokens: np.ndarray) -> dict[str, np.ndarray]:
  return {'tokens': tokens}


def _pack(
    pieces: grain.MapDataset,
    *,
    seq_len: int,
    padding: dict[str, int],
    num_bins: int,
    seed: int,
    shuffle: bool,
) -> grain.IterDataset:
  """Rows of S + 1 values per feature of the pieces (each a dict with the keys of
  `padding`, the value padding fills in), with `<feature>_segment_ids` and
  `<feature>_positions`."""
  # In-memory data: reader threads would only contend for the GIL.
  read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return grain.experimental.FirstFitPackIterDataset(
      pieces.to_iter_dataset(read_options),
      length_struct={key: seq_len + 1 for key in padding},
      num_packing_bins=num_bins,
      seed=seed,
      shuffle_bins=shuffle,
      padding_struct=padding,
  )


def pad_rows(
    batch: dict[str, np.ndarray], *, rows: int, fill: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
  """Pads every array of a batch to `rows` rows (a static batch shape).

  The new rows hold `fill[key]` (default 0): segment 0 and weight 0, so they are
  padding that no loss or statistic counts.
  """
  fill = fill or {}

  def pad(key, x):
    widths = ((0, rows - len(x)),) + ((0, 0),) * (x.ndim - 1)
    return np.pad(x, widths, constant_values=fill.get(key, 0))

  return {key: pad(key, x) for key, x in batch.items()}


def _to_features(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Packed rows of S + 1 tokens (R) -> model inputs and targets of S.

  A target has weight 1 if it follows its input in the same piece and, where the pieces
  say which tokens to learn (`learn`, chat data), it is one of them.
  """
  tokens_BR = packed['tokens'].astype(np.int32)
  segments_BR = packed['tokens_segment_ids'].astype(np.int32)
  positions_BR = packed['tokens_positions'].astype(np.int32)
  weights_BS = (segments_BR[:, 1:] == segments_BR[:, :-1]) & (segments_BR[:, 1:] > 0)
  if 'learn' in packed:
    weights_BS &= packed['learn'][:, 1:] > 0
  return {
      'inputs': tokens_BR[:, :-1],
      'targets': tokens_BR[:, 1:],
      'segment_ids': segments_BR[:, :-1],
      'positions': positions_BR[:, :-1],
      'weights': weights_BS.astype(np.float32),
  }


class BatchRows(NamedTuple):
  """The rows of every global batch that a process feeds (each process builds them all).

  `indices`, sorted, are those its devices hold (`sharding.process_batch_rows`);
  `global_size` is the global batch's rows: its real rows, then, where evaluation fills the
  mesh's batch shards, rows of padding (weight 0).
  """

  indices: np.ndarray
  global_size: int


def all_rows(batch_size: int) -> BatchRows:
  """Every row: what one process on its own feeds."""
  return BatchRows(np.arange(batch_size), batch_size)


def _num_bins(data_config, batch_size: int) -> int:
  # More bins pack tighter (less padding) for a little memory and latency.
  return data_config.get('packing_bins', 0) or max(4 * batch_size, 64)


def take_rows(
    batch: dict[str, np.ndarray], rows: BatchRows, fill: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
  """A process's `rows` of a global batch, padded first to `rows.global_size` (see `pad_rows`)."""
  batch = pad_rows(batch, rows=rows.global_size, fill=fill)
  return {key: x[rows.indices] for key, x in batch.items()}


def make_train_iterator(
    data_config,
    tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    rows: BatchRows | None = None,
) -> grain.DatasetIterator:
  """Infinite iterator of shuffled, packed training batches for one process.

  Every process builds the same global batch and keeps its own rows, so the
  batches (and losses) do not depend on the number of processes.
  Pieces are reshuffled every epoch. Checkpoint the iterator with
  `get_state()` / `set_state()` (a JSON-able dict); a restored iterator
  continues with exactly the same batches.

  Args:
    data_config: ConfigDict with `train_files` (empty = built-in train split),
      `builtin_max_bytes` and optionally `packing_bins`.
    tokenizer: a `tokenizer.Tokenizer`.
    batch_size: global batch size.
    seq_len: S, the model's sequence length.
    seed: seed of the shuffles; same seed, same batches.
    rows: the rows this process feeds (default: all).
  """
  pieces = _load_pieces(
      data_config.train_files,
      tokenizer,
      split='train',
      max_bytes=data_config.builtin_max_bytes,
      seq_len=seq_len,
  )
  return packed_train_iterator(
      [_as_packable(p) for p in pieces],
      data_config,
      source=data_config.train_files or 'the built-in corpus (train split)',
      padding={'tokens': tokenizer.pad_id},
      batch_size=batch_size,
      seq_len=seq_len,
      seed=seed,
      rows=all_rows(batch_size) if rows is None else rows,
  )


def packed_train_iterator(
    pieces: list[dict[str, np.ndarray]],
    data_config,
    *,
    source: str,
    padding: dict[str, int],
    batch_size: int,
    seq_len: int,
    seed: int,
    rows: BatchRows,
) -> grain.DatasetIterator:
  """`make_train_iterator` of pieces already made (dicts of 1-D arrays, `padding`'s keys);
  `source` names them in errors."""
  num_tokens = sum(len(p['tokens']) for p in pieces)
  needed = batch_size * (seq_len + 1)
  if num_tokens < needed:
    raise DataError(
        f'{source} is too small for one batch: it has {num_tokens} tokens, one '
        f'batch of {batch_size} x {seq_len + 1} needs {needed}.'
    )
  seed %= 2**32  # grain's shuffle takes 32-bit seeds.
  ds = _pack(
      grain.MapDataset.source(pieces).shuffle(seed).repeat(),
      seq_len=seq_len,
      padding=padding,
      seed=seed,
      shuffle=True,
      num_bins=_num_bins(data_config, batch_size),
  )
  ds = ds.batch(batch_size, drop_remainder=True).map(_to_features)
  return iter(ds.map(functools.partial(take_rows, rows=rows)))


def make_eval_batches(
    data_config,
    tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    rows: BatchRows | None = None,
) -> list[dict[str, np.ndarray]]:
  """Deterministic evaluation batches, in corpus order, for one process.

  Arguments are those of `make_train_iterator`, with `eval_files` (empty =
  built-in validation split) in `data_config`, and `max_batches` (None or 0 =
  all). Every process builds the same global batches of `batch_size` rows and
  keeps its rows, so all get the same number of batches. The last batch, and
  every batch up to `rows.global_size`, is padded with empty rows (weights 0) to keep
  shapes static.
  """
  pieces = _load_pieces(
      data_config.eval_files,
      tokenizer,
      split='validation',
      max_bytes=data_config.builtin_max_bytes,
      seq_len=seq_len,
  )
  return packed_eval_batches(
      [_as_packable(p) for p in pieces],
      data_config,
      padding={'tokens': tokenizer.pad_id},
      batch_size=batch_size,
      seq_len=seq_len,
      max_batches=max_batches,
      rows=all_rows(batch_size) if rows is None else rows,
  )


def packed_eval_batches(
    pieces: list[dict[str, np.ndarray]],
    data_config,
    *,
    padding: dict[str, int],
    batch_size: int,
    seq_len: int,
    max_batches: int | None,
    rows: BatchRows,
) -> list[dict[str, np.ndarray]]:
  """`make_eval_batches` of pieces already made (see `packed_train_iterator`)."""
  ds = _pack(
      grain.MapDataset.source(pieces),
      seq_len=seq_len,
      padding=padding,
      seed=0,
      shuffle=False,
      num_bins=_num_bins(data_config, batch_size),
  )
  ds = (
      ds.batch(batch_size)
      .map(functools.partial(pad_rows, rows=batch_size, fill=padding))
      .map(_to_features)
  )
  fill = {'inputs': padding['tokens'], 'targets': padding['tokens']}  # as _to_features pads
  return [take_rows(batch, rows, fill) for batch in itertools.islice(ds, max_batches or None)]


def unigram_loss(data_config, tokenizer, *, seq_len: int) -> float:
  """Validation NLL (nats/token) of the best unigram model of the training split.

  The baseline a language model must beat: token frequencies of the training
  pieces (add-one smoothed), scored on the validation pieces' targets.
  """
  train = _load_pieces(
      data_config.train_files,
      tokenizer,
      split='train',
      max_bytes=data_config.builtin_max_bytes,
      seq_len=seq_len,
  )
  valid = _load_pieces(
      data_config.eval_files,
      tokenizer,
      split='validation',
      max_bytes=data_config.builtin_max_bytes,
      seq_len=seq_len,
  )
  counts = np.ones(tokenizer.vocab_size, np.float64)
  for piece in train:
    np.add.at(counts, piece[1:], 1)
  log_probs = np.log(counts / counts.sum())
  targets = np.concatenate([piece[1:] for piece in valid])
  return float(-log_probs[targets].mean())
