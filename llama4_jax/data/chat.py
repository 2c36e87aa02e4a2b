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
is cut to it, or refused, as data.chat_overlong says, and one the cut leaves nothing to
learn is dropped. In a split with any image, every conversation is a row of its own, with
its tiles, as image-text records are (data/image_text.py); one too long is cut or refused
alike, but refused if the cut would split an image, and every row is checked to fit
(tokens and data.tiles_per_row) when the split is read.

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


def _row_length(
    num_tokens: int, last_image_end: int, seq_len: int, overlong: str, conversation: Conversation
) -> int:
  """How many of a row's `num_tokens` (images expanded) it keeps: all, or seq_len + 1 if
  data.chat_overlong=truncate and the cut leaves every image whole in the inputs (its last
  `<|image_end|>` before position seq_len; -1 without images); else the DataError."""
  if overlong not in OVERLONG:
    raise ValueError(f'config.data.chat_overlong: {overlong!r} is not one of {OVERLONG}')
  if num_tokens <= seq_len + 1:
    return num_tokens
  cut_fits = last_image_end < seq_len
  if overlong == 'error' or not cut_fits:
    raise DataError(
        f'{conversation.source}: the conversation is {num_tokens} tokens'
        + (' with its images' if conversation.images else '')
        + f', longer than data.seq_len + 1 = {seq_len + 1}'
        + (
            ' (set config.data.chat_overlong=truncate to cut it)'
            if cut_fits
            else ' even when cut after its last image'
        )
    )
  return seq_len + 1


def conversation_pieces(
    conversations: Sequence[Conversation], tokenizer, seq_len: int, overlong: str
) -> Pieces:
  """Token pieces of text conversations, cut or refused beyond `seq_len` + 1 tokens."""
  pieces, cut, dropped = [], 0, 0
  for conversation in conversations:
    chat = tokenizer.chat_tokens(conversation.messages)
    tokens, learn = np.array(chat.ids, np.int32), np.array(chat.is_assistant, np.int32)
    n = _row_length(len(tokens), -1, seq_len, overlong, conversation)
    if n < len(tokens):
      tokens, learn, cut = tokens[:n], learn[:n], cut + 1
      if not learn[1:].any():  # the cut took every assistant token
        dropped += 1
        continue
    pieces.append({'tokens': tokens, 'learn': learn})
  return Pieces(pieces, cut, dropped)


# Conversations with images: one row each ------------------------------------------------


def image_row(
    conversation: Conversation, maker: image_text.RowMaker, overlong: str
) -> dict[str, np.ndarray]:
  """The training row of a conversation of a split with images: its image slots expanded
  into the images' token layouts, its tiles in order, its assistant tokens learned; cut
  or refused beyond data.seq_len + 1 tokens as `overlong` says (`_row_length`)."""
  chat = maker.tokenizer.chat_tokens(conversation.messages)
  tokens, learn, tiles = [], [], []
  images = iter(conversation.images)
  last_image_end = -1
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
    last_image_end = len(tokens) - 1
  S, where = maker.seq_len, conversation.source
  n = _row_length(len(tokens), last_image_end, S, overlong, conversation)
  v = maker.vision
  no_tiles = np.zeros((0, v.num_channels, v.image_size, v.image_size), np.float32)
  padded = np.full(S + 1, maker.tokenizer.pad_id, np.int32)
  padded[:n] = tokens[:n]
  weights = np.zeros(S, np.float32)
  weights[: n - 1] = learn[1:n]
  return {
      'inputs': padded[:-1],
      'targets': padded[1:],
      'weights': weights,
      'segment_ids': (np.arange(S) < n).astype(np.int32),
      'positions': np.arange(S, dtype=np.int32),
      'pixels': maker.pad_tiles(
          np.concatenate(tiles) if tiles else no_tiles, where, len(conversation.images)
      ),
  }


class ImageConversations(NamedTuple):
  """What `check_image_conversations` keeps of a split with images, and what it cut."""

  conversations: list[Conversation]  # those whose row learns something
  cut: int  # rows cut to seq_len + 1
  dropped: int  # of those, left with nothing to learn


def check_image_conversations(
    conversations: Sequence[Conversation], maker: image_text.RowMaker, overlong: str
) -> ImageConversations:
  """The conversations whose rows learn something, with the counts cut and dropped; raises
  the DataError that `image_row` would raise for any conversation (too many tokens or
  tiles) now, not when a step first draws it, hours into a run perhaps. A conversation
  whose cut row would learn nothing is left out, as text conversations are.

  Each conversation is tokenized; its images' headers are read only where their sizes
  decide: a long conversation, or data.tiles_per_row below the most tiles its images may
  take (`RowMaker.longest_layout`).
  """
  S = maker.seq_len
  most_tokens, most_tiles = maker.longest_layout()
  kept, cut, dropped = [], 0, 0
  for conversation in conversations:
    chat = maker.tokenizer.chat_tokens(conversation.messages)
    slots = [i for i, token in enumerate(chat.ids) if token == maker.ids.image]
    k = len(slots)  # = len(conversation.images): chat_tokens writes one id per image part
    if k * most_tiles <= maker.tiles_per_row and len(chat.ids) + k * (most_tokens - 1) <= S + 1:
      kept.append(conversation)
      continue
    try:
      layouts = [maker.layout_size(path) for path in conversation.images]
    except image_processing.ImageError as e:
      raise DataError(f'{conversation.source}: {e}') from None
    # Each image slot becomes its layout, which ends with <|image_end|>.
    added = [tokens - 1 for tokens, _ in layouts]
    num_tokens = len(chat.ids) + sum(added)
    last_image_end = slots[-1] + sum(added) if slots else -1
    n = _row_length(num_tokens, last_image_end, S, overlong, conversation)
    maker.check_tiles(sum(tiles for _, tiles in layouts), conversation.source, k)
    if n < num_tokens:
      cut += 1
      # Where the first learned token lands (there is one: each assistant turn's <|eot|>).
      first = chat.is_assistant.index(True)
      if first + sum(a for a, slot in zip(added, slots) if slot < first) > S:
        dropped += 1
        continue
    kept.append(conversation)
  return ImageConversations(kept, cut, dropped)


def has_images(conversations: Sequence[Conversation]) -> bool:
  return any(c.images for c in conversations)


# Batches ----------------------------------------------------------------------------------


class _Split(NamedTuple):
  conversations: list[Conversation]
  pieces: list[dict[str, np.ndarray]] | None  # packed text pieces; None with images
  image_row: Callable[[Conversation], dict[str, np.ndarray]] | None  # one row each, with images


def _read_split(
    config, cfg, tokenizer, split: str, workdir: str, report: bool, limit: int = 0
) -> _Split:
  """The conversations of a split, checked to make rows now; with images, only the first
  `limit` of them (if given) are checked and kept. `report`: print how many were cut."""
  conversations = split_conversations(config, split, workdir)
  overlong = config.data.get('chat_overlong', 'truncate')
  if has_images(conversations):
    maker = _image_row_maker(config, cfg, tokenizer)
    conversations = conversations[:limit] if limit else conversations
    made = check_image_conversations(conversations, maker, overlong)
    _report_cuts(split, len(conversations), made, config.data.seq_len, report)
    if not made.conversations:
      raise DataError(
          f'chat data ({split}): no conversation has an assistant token within '
          f'data.seq_len + 1 = {config.data.seq_len + 1} tokens'
      )
    return _Split(made.conversations, None, lambda c: image_row(c, maker, overlong))
  made = conversation_pieces(conversations, tokenizer, config.data.seq_len, overlong)
  _report_cuts(split, len(conversations), made, config.data.seq_len, report)
  return _Split(conversations, made.pieces, None)


def _report_cuts(
    split: str, total: int, made: Pieces | ImageConversations, seq_len: int, report: bool
) -> None:
  if made.cut and report:
    print(
        f'chat data ({split}): {made.cut} of {total} conversations cut to '
        f'data.seq_len + 1 = {seq_len + 1} tokens'
        + (f', {made.dropped} of them dropped (no assistant token left)' if made.dropped else ''),
        flush=True,
    )


def make_train_iterator(
    config, cfg, tokenizer, *, workdir: str, rows: text_data.BatchRows | None = None
) -> grain.DatasetIterator:
  """Shuffled, repeating batches of this process's rows (default: all; checkpointable, like
  data/text.py's)."""
  batch_size = config.train.batch_size
  rows = text_data.all_rows(batch_size) if rows is None else rows
  split = _read_split(config, cfg, tokenizer, 'train', workdir, _reports(rows))
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
    config, cfg, tokenizer, *, workdir: str, rows: text_data.BatchRows | None = None
) -> list[dict[str, np.ndarray]]:
  """The validation conversations in order, this process's `rows` of each batch (default:
  all); the last batch, and every batch up to `rows.global_size`, padded with weight-0 rows."""
  batch_size = config.eval.batch_size
  rows = text_data.all_rows(batch_size) if rows is None else rows
  # With images, only the rows eval.max_batches keeps are checked (text is packed first).
  limit = config.eval.max_batches * batch_size
  split = _read_split(config, cfg, tokenizer, 'validation', workdir, _reports(rows), limit)
  if split.pieces is None:
    return image_text.row_eval_batches(
        split.conversations, split.image_row, batch_size, rows, tokenizer.pad_id
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


def _reports(rows: text_data.BatchRows) -> bool:
  """Whether this process prints what the data lost: the one (or the peers) feeding row 0."""
  return 0 in rows.indices


def _image_row_maker(config, cfg, tokenizer) -> image_text.RowMaker:
  if cfg.vision is None:
    raise DataError('the chat data has images but the model has no vision tower (model.vision)')
  return image_text.row_maker(config, cfg, tokenizer)
