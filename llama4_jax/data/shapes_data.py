"""Shapes: a built-in, download-free image question-answer dataset.

Each scene is a `size` x `size` RGB image on black with 1-4 shapes, all of
one kind (circle, square, triangle) and one colour (six corners of the RGB
cube), drawn without anti-aliasing so every lit pixel has exactly the scene
colour. Each example asks one of three questions, drawn uniformly:

  'colour': "What colour are the shapes?" -> red, green, blue, yellow, ...
  'shape':  "What shape are they?"        -> circle, square, triangle
  'count':  "How many shapes are there?"  -> one, two, three, four

Kind, colour and count are drawn uniformly and independently, and the
question text is the same for every scene, so the text alone predicts the
answer with 1/6, 1/3 and 1/4 accuracy: about 25% on average
(`text_only_baseline`). The image answers all of them.

Shapes sit one per cell of a 3 x 3 grid, jittered inside it, so they never
overlap, keep at least 2 px apart (distinct connected components) and never
leave the image; no rejection loop is needed. Scene space is small enough
for single-shape scenes to repeat across seeds, so splits are cut by a hash
of the pixels (as `data.py` cuts documents by a hash of their names): an
image belongs to exactly one split, whatever the seeds.
"""

import collections
import hashlib
import json
import os
import shutil
import tempfile
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    'red': (255, 0, 0),
    'green': (0, 255, 0),
    'blue': (0, 0, 255),
    'yellow': (255, 255, 0),
    'magenta': (255, 0, 255),
    'cyan': (0, 255, 255),
}
KINDS = ('circle', 'square', 'triangle')
COUNT_WORDS = ('one', 'two', 'three', 'four')
QUESTIONS = {
    'colour': 'What colour are the shapes?',
    'shape': 'What shape are they?',
    'count': 'How many shapes are there?',
}
SPLITS = ('train', 'validation')
MIN_SIZE = 32  # Below this a shape is under 8 px and kinds blur together.
_GRID = 3  # 9 cells for at most 4 shapes.
_FORMAT_VERSION = 1
_META = 'meta.json'
_JSONL = 'data.jsonl'


class Scene(NamedTuple):
  kind: str
  colour: str
  count: int
  pixels_HWC: np.ndarray  # uint8 [size, size, 3]


class Example(NamedTuple):
  image_HWC: np.ndarray  # uint8 [size, size, 3]
  question: str
  answer: str
  question_type: str  # A key of QUESTIONS.


def shape_extent(size: int) -> int:
  """Side of a shape's bounding box: 12 px at 48, two 6-px patches (a 16-px cell)."""
  return size // 4


def _draw(
    draw: ImageDraw.ImageDraw, kind: str, x: int, y: int, extent: int, rgb: tuple[int, int, int]
) -> None:
  x1, y1 = x + extent - 1, y + extent - 1  # PIL boxes are inclusive.
  if kind == 'circle':
    draw.ellipse((x, y, x1, y1), fill=rgb)
  elif kind == 'square':
    draw.rectangle((x, y, x1, y1), fill=rgb)
  else:  # An upward triangle spanning the whole box.
    draw.polygon([((x + x1) / 2, y), (x, y1), (x1, y1)], fill=rgb)


def make_scene(rng: np.random.Generator, size: int = 48) -> Scene:
  """A random scene; all randomness comes from `rng`."""
  if size < MIN_SIZE:
    raise ValueError(f'Image size must be at least {MIN_SIZE}, got {size}.')
  kind = KINDS[rng.integers(len(KINDS))]
  colour = list(COLOURS)[rng.integers(len(COLOURS))]
  count = int(rng.integers(1, len(COUNT_WORDS) + 1))
  cell, extent = size // _GRID, shape_extent(size)
  image = Image.new('RGB', (size, size))
  draw = ImageDraw.Draw(image)
  for c in rng.choice(_GRID * _GRID, size=count, replace=False):
    row, col = divmod(int(c), _GRID)
    # Offsets in [1, cell - extent - 1] leave a 1-px black border in the
    # cell, so neighbours are >= 2 px apart.
    dx, dy = rng.integers(1, cell - extent, size=2)
    _draw(draw, kind, col * cell + int(dx), row * cell + int(dy), extent, COLOURS[colour])
  return Scene(kind, colour, count, np.asarray(image, dtype=np.uint8))


def image_split(pixels_HWC: np.ndarray) -> str:
  """The split an image belongs to: half the image space each, by hash."""
  digest = hashlib.sha256(np.ascontiguousarray(pixels_HWC).tobytes()).digest()
  return SPLITS[digest[0] & 1]


def _answer(scene: Scene, question_type: str) -> str:
  if question_type == 'colour':
    return scene.colour
  if question_type == 'shape':
    return scene.kind
  return COUNT_WORDS[scene.count - 1]


def make_examples(num: int, seed: int, size: int = 48, split: str = 'train') -> list[Example]:
  """`num` examples of `split`, the same for the same arguments.

  Scenes of the other split are drawn and dropped, which costs about 2x
  generation time (well under a millisecond per scene).
  """
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; expected one of {SPLITS}.')
  rng = np.random.default_rng(seed)
  examples = []
  while len(examples) < num:
    scene = make_scene(rng, size)
    question_type = list(QUESTIONS)[rng.integers(len(QUESTIONS))]
    if image_split(scene.pixels_HWC) != split:
      continue
    examples.append(
        Example(
            scene.pixels_HWC, QUESTIONS[question_type], _answer(scene, question_type), question_type
        )
    )
  return examples


def answer_choices(question_type: str) -> tuple[str, ...]:
  """Every possible answer to a question type, for scoring candidates."""
  choices = {'colour': tuple(COLOURS), 'shape': KINDS, 'count': COUNT_WORDS}
  if question_type not in choices:
    raise ValueError(f'Unknown question type {question_type!r}.')
  return choices[question_type]


def text_only_baseline(train_examples: list[Example], eval_examples: list[Example]) -> float:
  """Eval accuracy of the majority training answer per question text.

  That is the best any predictor that sees only the question can do (up to
  sampling noise); questions unseen in training get the overall majority.
  """
  by_question = collections.defaultdict(collections.Counter)
  overall = collections.Counter()
  for ex in train_examples:
    by_question[ex.question][ex.answer] += 1
    overall[ex.answer] += 1
  fallback = overall.most_common(1)[0][0] if overall else ''
  guess = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
  hits = sum(guess.get(ex.question, fallback) == ex.answer for ex in eval_examples)
  return hits / max(len(eval_examples), 1)


def _read_meta(out_dir: str) -> dict | None:
  try:
    with open(os.path.join(out_dir, _META), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_files(tmp_dir: str, examples: list[Example], meta: dict) -> None:
  os.makedirs(os.path.join(tmp_dir, 'images'))
  with open(os.path.join(tmp_dir, _JSONL), 'w', encoding='utf-8') as f:
    for i, ex in enumerate(examples):
      rel_path = f'images/{i:06d}.png'
      Image.fromarray(ex.image_HWC).save(os.path.join(tmp_dir, rel_path))
      f.write(
          json.dumps(
              {
                  'image': rel_path,
                  'text': f'{ex.question} {ex.answer}',
                  'question': ex.question,
                  'answer': ex.answer,
              }
          )
          + '\n'
      )
  # Written last: its presence with these parameters marks a complete set.
  with open(os.path.join(tmp_dir, _META), 'w', encoding='utf-8') as f:
    json.dump(meta, f)


def write_dataset(out_dir: str, num: int, seed: int, size: int = 48, split: str = 'train') -> str:
  """Writes PNGs and `data.jsonl` under `out_dir`; returns the jsonl path.

  The files are written into a temporary sibling folder that is renamed into
  place, so `out_dir` is either absent or complete. A complete dataset with
  the same parameters is kept as is; one with other parameters is replaced.
  A folder not written here is never deleted: that is an error.
  """
  out_dir = os.path.abspath(out_dir)
  meta = {'format': _FORMAT_VERSION, 'num': num, 'seed': seed, 'size': size, 'split': split}
  jsonl = os.path.join(out_dir, _JSONL)
  old_meta = _read_meta(out_dir)
  if old_meta == meta:
    return jsonl
  if old_meta is None and os.path.isdir(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f'{out_dir} exists and is not a shapes dataset.')
  parent, name = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix=f'.{name}.tmp-', dir=parent)
  old_dir = None
  try:
    _write_files(tmp_dir, make_examples(num, seed, size, split), meta)
    if old_meta is not None:  # Ours, with other parameters: move it aside.
      old_dir = tempfile.mkdtemp(prefix=f'.{name}.old-', dir=parent)
      os.rename(out_dir, os.path.join(old_dir, name))
    os.rename(tmp_dir, out_dir)
  except OSError:
    # Another writer may have finished the same dataset first.
    if _read_meta(out_dir) != meta:
      raise
  finally:
    for path in (tmp_dir, old_dir):
      if path:
        shutil.rmtree(path, ignore_errors=True)
  return jsonl
