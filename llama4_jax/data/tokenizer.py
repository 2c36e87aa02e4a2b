"""SentencePiece BPE tokenizer with Llama 4 special tokens and chat format; a run's tokenizer.

The real Llama 4 tokenizer (tiktoken, 202,048 ids) cannot be downloaded here,
so we train small SentencePiece BPE models with the same special-token
strings. Ids are ours: the special tokens come first, in `SPECIAL_TOKENS`
order (so pad = 0, bos = 1, eos = 2), then `<unk>`, then the 256 byte-fallback
pieces, then the learned merges. Text decodes back exactly (no normalization,
no dummy prefix, whitespace kept, unknown characters as bytes), except that
SentencePiece's own space mark U+2581 comes back as a space.
"""

import io
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import sentencepiece as spm

from llama4_jax.data import text as text_data

PAD = '<|finetune_right_pad|>'
BOS = '<|begin_of_text|>'
EOS = '<|end_of_text|>'
EOT = '<|eot|>'
SPECIAL_TOKENS = (
    PAD,
    BOS,
    EOS,
    '<|header_start|>',
    '<|header_end|>',
    EOT,
    '<|eom|>',
    '<|python_start|>',
    '<|python_end|>',
    '<|image_start|>',
    '<|image_end|>',
    '<|image|>',
    '<|patch|>',
    '<|tile_x_separator|>',
    '<|tile_y_separator|>',
)
# Sampled text for the built-in tokenizer: enough for a 4k vocab in seconds.
DEFAULT_TRAIN_BYTES = 4_000_000


class Tokenizer:
  """A SentencePiece model plus the Llama 4 special-token conventions."""

  def __init__(self, model_proto: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    unk_id = self._sp.unk_id()
    self._special_ids = {}
    for name in SPECIAL_TOKENS:
      token_id = self._sp.piece_to_id(name)
      if token_id != unk_id:
        self._special_ids[name] = token_id
    for name in (PAD, BOS, EOS, EOT):
      if name not in self._special_ids:
        raise ValueError(
            f'Tokenizer model lacks special token {name}; train one with '
            'scripts/train_tokenizer.py.'
        )

  @classmethod
  def load(cls, path: str) -> 'Tokenizer':
    with open(path, 'rb') as f:
      return cls(f.read())

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def bos_id(self) -> int:
    return self._special_ids[BOS]

  @property
  def eos_id(self) -> int:
    return self._special_ids[EOS]

  @property
  def pad_id(self) -> int:
    return self._special_ids[PAD]

  @property
  def eot_id(self) -> int:
    return self._special_ids[EOT]

  def special_token_id(self, name: str) -> int:
    """Id of a special token, e.g. '<|header_start|>'."""
    if name not in self._special_ids:
      raise KeyError(f'Unknown special token {name!r}.')
    return self._special_ids[name]

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """Token ids of `text`; special-token strings become their single ids."""
    ids = self._sp.encode(text)
    if bos:
      ids = [self.bos_id] + ids
    if eos:
      ids = ids + [self.eos_id]
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of data texts, in SentencePiece's C++ threads: special-token strings in
    them stay text (a `<|patch|>` in a document is 9 characters, not an image slot)."""
    texts = list(texts)
    ids = self._sp.encode(texts)
    for i, text in enumerate(texts):
      if '<|' in text:  # rare: re-encode with special-token strings broken up
        ids[i] = self.encode_text(text)
    return ids

  def encode_text(self, text: str) -> list[int]:
    """Token ids of `text` in which special-token strings are ordinary characters.

    SentencePiece matches its special tokens anywhere in a text; each occurrence is
    encoded as its first character and the rest, which are no special token (the ids
    decode to the same string).
    """
    pattern = '|'.join(re.escape(name) for name in sorted(self._special_ids, key=len, reverse=True))
    ids, start = [], 0
    for match in re.finditer(pattern, text):
      ids += self._sp.encode(text[start : match.start()])
      ids += self._sp.encode(match.group()[:1]) + self._sp.encode(match.group()[1:])
      start = match.end()
    return ids + self._sp.encode(text[start:])

  def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
    ids = [int(i) for i in ids]
    if skip_special:
      special = set(self._special_ids.values())
      ids = [i for i in ids if i not in special]
    return self._sp.decode(ids)

  def format_chat(
      self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
  ) -> list[int]:
    """Token ids of a Llama 4 chat, starting with exactly one BOS.

    Each message is `<|header_start|>{role}<|header_end|>`, two newlines,
    `{content}<|eot|>`; the generation prompt is an open assistant header.
    The ids are built piecewise rather than by encoding a templated string,
    so no second BOS can sneak in (docs/llama4_architecture.md §7).

    Args:
      messages: dicts with 'role' ('system', 'user', 'assistant', 'ipython')
        and 'content'.
      add_generation_prompt: end with an assistant header for sampling.
    """
    ids = [self.bos_id]
    for message in messages:
      ids += self._header(message['role'])
      ids += self.encode(message['content']) + [self.eot_id]
    if add_generation_prompt:
      ids += self._header('assistant')
    return ids

  def _header(self, role: str) -> list[int]:
    return (
        [self.special_token_id('<|header_start|>')]
        + self.encode(role)
        + [self.special_token_id('<|header_end|>')]
        + self.encode('\n\n')
    )


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, output_path: str | None = None
) -> Tokenizer:
  """Trains a BPE tokenizer on `texts`; writes it atomically if asked.

  SentencePiece trains on lines, so newlines are never merged; they encode
  as the byte piece <0x0A>, one token each. `vocab_size` must exceed the 272
  fixed pieces (specials, <unk>, bytes) plus the corpus's common characters.
  """
  lines = (line for text in texts for line in text.splitlines() if line)
  model = io.BytesIO()
  spm.set_random_generator_seed(0)  # Same corpus -> same pieces and ids.
  try:
    _train_sentencepiece(lines, model, vocab_size)
  except RuntimeError as e:  # sentencepiece's own checks, as a multi-line C++ status
    needed = re.search(r'smaller than required_chars\. \d+ vs (\d+)', str(e))
    if needed is None:
      raise
    raise ValueError(
        f'vocab_size={vocab_size} is too small for this text: its characters and '
        f'the special tokens need at least {needed.group(1)} ids'
    ) from None
  proto = model.getvalue()
  if output_path:
    _write_atomically(output_path, proto)
  return Tokenizer(proto)


def _train_sentencepiece(lines, model, vocab_size: int):
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines,
      model_writer=model,
      model_type='bpe',
      vocab_size=vocab_size,
      user_defined_symbols=list(SPECIAL_TOKENS),  # Matched inside text.
      unk_id=len(SPECIAL_TOKENS),
      bos_id=-1,
      eos_id=-1,
      pad_id=-1,
      byte_fallback=True,
      character_coverage=0.9995,  # Rare characters go to bytes.
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,  # Learn indentation runs.
      split_digits=True,
      max_sentence_length=1 << 14,
      train_extremely_large_corpus=False,
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
  )


def _write_atomically(path: str, content: bytes) -> None:
  """Writes via a temp file + rename, so readers never see a partial file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=directory, suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(content)
    os.replace(tmp_path, path)
  except BaseException:
    os.unlink(tmp_path)
    raise


def builtin_tokenizer_path(cache_dir: str, vocab_size: int, max_bytes: int) -> str:
  # The corpus is this interpreter's stdlib, so the version is in the key.
  version = f'py{sys.version_info.major}{sys.version_info.minor}'
  return os.path.join(cache_dir, f'builtin_{version}_v{vocab_size}_b{max_bytes}.model')


def load_or_train_builtin_tokenizer(
    cache_dir: str, vocab_size: int, max_bytes: int = DEFAULT_TRAIN_BYTES
) -> Tokenizer:
  """Trains on the built-in corpus's train split once; reuses it after."""
  path = builtin_tokenizer_path(cache_dir, vocab_size, max_bytes)
  if os.path.exists(path):
    return Tokenizer.load(path)
  return train_tokenizer(text_data.read_texts('', max_bytes), vocab_size, path)


def _cache_dir(data_config, workdir: str = '') -> str:
  """Where a run keeps its built-in tokenizer: data.tokenizer_cache, else <workdir>/tokenizer."""
  return data_config.get('tokenizer_cache') or (
      os.path.join(workdir, 'tokenizer')
      if workdir
      else os.path.join(os.path.expanduser('~'), '.cache', 'llama4_jax')
  )


def _check_fits(tokenizer: Tokenizer, vocab_size: int) -> Tokenizer:
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(
        f'Tokenizer has {tokenizer.vocab_size} ids but the model only '
        f'{vocab_size}; raise model.vocab_size.'
    )
  return tokenizer


def load_tokenizer(data_config, vocab_size: int, workdir: str = '') -> Tokenizer:
  """The tokenizer a training run asks for, trained first if it is the built-in one.

  Args:
    data_config: ConfigDict with `tokenizer` (a .model path; empty = the
      built-in one) and optionally `tokenizer_cache` (its directory) and
      `tokenizer_train_bytes`.
    vocab_size: the model's vocabulary size; the built-in tokenizer is trained
      to exactly this size, a given model may be smaller.
    workdir: the run's; its built-in tokenizer is kept in <workdir>/tokenizer
      unless `tokenizer_cache` says otherwise (no workdir: ~/.cache/llama4_jax).
  """
  if data_config.tokenizer:
    tokenizer = Tokenizer.load(data_config.tokenizer)
  else:
    tokenizer = load_or_train_builtin_tokenizer(
        _cache_dir(data_config, workdir),
        vocab_size,
        data_config.get('tokenizer_train_bytes') or DEFAULT_TRAIN_BYTES,
    )
  return _check_fits(tokenizer, vocab_size)


def run_tokenizer(workdir: str, config, path: str = '') -> Tokenizer:
  """The tokenizer of a trained or converted run, for evaluation and generation.

  `path` (a .model file) if given, else the run's `data.tokenizer`, else the
  built-in one it trained and cached; never trains one. A tokenizer with more
  ids than the model is an error.
  """
  if path and not os.path.exists(path):
    raise FileNotFoundError(f'{path}: tokenizer file not found')
  data_config = config.data
  path = path or data_config.get('tokenizer')
  if not path:
    cache_dir = _cache_dir(data_config, workdir)
    path = builtin_tokenizer_path(
        cache_dir,
        config.model.vocab_size,
        data_config.get('tokenizer_train_bytes') or DEFAULT_TRAIN_BYTES,
    )
    if not os.path.exists(path):
      raise FileNotFoundError(
          f'{workdir}: no tokenizer: config.data.tokenizer is empty and {cache_dir} holds no '
          f'built-in tokenizer for this model; pass the tokenizer .model file (--tokenizer)'
      )
  return _check_fits(Tokenizer.load(path), config.model.vocab_size)


class TokenIds(NamedTuple):
  """What reading .npy token files needs of a tokenizer, when there is none."""

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int


def tokenizer_for_files(workdir: str, config, files: str = '', path: str = ''):
  """`run_tokenizer`; for .npy token files only, the model's special ids if there is none."""
  if files and all(f.endswith('.npy') for f in text_data.expand_globs(files)):
    try:
      return run_tokenizer(workdir, config, path)
    except FileNotFoundError:
      m = config.model
      return TokenIds(m.vocab_size, m.bos_token_id, m.eos_token_ids[0], m.pad_token_id)
  return run_tokenizer(workdir, config, path)
