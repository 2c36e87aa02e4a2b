"""Tokenizers with the Llama 4 special tokens and chat format, and which one a run uses.

Two kinds of tokenizer file, one interface (`encode`, `encode_text`, `encode_batch`,
`decode`, the special ids, and the chat format of `ChatFormat`):

* `Tokenizer`: a SentencePiece BPE model this project trains (`train_tokenizer`) with the
  Llama 4 special-token strings. Ids are ours: the special tokens come first, in
  `SPECIAL_TOKENS` order (so pad = 0, bos = 1, eos = 2), then `<unk>`, then the 256
  byte-fallback pieces, then the learned merges. Text decodes back exactly (no
  normalization, no dummy prefix, whitespace kept, unknown characters as bytes), except
  that SentencePiece's own space mark U+2581 comes back as a space.
* `ReleasedTokenizer`: a released `tokenizer.json` (Meta's Scout and Maverick: byte-level
  BPE, 200,000 ids plus special tokens from 200000), read with the `tokenizers` library.

`load(path)` reads either. A run's tokenizer (`load_tokenizer` for training,
`run_tokenizer` for evaluation and generation) is the first of: `data.tokenizer`; the
workdir's own file, <workdir>/tokenizer/tokenizer.json or tokenizer.model (a converted
checkpoint's, or one inherited); the `train.init_from` run's, copied into the workdir;
a SentencePiece model trained on the run's training text (its `data.train_files`, or the
built-in corpus) and cached in <workdir>/tokenizer.
"""

import hashlib
import io
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import sentencepiece as spm
import tokenizers
from etils import epath

from llama4_jax import config_lib
from llama4_jax.data import chat
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


REQUIRED_TOKENS = (PAD, BOS, EOS, EOT, '<|header_start|>', '<|header_end|>')
IMAGE = '<|image|>'
_IMAGE = object()  # an image part among a message's text segments


class ChatTokens(NamedTuple):
  ids: list[int]
  # Per id: whether it is assistant content or an assistant turn's closing <|eot|>, the
  # ids a fine-tune learns to produce.
  is_assistant: list[bool]


class ChatFormat:
  """The Llama 4 special tokens and chat format (docs/llama4_architecture.md §7), shared by
  both kinds of tokenizer.

  `<|begin_of_text|>`, then per message `<|header_start|>{role}<|header_end|>`, two
  newlines, the content, `<|eot|>`; a generation prompt is an open assistant header. The
  ids equal those of `transformers`' `apply_chat_template` with the released template
  (tokenized without added specials) for system, user and assistant turns: a first
  system message is stripped of surrounding whitespace, the text parts of a content list
  are concatenated between its image parts, and image parts become `<|image|>`. Two
  differences:

  * on purpose, special-token strings inside message text stay text, as in all data text
    here;
  * a first system message given as a list of parts is all its text parts, concatenated,
    then stripped (image parts dropped); the template keeps only its first part's text
    (`content[0]['text']`, marked FIXME there) and drops the other parts. They agree when
    the list is one text part.
  """

  def format_chat(
      self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
  ) -> list[int]:
    """Token ids of a chat (messages: dicts with 'role' and 'content'), one BOS first."""
    return self.chat_tokens(messages, add_generation_prompt).ids

  def chat_tokens(
      self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False
  ) -> ChatTokens:
    """The chat's ids and which of them are the assistant's (see `ChatTokens`).

    Content is a string or a list of parts, {"type": "text", "text": ...} or
    {"type": "image", ...}. Built piecewise, never by encoding a templated string, so no
    second BOS can sneak in (docs/llama4_architecture.md, pitfall 29).
    """
    ids, is_assistant = [self.bos_id], [False]
    header_ids = self.encode_text('\n\n')

    def add(new_ids, assistant):
      ids.extend(new_ids)
      is_assistant.extend([assistant] * len(new_ids))

    for index, message in enumerate(messages):
      role, assistant = message['role'], message['role'] == 'assistant'
      add(self._header(role), False)
      segments = _content_segments(message['content'])
      if index == 0 and role == 'system':  # the template trims a leading system message
        segments = [''.join(s for s in segments if s is not _IMAGE).strip()]
      if not segments or segments[0] is _IMAGE:
        segments.insert(0, '')
      # The newlines after the header are encoded with the text that follows them, as the
      # template's string is: BPE may merge them with it.
      segments[0] = '\n\n' + segments[0]
      for i, segment in enumerate(segments):
        if segment is _IMAGE:
          add([self.special_token_id(IMAGE)], False)
          continue
        segment_ids = self.encode_text(segment)
        if i == 0:  # the newlines belong to the header, as far as the ids keep them apart
          n = 0
          while n < min(len(header_ids), len(segment_ids)) and segment_ids[n] == header_ids[n]:
            n += 1
          add(segment_ids[:n], False)
          segment_ids = segment_ids[n:]
        add(segment_ids, assistant)
      add([self.eot_id], assistant)
    if add_generation_prompt:
      add(self._header('assistant') + self.encode_text('\n\n'), False)
    return ChatTokens(ids, is_assistant)

  def _header(self, role: str) -> list[int]:
    return (
        [self.special_token_id('<|header_start|>')]
        + self.encode_text(role)
        + [self.special_token_id('<|header_end|>')]
    )

  # The special tokens, from each tokenizer's `_special_ids` (name -> id).
  _special_ids: dict[str, int]

  bos_id = property(lambda self: self._special_ids[BOS])
  eos_id = property(lambda self: self._special_ids[EOS])
  pad_id = property(lambda self: self._special_ids[PAD])
  eot_id = property(lambda self: self._special_ids[EOT])

  def special_token_id(self, name: str) -> int:
    """Id of a special token, e.g. '<|header_start|>'."""
    if name not in self._special_ids:
      raise KeyError(f'Unknown special token {name!r}.')
    return self._special_ids[name]

  def encode_text(self, text: str) -> list[int]:  # each tokenizer's
    raise NotImplementedError


def _content_segments(content) -> list:
  """A message's content as text strings and image markers, in order; adjacent text parts
  are one string, as in the template's rendering, so BPE may merge across their boundary."""
  if isinstance(content, str):
    return [content]
  segments = []
  for part in content:
    if part['type'] == 'image':
      segments.append(_IMAGE)
    elif segments and segments[-1] is not _IMAGE:
      segments[-1] += part['text']
    else:
      segments.append(part['text'])
  return segments


def _check_required(special_ids: dict[str, int], source: str, hint: str) -> None:
  for name in REQUIRED_TOKENS:
    if name not in special_ids:
      raise ValueError(f'{source}: tokenizer lacks special token {name}; {hint}')


class Tokenizer(ChatFormat):
  """A SentencePiece model plus the Llama 4 special-token conventions."""

  def __init__(self, model_proto: bytes, source: str = 'tokenizer model'):
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(model_proto)
    except RuntimeError:
      raise ValueError(
          f'{source}: not a SentencePiece model (a released tokenizer is a tokenizer.json)'
      ) from None
    unk_id = self._sp.unk_id()
    self._special_ids = {}
    for name in SPECIAL_TOKENS:
      token_id = self._sp.piece_to_id(name)
      if token_id != unk_id:
        self._special_ids[name] = token_id
    _check_required(self._special_ids, source, 'train one with scripts/train_tokenizer.py.')

  @classmethod
  def load(cls, path: str) -> 'Tokenizer':
    return cls(epath.Path(path).read_bytes(), str(path))

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """Token ids of `text`; special-token strings become their single ids."""
    return _with_bos_eos(self, self._sp.encode(text), bos, eos)

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


class ReleasedTokenizer(ChatFormat):
  """A released Llama 4 `tokenizer.json` (Hugging Face `tokenizers` format), e.g. Scout's.

  Its ids are the released model's (`<|begin_of_text|>` = 200000, ..., 202,048 ids in
  all); its special tokens are the file's added tokens marked special. Encoding never adds
  the file's own BOS (its post-processor's): callers add it where the format wants it.
  """

  def __init__(self, json_text: str, source: str = 'tokenizer.json'):
    try:
      self._tok = tokenizers.Tokenizer.from_str(json_text)
      self._text_tok = tokenizers.Tokenizer.from_str(json_text)
    except Exception as e:  # the Rust library raises plain Exceptions
      raise ValueError(f'{source}: not a tokenizers JSON file ({e})') from None
    self._text_tok.encode_special_tokens = True  # data text: special strings stay text
    self._special_ids = {
        token.content: token_id
        for token_id, token in self._tok.get_added_tokens_decoder().items()
        if token.special
    }
    _check_required(self._special_ids, source, 'is it a Llama 4 tokenizer?')

  @classmethod
  def load(cls, path: str) -> 'ReleasedTokenizer':
    return cls(epath.Path(path).read_text(), str(path))

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """Token ids of `text`; special-token strings become their single ids."""
    return _with_bos_eos(self, self._tok.encode(text, add_special_tokens=False).ids, bos, eos)

  def encode_text(self, text: str) -> list[int]:
    """Token ids of `text` in which special-token strings are ordinary characters."""
    return self._text_tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode_text` of many texts, in the library's threads."""
    return [e.ids for e in self._text_tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def _with_bos_eos(tokenizer, ids: list[int], bos: bool, eos: bool) -> list[int]:
  return [tokenizer.bos_id] * bos + ids + [tokenizer.eos_id] * eos


AnyTokenizer = Tokenizer | ReleasedTokenizer


def load(path: str) -> AnyTokenizer:
  """A tokenizer file: a released `tokenizer.json` (or a folder holding one, e.g. a Hugging
  Face checkpoint), or a SentencePiece `.model`."""
  file = epath.Path(path)
  if file.is_dir():
    file = next((file / name for name in RUN_FILES if (file / name).exists()), file / RUN_FILES[0])
  if not file.exists():
    raise FileNotFoundError(f'{file}: tokenizer file not found')
  if file.name.endswith('.json'):
    return ReleasedTokenizer.load(str(file))
  return Tokenizer.load(str(file))


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
  """Writes via a temporary file and a rename (epath: a copy-then-delete on GCS), so that
  readers never see a partial file."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'.{path.name}.{os.getpid()}.tmp'
  try:
    tmp.write_bytes(content)
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


# Which tokenizer a run uses ------------------------------------------------------------

TOKENIZER_DIR = 'tokenizer'  # in a workdir
# A run's own tokenizer file, in its TOKENIZER_DIR: a converted checkpoint's, or inherited.
RUN_FILES = ('tokenizer.json', 'tokenizer.model')
# What a released checkpoint ships beside tokenizer.json; converted both ways with it.
RELEASED_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')


def trained_tokenizer_path(cache_dir: str, data_config, vocab_size: int) -> str:
  """Where the SentencePiece model trained on a run's training text is cached."""
  max_bytes = data_config.get('tokenizer_train_bytes') or DEFAULT_TRAIN_BYTES
  if data_config.train_files:  # the user's files, named by their globs
    digest = hashlib.sha256(data_config.train_files.encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f'files_{digest}_v{vocab_size}_b{max_bytes}.model')
  # The corpus is this interpreter's stdlib, so the version is in the key.
  version = f'py{sys.version_info.major}{sys.version_info.minor}'
  return os.path.join(cache_dir, f'builtin_{version}_v{vocab_size}_b{max_bytes}.model')


def load_or_train(data_config, vocab_size: int, cache_dir: str) -> Tokenizer:
  """The SentencePiece model of the run's training text (data.train_files or the built-in
  corpus), trained once and cached in `cache_dir`."""
  path = trained_tokenizer_path(cache_dir, data_config, vocab_size)
  if epath.Path(path).exists():
    return Tokenizer.load(path)
  max_bytes = data_config.get('tokenizer_train_bytes') or DEFAULT_TRAIN_BYTES
  if data_config.get('modality') == 'chat' and data_config.train_files:
    texts = chat.message_texts(data_config.train_files, max_bytes)
  else:
    texts = text_data.read_texts(data_config.train_files, max_bytes)
  return train_tokenizer(texts, vocab_size, path)


def _cache_dir(data_config, workdir: str = '') -> str:
  """Where a run keeps its trained tokenizer: data.tokenizer_cache, else <workdir>/tokenizer."""
  return data_config.get('tokenizer_cache') or (
      os.path.join(workdir, TOKENIZER_DIR)
      if workdir
      else os.path.join(os.path.expanduser('~'), '.cache', 'llama4_jax')
  )


def workdir_tokenizer_file(workdir: str) -> str | None:
  """The workdir's own tokenizer file (RUN_FILES), if it has one."""
  folder = epath.Path(workdir) / TOKENIZER_DIR
  return next((str(folder / n) for n in RUN_FILES if (folder / n).exists()), None)


def copy_tokenizer_files(source: str, destination: str) -> list[str]:
  """Copies a tokenizer file, or the RELEASED_FILES of a folder, into folder `destination`.

  A `tokenizer.json` brings its released side files; any other `.json` file is copied
  alone, as `tokenizer.json`, and any other file is a SentencePiece model and becomes
  `tokenizer.model`: the names `workdir_tokenizer_file` looks for. Returns the names
  copied (none from a folder that has none, or does not exist).
  """
  source = epath.Path(source)
  if not source.exists():
    return []
  if source.is_dir():
    files = [source / name for name in RELEASED_FILES if (source / name).exists()]
  elif source.name.endswith('.json'):
    files = [source.parent / n for n in RELEASED_FILES if (source.parent / n).exists()]
    files = files if source in files else [source]
  else:
    files = [source]
  names = []
  for file in files:
    if file.name in RELEASED_FILES:
      name = file.name
    else:
      name = RUN_FILES[0] if file.name.endswith('.json') else RUN_FILES[1]
    _write_atomically(str(epath.Path(destination) / name), file.read_bytes())
    names.append(name)
  return names


def _check_fits(tokenizer: AnyTokenizer, vocab_size: int) -> AnyTokenizer:
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(
        f'Tokenizer has {tokenizer.vocab_size} ids but the model only '
        f'{vocab_size}; raise model.vocab_size.'
    )
  return tokenizer


def load_tokenizer(config, vocab_size: int, workdir: str = '') -> AnyTokenizer:
  """The tokenizer a training run uses (see the module docstring), trained if need be.

  Args:
    config: the run's ConfigDict: `data.tokenizer` (a tokenizer file; empty = the run's
      own), `data.tokenizer_cache`, `data.tokenizer_train_bytes`, `train.init_from`.
    vocab_size: the model's vocabulary size; a trained tokenizer has exactly this size, a
      given one may be smaller.
    workdir: the run's; an inherited tokenizer is copied into it and a trained one cached
      there unless `data.tokenizer_cache` says otherwise (no workdir: ~/.cache/llama4_jax).
  """
  data_config = config.data
  init_from = config.get('train', {}).get('init_from', '')
  own = workdir and workdir_tokenizer_file(workdir)
  if data_config.tokenizer:
    tokenizer = load(data_config.tokenizer)
  elif own:
    tokenizer = load(own)
  elif init_from:  # a fine-tune reads text as the model it starts from was taught to
    inherited = run_tokenizer_file(init_from, config_lib.load(init_from))
    if workdir:
      copy_tokenizer_files(inherited, os.path.join(workdir, TOKENIZER_DIR))
    tokenizer = load(inherited)
  else:
    tokenizer = load_or_train(data_config, vocab_size, _cache_dir(data_config, workdir))
  return _check_fits(tokenizer, vocab_size)


def run_tokenizer_file(workdir: str, config, path: str = '') -> str:
  """The tokenizer file of a trained or converted run: `path` if given, else the run's
  `data.tokenizer`, its own file, or the one it trained and cached; never trains one."""
  if path:
    return path
  data_config = config.data
  own = workdir_tokenizer_file(workdir)
  path = data_config.get('tokenizer') or own
  if not path:
    cache_dir = _cache_dir(data_config, workdir)
    path = trained_tokenizer_path(cache_dir, data_config, config.model.vocab_size)
    if not epath.Path(path).exists():
      raise FileNotFoundError(
          f'{workdir}: no tokenizer: config.data.tokenizer is empty, {workdir}/{TOKENIZER_DIR} '
          f'holds no {" or ".join(RUN_FILES)} and {cache_dir} no tokenizer trained for this run; '
          f'give the tokenizer file (a tokenizer.json or a SentencePiece .model: --tokenizer, or '
          f'config.data.tokenizer for training)'
      )
  return path


def run_tokenizer(workdir: str, config, path: str = '') -> AnyTokenizer:
  """The tokenizer of a trained or converted run (`run_tokenizer_file`), for evaluation and
  generation. A tokenizer with more ids than the model is an error."""
  return _check_fits(load(run_tokenizer_file(workdir, config, path)), config.model.vocab_size)


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
