"""Image-text data: JSON Lines records -> token rows with their image tiles.

A dataset is a JSON Lines file of `{"image": path, "text": ...}` records, the
image path relative to the file (records may carry other fields, e.g. the
`question`/`answer` of the built-in shapes data, used for accuracy). A record
becomes one row:

  [BOS] <image layout: <|image_start|> ... <|patch|> x tokens_per_tile ... <|image_end|>>
  text tokens [EOS] [PAD ...]

Batches hold the text features of data/text.py (`inputs`, `targets`, `weights`,
`segment_ids`, `positions`, each [B, S]) plus `pixels` [B, M, C, I, I], the
row's tiles in layout order, padded to M = data.tiles_per_row with zeros. The
loss covers text only: `weights` is 0 where the target is an image token.
"""

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from llama4_jax.data import image_processing, shapes_data
from llama4_jax.data import text as text_data
from llama4_jax.data.text import DataError


class Record(NamedTuple):
  image: str  # absolute path
  text: str
  question: str = ''  # optional, for answer accuracy
  answer: str = ''


def read_records(path: str, images_anywhere: bool = False) -> list[Record]:
  """Records of a JSON Lines file; errors name the file and line.

  Image paths are relative to the file's folder and must stay inside it (no absolute
  paths, no `..` out of it, no link out of it) unless `images_anywhere`
  (data.images_anywhere): a data file is not trusted to read any file on the machine.
  """
  folder = os.path.dirname(os.path.abspath(path))
  records = []
  for where, obj in text_data.jsonl_records(path, 'image-text data'):
    if not isinstance(obj, dict):
      raise DataError(f'{where}: expected an object with "image" and "text"')
    for key in ('image', 'text'):
      if not isinstance(obj.get(key), str):
        raise DataError(f'{where}: missing string field "{key}"')
    image = image_path(folder, obj['image'], where, images_anywhere)
    records.append(
        Record(image, obj['text'], str(obj.get('question', '')), str(obj.get('answer', '')))
    )
  return records


def image_path(folder: str, name: str, where: str, anywhere: bool = False) -> str:
  """The absolute path of image `name` of a data file in `folder`; a DataError (naming
  `where`, the file and line) if it leaves the folder and `anywhere` does not allow it."""
  image = os.path.join(folder, name)
  real_folder = os.path.realpath(folder)
  inside = os.path.commonpath([real_folder, os.path.realpath(image)]) == real_folder
  if not (inside or anywhere):
    raise DataError(
        f'{where}: image path {name!r} leaves the data folder {folder} '
        '(set config.data.images_anywhere=True to allow it)'
    )
  return image


def image_tokens(
    image, vision_cfg, ids: image_processing.ImageTokenIds
) -> tuple[list[int], np.ndarray]:
  """(prompt layout ids, tiles [N, C, I, I]) of one PIL image."""
  processed = image_processing.preprocess(
      image, tile_size=vision_cfg.image_size, max_tiles=vision_cfg.max_tiles
  )
  layout = image_processing.image_token_layout(
      processed.aspect_ratio, vision_cfg.tokens_per_tile, ids
  )
  return layout, processed.pixels_NCHW


# Texts tokenized at a time by RowMaker.check_records: their ids are dropped once counted.
_ENCODE_CHUNK = 10_000


class RowMaker:
  """Turns (image, text) into a padded training row; owns the layout conventions."""

  def __init__(self, vision_cfg, tokenizer, *, seq_len: int, tiles_per_row: int):
    self.vision, self.tokenizer = vision_cfg, tokenizer
    self.seq_len, self.tiles_per_row = seq_len, tiles_per_row
    try:
      self.ids = image_processing.image_token_ids_for(vision_cfg, tokenizer)
    except ValueError as e:
      raise DataError(str(e)) from None

  def check_tiles(self, num_tiles: int, source: str, images: int = 1) -> None:
    """A DataError naming `source` if a row's `images` need more than data.tiles_per_row
    tiles."""
    if num_tiles > self.tiles_per_row:
      need = 'the image needs' if images == 1 else f'its {images} images need'
      raise DataError(
          f'{source}: {need} {num_tiles} tiles, more than '
          f'data.tiles_per_row={self.tiles_per_row} (raise it, or lower model.vision.max_tiles)'
      )

  def _check_length(self, num_tokens: int, num_image_tokens: int, source: str) -> None:
    if num_tokens > self.seq_len + 1:
      raise DataError(
          f'{source}: {num_tokens} tokens ({num_image_tokens} of them for the image) do '
          f'not fit data.seq_len={self.seq_len} + 1'
      )

  def pad_tiles(self, tiles_NCHW: np.ndarray, source: str, images: int = 1) -> np.ndarray:
    """[N, C, I, I] -> [M, C, I, I], zero tiles after those of the row's `images`."""
    self.check_tiles(len(tiles_NCHW), source, images)
    M = self.tiles_per_row
    return np.concatenate(
        [tiles_NCHW, np.zeros((M - len(tiles_NCHW),) + tiles_NCHW.shape[1:], tiles_NCHW.dtype)]
    )

  def longest_layout(self) -> tuple[int, int]:
    """(tokens, tiles) of the longest layout an image may take, a bound on every image's
    `layout_size`: both grow with the grid's tiles, so it is the 1 x max_tiles grid's."""
    return self._layout_size((1, self.vision.max_tiles))

  def layout_size(self, path: str) -> tuple[int, int]:
    """(tokens, tiles) of the layout of the image file at `path`, as `image_tokens` would
    make it, from the file's header alone (an EXIF turn transposes the grid, of as many
    tiles and tokens). Raises image_processing.ImageError."""
    height, width = image_processing.image_size(path)
    v = self.vision
    return self._layout_size(
        image_processing.best_fit_tiling(height, width, v.image_size, v.max_tiles)
    )

  def _layout_size(self, tiling: tuple[int, int]) -> tuple[int, int]:
    layout = image_processing.image_token_layout(tiling, self.vision.tokens_per_tile, self.ids)
    return len(layout), image_processing.tile_count(tiling)

  def check_records(self, records: Sequence[Record], source: str) -> None:
    """Raises the DataError that `row` would raise for any record (too many tokens or
    tiles) now, not when a step first draws it, hours into a run perhaps. The texts are
    tokenized in the tokenizer's threads; an image's header is read only where its size
    decides: a long text, or data.tiles_per_row below the most tiles an image may take."""
    most_tokens, most_tiles = self.longest_layout()
    text_lengths = [
        len(ids)
        for start in range(0, len(records), _ENCODE_CHUNK)
        for ids in self.tokenizer.encode_batch(
            [r.text for r in records[start : start + _ENCODE_CHUNK]]
        )
    ]
    for i, (record, text_length) in enumerate(zip(records, text_lengths), 1):
      text_tokens = text_length + 1  # and EOS
      if most_tiles <= self.tiles_per_row and 1 + most_tokens + text_tokens <= self.seq_len + 1:
        continue
      where = f'{source}: record {i} ({record.image})'
      try:
        layout_tokens, tiles = self.layout_size(record.image)
      except image_processing.ImageError as e:
        raise DataError(f'{source}: record {i}: {e}') from None
      num_image_tokens = 1 + layout_tokens  # and BOS
      self._check_length(num_image_tokens + text_tokens, num_image_tokens, where)
      self.check_tiles(tiles, where)

  def row(self, image, text: str, source: str) -> dict[str, np.ndarray]:
    layout, tiles = image_tokens(image, self.vision, self.ids)
    prefix = [self.tokenizer.bos_id] + layout
    tokens = prefix + self.tokenizer.encode_text(text) + [self.tokenizer.eos_id]
    self._check_length(len(tokens), len(prefix), source)
    S, n = self.seq_len, len(tokens)
    padded = np.full(S + 1, self.tokenizer.pad_id, np.int32)
    padded[:n] = tokens
    is_text_target = np.zeros(S, np.float32)
    is_text_target[len(prefix) - 1 : n - 1] = 1.0  # targets from the first text token to EOS
    return {
        'inputs': padded[:-1],
        'targets': padded[1:],
        'weights': is_text_target,
        'segment_ids': (np.arange(S) < n).astype(np.int32),
        'positions': np.arange(S, dtype=np.int32),
        'pixels': self.pad_tiles(tiles, source),
    }


def is_image_text(config) -> bool:
  """Whether a run trains on image-text records (data.modality)."""
  return config.data.get('modality', 'text') == 'image_text'


def tiles_per_row(config, cfg) -> int:
  """Tile slots per row: data.tiles_per_row, else every tile an image may need
  (max_tiles plus the global tile, or 1 for single-tile images); 0 for text data and
  models without a vision tower."""
  if cfg.vision is None or config.data.get('modality', 'text') == 'text':
    return 0
  return config.data.tiles_per_row or image_processing.tile_count((1, cfg.vision.max_tiles))


def row_maker(config, cfg, tokenizer) -> RowMaker:
  return RowMaker(
      cfg.vision, tokenizer, seq_len=config.data.seq_len, tiles_per_row=tiles_per_row(config, cfg)
  )


def _load_row(record: Record, maker: RowMaker) -> dict[str, np.ndarray]:
  return maker.row(image_processing.load_image(record.image), record.text, record.image)


def _collate(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Rows -> one batch, each feature stacked on a leading batch axis."""
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _dataset_file(config, split: str, workdir: str) -> str:
  """The JSON Lines file of a split: data.{train,eval}_files, or the built-in shapes data."""
  given = config.data.train_files if split == 'train' else config.data.eval_files
  if given:
    paths = text_data.expand_globs(given)
    if len(paths) != 1:
      raise DataError(
          f'config.data.{"train" if split == "train" else "eval"}_files={given!r}: image-text '
          f'data is one JSON Lines file, not {len(paths)}'
      )
    return paths[0]
  shapes = config.data.shapes
  # PIL reads images from local files: a gs:// workdir keeps them in the local cache.
  local = workdir if '://' not in workdir else os.path.expanduser('~/.cache/llama4_jax')
  root = shapes.dir or os.path.join(local, 'shapes_data')
  num = shapes.train_examples if split == 'train' else shapes.eval_examples
  return shapes_data.write_dataset(
      os.path.join(root, split),
      num,
      seed=shapes.seed,
      size=config.model.vision.image_size,
      split=split,
  )


def split_records(
    config, split: str, workdir: str, maker: RowMaker | None = None, limit: int = 0
) -> list[Record]:
  """The records of a split (its first `limit` if given), each image checked to exist, and
  with `maker` each record's row to fit, now rather than when a step first draws it."""
  path = _dataset_file(config, split, workdir)
  records = read_records(path, config.data.get('images_anywhere', False))
  records = records[:limit] if limit else records
  missing = [(i, r.image) for i, r in enumerate(records, 1) if not os.path.isfile(r.image)]
  if missing:
    i, image = missing[0]
    raise DataError(
        f'{path}: record {i}: image file {image} not found ({len(missing)} of '
        f'{len(records)} records name a missing image)'
    )
  if maker is not None:
    maker.check_records(records, path)
  return records


def make_train_iterator(
    config, cfg, tokenizer, *, workdir: str, rows: text_data.BatchRows | None = None
) -> grain.DatasetIterator:
  """Shuffled, repeating batches of this process's rows (default: all; checkpointable, like
  data/text.py's)."""
  batch_size = config.train.batch_size
  rows = text_data.all_rows(batch_size) if rows is None else rows
  maker = row_maker(config, cfg, tokenizer)
  records = split_records(config, 'train', workdir, maker)
  return row_iterator(records, lambda r: _load_row(r, maker), batch_size, config.seed, rows)


def row_iterator(
    records: Sequence[Any], load_row, batch_size: int, seed: int, rows: text_data.BatchRows
) -> grain.DatasetIterator:
  """Shuffled, repeating batches of `load_row(record)` rows, this process's `rows` of each
  global batch: each process decodes only its own rows' images."""
  load_row(records[0])  # fail on a bad record or layout now, not in the first step
  ds = (
      grain.MapDataset.source(records)
      .shuffle(seed % 2**32)
      .repeat()
      .batch(batch_size, drop_remainder=True, batch_fn=list)
      .map(lambda batch: _collate([load_row(batch[i]) for i in rows.indices]))
  )
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def make_eval_batches(
    config, cfg, tokenizer, *, workdir: str, rows: text_data.BatchRows | None = None
) -> list[dict[str, np.ndarray]]:
  """The validation split in order, this process's `rows` of each batch (default: all); the
  last batch, and every batch up to `rows.global_size`, padded with weight-0 rows."""
  batch_size = config.eval.batch_size
  rows = text_data.all_rows(batch_size) if rows is None else rows
  maker = row_maker(config, cfg, tokenizer)
  records = split_records(
      config, 'validation', workdir, maker, config.eval.max_batches * batch_size
  )
  return row_eval_batches(
      records, lambda r: _load_row(r, maker), batch_size, rows, tokenizer.pad_id
  )


def row_eval_batches(
    records: Sequence[Any], load_row, batch_size: int, rows: text_data.BatchRows, pad_id: int
) -> list[dict[str, np.ndarray]]:
  """Batches of `batch_size` records' `load_row(record)` rows in order, this process's `rows`
  of each; past the last record, and up to `rows.global_size`, padding rows (weight 0)."""
  empty = {k: v[:0] for k, v in _collate([load_row(records[0])]).items()}
  batches = []
  for start in range(0, len(records), batch_size):
    batch_records = records[start : start + batch_size]
    # The indices are sorted: this process's real rows come first, then its padding.
    loaded = [load_row(batch_records[i]) for i in rows.indices if i < len(batch_records)]
    batch = _collate(loaded) if loaded else empty
    batches.append(text_data.pad_rows(batch, rows=len(rows.indices), fill={'inputs': pad_id}))
  return batches


# Prompts with images ----------------------------------------------------------------


IMAGE_MARKER = '<|image|>'  # in a prompt's text: where an image goes


def chat_prompts(tokenizer, texts: Sequence[str], num_images: int = 0) -> list[list[int]]:
  """Token ids of each text as the user turn of a chat, with the assistant's header open
  for the answer (scripts/generate.py --chat).

  Each `<|image|>` in a text makes an image part of the turn there, so the `<|image|>` id
  of the chat format, which `place_images` expands, stands inside the user turn, as in
  training (chat.image_row); the chat format keeps any other special-token string in a
  text as text. A single text without markers gets the `num_images` images at the start
  of its turn, as Llama 4's chat examples put them.
  """
  contents = []
  for text in texts:
    pieces = text.split(IMAGE_MARKER)
    content = [{'type': 'text', 'text': pieces[0]}] if pieces[0] else []
    for piece in pieces[1:]:
      content.append({'type': 'image'})
      content += [{'type': 'text', 'text': piece}] if piece else []
    contents.append(content)
  if len(texts) == 1 and IMAGE_MARKER not in texts[0]:
    contents[0][:0] = [{'type': 'image'}] * num_images
  return [tokenizer.format_chat([{'role': 'user', 'content': c}]) for c in contents]


def place_images(
    prompts: Sequence[Sequence[int]],
    images: Sequence,
    vision_cfg,
    ids: image_processing.ImageTokenIds,
) -> tuple[list[list[int]], np.ndarray | None]:
  """Expands the prompts' `<|image|>` markers, in order, into the images' layouts.

  A single prompt without markers gets its images right after its first token
  (BOS). Returns (expanded prompts, tiles [B, M, C, I, I] or None).
  """
  prompts = [list(p) for p in prompts]
  if not images:
    return prompts, None
  markers = [p.count(ids.image) for p in prompts]
  if len(prompts) == 1 and markers[0] == 0:
    prompts[0][1:1] = [ids.image] * len(images)
    markers = [len(images)]
  if sum(markers) != len(images):
    raise ValueError(
        f'the prompts have {image_processing.placeholder_mismatch(sum(markers), len(images))}'
    )
  expanded, tiles_per_prompt, it = [], [], iter(images)
  for prompt, n in zip(prompts, markers):
    layouts, tiles = [], []
    for _ in range(n):
      layout, image_tiles = image_tokens(next(it), vision_cfg, ids)
      layouts.append(layout)
      tiles.append(image_tiles)
    expanded.append(image_processing.expand_image_prompt(prompt, layouts, ids.image))
    tiles_per_prompt.append(
        np.concatenate(tiles)
        if tiles
        else np.zeros(
            (0, vision_cfg.num_channels, vision_cfg.image_size, vision_cfg.image_size), np.float32
        )
    )
  M = max(1, max(len(t) for t in tiles_per_prompt))
  pixels = np.zeros((len(prompts), M) + tiles_per_prompt[0].shape[1:], np.float32)
  for b, tiles in enumerate(tiles_per_prompt):
    pixels[b, : len(tiles)] = tiles
  return expanded, pixels


# Question answering accuracy ------------------------------------------------------


def answer_accuracy(
    score_fn,
    maker: RowMaker,
    records: Sequence[Record],
    choices: Sequence[str],
    batch_size: int = 64,
) -> float:
  """Accuracy of picking, per record, the choice with the highest likelihood.

  Every record is written out once per choice as `question + ' ' + choice`;
  score_fn(batch) -> per-row summed log-likelihood of the text tokens [B].
  """
  rows, answers = [], []
  for record in records:
    image = image_processing.load_image(record.image)
    rows += [maker.row(image, f'{record.question} {c}', record.image) for c in choices]
    answers.append(list(choices).index(record.answer))
  scores = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start : start + batch_size]
    chunk += [chunk[-1]] * (batch_size - len(chunk))  # static shapes
    scores.append(np.asarray(score_fn(_collate(chunk))))
  scores = np.concatenate(scores)[: len(rows)].reshape(len(records), len(choices))
  return float(np.mean(np.argmax(scores, axis=1) == np.asarray(answers)))


def shapes_accuracy(
    score_fn, maker: RowMaker, train: Sequence[Record], held_out: Sequence[Record]
) -> dict[str, Any]:
  """Held-out accuracy (overall and per question type) of the shapes data, and the text-only best.

  The keys are those of the training run's final results (scripts/train.py prints them).
  """
  by_type: dict[str, list[Record]] = {}
  for record in held_out:
    qtype = next(t for t, q in shapes_data.QUESTIONS.items() if q == record.question)
    by_type.setdefault(qtype, []).append(record)
  correct = {
      t: answer_accuracy(score_fn, maker, rs, shapes_data.answer_choices(t))
      for t, rs in sorted(by_type.items())
  }
  total = sum(len(rs) for rs in by_type.values())
  return {
      'qa_accuracy': sum(correct[t] * len(rs) for t, rs in by_type.items()) / total,
      'qa_accuracy_by_question': correct,
      'text_only_accuracy': shapes_data.text_only_baseline(train, held_out),
      'qa_questions': total,
  }
