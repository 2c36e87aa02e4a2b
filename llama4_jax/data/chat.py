"""Chat data: JSON Lines conversations -> packed rows whose loss covers the assistant's turns.

A dataset is a JSON Lines file (or comma-separated globs of them) of records

  {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}

with content a string, or a list of parts {"type": "text", "text": ...} and, in user
turns of a multimodal model, {"type": "image", "image": PATH} (relative to the file, kept
inside its folder unless data.images_anywhere). Each conversation is laid out in the Llama
4 chat format (tokenizer.ChatFormat) and learns only the assistant's content and the
`<|eot|>` that closes each assistant turn: never the system or user text, nor the headers.

Text conversations are packed into rows like text documents (data/text.py: segment ids
keep attention inside each, positions restart); one longer than data.seq_len + 1 tokens
is cut to it, or refused, as data.chat_overlong says. Conversations with images are one
per row, with their tiles, as image-text records are (data/image_text.py).

With data.train_files / eval_files empty, the data are the built-in table questions
(data/chat_task.py).
"""

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from llama4_jax.data import chat_task, image_processing, image_text
from llama4_jax.data import text as text_data
from llama4_jax.data.text import DataError

ROLES = ('system', 'user', 'assistant')
OVERLONG = ('truncate', 'error')  # data.chat_overlong


class Conversation(NamedTuple):
  messages: list[dict[str, Any]]  # image parts' "image" made absolute
  source: str  # file:line
  images: list[str]  # its image paths, in order


def _check_content(content, role: str, where: str) -> int:
  """Number of images in a message's content; a DataError names what is wrong."""
  if isinstance(content, str):
    return 0
  if not isinstance(content, list):
    raise DataError(
        f'{where}: content must be a string or a list of parts, got {type(content).__name__}'
    )
  images = 0
  for part in content:
    kind = part.get('type') if isinstance(part, dict) else None
    if kind == 'text' and isinstance(part.get('text'), str):
      continue
    if kind == 'image' and isinstance(part.get('image'), str):
      if role != 'user':
        raise DataError(f'{where}: images belong in user turns, not in a {role} turn')
      images += 1
      continue
    raise DataError(
        f'{where}: a content part must be {{"type": "text", "text": str}} or '
        f'{{"type": "image", "image": path}}, got {json.dumps(part)[:80]}'
    )
  return images


def parse_record(record, folder: str, where: str, images_anywhere: bool = False) -> Conversation:
  """A validated conversation of one JSON record (image paths relative to `folder`)."""
  if not isinstance(record, dict) or not isinstance(record.get('messages'), list):
    raise DataError(f'{where}: expected an object with a "messages" list')
  messages, images = [], []
  for i, message in enumerate(record['messages']):
    at = f'{where}: message {i}'
    if not isinstance(message, dict) or 'content' not in message:
      raise DataError(f'{at}: expected an object with "role" and "content"')
    role = message.get('role')
    if role not in ROLES:
      raise DataError(f'{at}: unknown role {role!r} (roles: {", ".join(ROLES)})')
    content = message['content']
    if _check_content(content, role, at):
      content = [dict(p) for p in content]
      for part in content:
        if part['type'] == 'image':
          part['image'] = image_text.image_path(folder, part['image'], at, images_anywhere)
          if not os.path.isfile(part['image']):
            raise DataError(f'{at}: image file {part["image"]} not found')
          images.append(part['image'])
    messages.append({'role': role, 'content': content})
  if not any(m['role'] == 'assistant' for m in messages):
    raise DataError(f'{where}: no assistant turn (nothing to learn)')
  return Conversation(messages, where, images)


def read_conversations(path: str, images_anywhere: bool = False) -> list[Conversation]:
  """The conversations of one JSON Lines file (any epath: the built-in task's may be in a
  gs:// workdir); errors name the file and line."""
  folder = os.path.dirname(path if '://' in path else os.path.abspath(path))
  return [
      parse_record(record, folder, where, images_anywhere)
      for where, record in text_data.jsonl_records(path, 'chat data')
  ]


def split_conversations(config, split: str, workdir: str) -> list[Conversation]:
  """data.train_files / eval_files (globs of .jsonl), or the built-in task's split."""
  files = config.data.train_files if split == 'train' else config.data.eval_files
  anywhere = config.data.get('images_anywhere', False)
  if not files:
    return read_conversations(chat_task.write_split(config.data.chat_task, split, workdir))
  return [c for path in text_data.expand_globs(files) for c in read_conversations(path, anywhere)]


def message_texts(files: str, max_bytes: int = 0) -> list[str]:
  """The text of every message of the conversations in `files`, while it totals at most
  `max_bytes` of UTF-8 (0 = all): what a tokenizer for them is trained on."""
  texts, total = [], 0
  for path in text_data.expand_globs(files):
    for conversation in read_conversations(path, images_anywhere=True):
      for message in conversation.messages:
        content = message['content']
        text = (
            content
            if isinstance(content, str)
            else ' '.join(p['text'] for p in content if p['type'] == 'text')
        )
        total += len(text.encode())
        if max_bytes and texts and total > max_bytes:
          return texts
        texts.append(text)
  return texts


# Text conversations: packed pieces ------------------------------------------------------


class Pieces(NamedTuple):
  pieces: list[dict[str, np.ndarray]]  # {'tokens', 'learn'}, at most seq_len + 1 each
  cut: int  # conversations cut to seq_len + 1
  dropped: int  # of those, left with nothing to learn


def conversation_pieces(
    conversations: Sequence[Conversation], tokenizer, seq_len: int, overlong: str
) -> Pieces:
  """Token pieces of text conversations, cut or refused beyond `seq_len` + 1 tokens."""
  if overlong not in OVERLONG:
    raise ValueError(f'config.data.chat_overlong: {overlong!r} is not one of {OVERLONG}')
  pieces, cut, dropped = [], 0, 0
  for conversation in conversations:
    chat = tokenizer.chat_tokens(conversation.messages)
    tokens, learn = np.array(chat.ids, np.int32), np.array(chat.is_assistant, np.int32)
    if len(tokens) > seq_len + 1:
      if overlong == 'error':
        raise DataError(
            f'{conversation.source}: the conversation is {len(tokens)} tokens, longer than '
            f'data.seq_len + 1 = {seq_len + 1} (set config.data.chat_overlong=truncate to cut it)'
        )
      tokens, learn, cut = tokens[: seq_len + 1], learn[: seq_len + 1], cut + 1
      if not learn[1:].any():  # the cut took every assistant token
        dropped += 1
        continue
    pieces.append({'tokens': tokens, 'learn': learn})
  return Pieces(pieces, cut, dropped)


# Conversations with images: one row each ------------------------------------------------


def image_row(
    conversation: Conversation, maker: image_text.RowMaker, overlong: str
) -> dict[str, np.ndarray]:
  """The training row of a conversation with images: its image slots expanded into the
  images' token layouts, its tiles in order, its assistant tokens learned."""
  chat = maker.tokenizer.chat_tokens(conversation.messages)
  tokens, learn, tiles = [], [], []
  images = iter(conversation.images)
  for token, is_assistant in zip(chat.ids, chat.is_assistant):
    if token != maker.ids.image:
      tokens.append(token)
      learn.append(is_assistant)
      continue
    layout, image_tiles = image_text.image_tokens(
        image_processing.load_image(next(images)), maker.vision, maker.ids
    )
    tokens += layout
    learn += [False] * len(layout)
    tiles.append(image_tiles)
  S, where = maker.seq_len, conversation.source
  if len(tokens) > S + 1:
    last_image_token = max(i for i, t in enumerate(tokens) if t == maker.ids.image_end)
    if overlong == 'error' or last_image_token >= S:
      raise DataError(
          f'{where}: the conversation is {len(tokens)} tokens with its images, longer than '
          f'data.seq_len + 1 = {S + 1}'
          + ('' if overlong == 'error' else ' even when cut after its last image')
      )
    tokens, learn = tokens[: S + 1], learn[: S + 1]
  n = len(tokens)
  v = maker.vision
  no_tiles = np.zeros((0, v.num_channels, v.image_size, v.image_size), np.float32)
  padded = np.full(S + 1, maker.tokenizer.pad_id, np.int32)
  padded[:n] = tokens
  weights = np.zeros(S, np.float32)
  weights[: n - 1] = learn[1:n]
  return {
      'inputs': padded[:-1],
      'targets': padded[1:],
      'weights': weights,
      'segment_ids': (np.arange(S) < n).astype(np.int32),
      'positions': np.arange(S, dtype=np.int32),
      'pixels': maker.pad_tiles(np.concatenate(tiles) if tiles else no_tiles, where),
  }


def has_images(conversations: Sequence[Conversation]) -> bool:
  return any(c.images for c in conversations)


# Batches ----------------------------------------------------------------------------------


class _Split(NamedTuple):
  conversations: list[Conversation]
  pieces: list[dict[str, np.ndarray]] | None  # packed text pieces; None with images
  image_row: Callable[[Conversation], dict[str, np.ndarray]] | None  # one row each, with images


def _read_split(config, cfg, tokenizer, split: str, workdir: str, process_index: int) -> _Split:
  conversations = split_conversations(config, split, workdir)
  overlong = config.data.get('chat_overlong', 'truncate')
  if has_images(conversations):
    maker = _image_row_maker(config, cfg, tokenizer)
    return _Split(conversations, None, lambda c: image_row(c, maker, overlong))
  made = conversation_pieces(conversations, tokenizer, config.data.seq_len, overlong)
  if made.cut and process_index == 0:
    print(
        f'chat data ({split}): {made.cut} of {len(conversations)} conversations cut to '
        f'data.seq_len + 1 = {config.data.seq_len + 1} tokens'
        + (f', {made.dropped} of them dropped (no assistant token left)' if made.dropped else ''),
        flush=True,
    )
  return _Split(conversations, made.pieces, None)


def make_train_iterator(
    config, cfg, tokenizer, *, workdir: str, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
  """Shuffled, repeating batches of this process's rows (checkpointable, like data/text.py's)."""
  batch_size = config.train.batch_size
  rows = text_data.process_rows(batch_size, process_index, process_count)
  split = _read_split(config, cfg, tokenizer, 'train', workdir, process_index)
  if split.pieces is None:
    return image_text.row_iterator(
        split.conversations, split.image_row, batch_size, config.seed, rows
    )
  return text_data.packed_train_iterator(
      split.pieces,
      config.data,
      source=config.data.train_files or 'the built-in chat task (train split)',
      padding={'tokens': tokenizer.pad_id, 'learn': 0},
      batch_size=batch_size,
      seq_len=config.data.seq_len,
      seed=config.seed,
      rows=rows,
  )


def make_eval_batches(
    config, cfg, tokenizer, *, workdir: str, process_index: int = 0, process_count: int = 1
) -> list[dict[str, np.ndarray]]:
  """The validation conversations in order; the last batch padded with weight-0 rows."""
  batch_size = config.eval.batch_size
  rows = text_data.process_rows(batch_size, process_index, process_count)
  split = _read_split(config, cfg, tokenizer, 'validation', workdir, process_index)
  if split.pieces is None:
    conversations = split.conversations
    if config.eval.max_batches:
      conversations = conversations[: config.eval.max_batches * batch_size]
    return image_text.row_eval_batches(
        conversations, split.image_row, batch_size, rows, tokenizer.pad_id
    )
  return text_data.packed_eval_batches(
      split.pieces,
      config.data,
      padding={'tokens': tokenizer.pad_id, 'learn': 0},
      batch_size=batch_size,
      seq_len=config.data.seq_len,
      max_batches=config.eval.max_batches,
      rows=rows,
  )


def _image_row_maker(config, cfg, tokenizer) -> image_text.RowMaker:
  if cfg.vision is None:
    raise DataError('the chat data has images but the model has no vision tower (model.vision)')
  return image_text.row_maker(config, cfg, tokenizer)
