"""Tests for llama4_jax.shapes_data."""

import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from llama4_jax.data import shapes_data as sd

SIZE = 48
NUM = 600


@pytest.fixture(scope='module')
def train():
  return sd.make_examples(NUM, seed=0, size=SIZE, split='train')


@pytest.fixture(scope='module')
def heldout():
  return sd.make_examples(NUM, seed=1, size=SIZE, split='validation')


def _components(mask):
  """8-connected components of a boolean mask, as lists of (y, x)."""
  todo = set(zip(*np.nonzero(mask)))
  components = []
  while todo:
    stack, component = [todo.pop()], []
    while stack:
      y, x = stack.pop()
      component.append((y, x))
      for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
          if (y + dy, x + dx) in todo:
            todo.remove((y + dy, x + dx))
            stack.append((y + dy, x + dx))
    components.append(component)
  return components


def _kind_of(component, extent):
  """Kind by how much of its bounding box a shape fills (1, ~0.8, ~0.55)."""
  fill = len(component) / extent**2
  return 'square' if fill == 1 else 'circle' if fill > 0.7 else 'triangle'


def _describe(pixels, extent):
  """(kind, colour, count) read back from the pixels alone."""
  lit = pixels.any(axis=-1)
  colours = {tuple(int(v) for v in rgb) for rgb in pixels[lit]}
  assert len(colours) == 1, colours  # One flat colour, no anti-aliasing.
  components = _components(lit)
  for component in components:
    ys, xs = zip(*component)
    # A full, unclipped box per shape: inside the image, not merged.
    assert max(ys) - min(ys) + 1 == extent
    assert max(xs) - min(xs) + 1 == extent
  kinds = {_kind_of(c, extent) for c in components}
  assert len(kinds) == 1, kinds
  colour = {rgb: name for name, rgb in sd.COLOURS.items()}[colours.pop()]
  return kinds.pop(), colour, len(components)


@pytest.mark.parametrize('size', [32, 48, 64])
def test_scene_renders_its_kind_colour_and_count(size):
  rng = np.random.default_rng(size)
  for _ in range(150):
    scene = sd.make_scene(rng, size)
    assert scene.pixels_HWC.shape == (size, size, 3)
    assert scene.pixels_HWC.dtype == np.uint8
    assert _describe(scene.pixels_HWC, sd.shape_extent(size)) == (
        scene.kind,
        scene.colour,
        scene.count,
    )


def test_shapes_keep_apart_and_off_the_border():
  rng = np.random.default_rng(0)
  for _ in range(100):
    lit = sd.make_scene(rng, SIZE).pixels_HWC.any(axis=-1)
    assert not lit[0].any() and not lit[-1].any()
    assert not lit[:, 0].any() and not lit[:, -1].any()
    # Growing each shape by 1 px down and right still leaves them apart: a gap >= 2 px.
    grown = np.zeros_like(lit)
    for dy in (0, 1):
      for dx in (0, 1):
        grown |= np.roll(lit, (dy, dx), axis=(0, 1))
    assert len(_components(grown)) == len(_components(lit))


def test_small_size_rejected():
  with pytest.raises(ValueError, match='at least'):
    sd.make_scene(np.random.default_rng(0), sd.MIN_SIZE - 1)


def test_answers_match_the_image(train):
  extent = sd.shape_extent(SIZE)
  for ex in train[:200]:
    kind, colour, count = _describe(ex.image_HWC, extent)
    truth = {'colour': colour, 'shape': kind, 'count': sd.COUNT_WORDS[count - 1]}[ex.question_type]
    assert ex.answer == truth
    assert ex.question == sd.QUESTIONS[ex.question_type]
    assert ex.answer in sd.answer_choices(ex.question_type)


def test_same_seed_same_examples(train):
  again = sd.make_examples(NUM, seed=0, size=SIZE)
  assert [(e.question, e.answer) for e in again] == [(e.question, e.answer) for e in train]
  for a, b in zip(again, train):
    np.testing.assert_array_equal(a.image_HWC, b.image_HWC)


def test_different_seeds_differ(train):
  other = sd.make_examples(50, seed=2, size=SIZE)
  assert any(not np.array_equal(a.image_HWC, b.image_HWC) for a, b in zip(other, train))
  assert [e.answer for e in other] != [e.answer for e in train[:50]]


def test_splits_share_no_image(train, heldout):
  train_images = {e.image_HWC.tobytes() for e in train}
  assert not any(e.image_HWC.tobytes() in train_images for e in heldout)
  # By construction, whatever the seeds: the same seed still gives disjoint
  # splits.
  same_seed = sd.make_examples(NUM, seed=0, size=SIZE, split='validation')
  assert not any(e.image_HWC.tobytes() in train_images for e in same_seed)


def test_answers_balanced(train):
  by_type = collections.defaultdict(collections.Counter)
  for ex in train:
    by_type[ex.question_type][ex.answer] += 1
  assert set(by_type) == set(sd.QUESTIONS)
  for question_type, counts in by_type.items():
    total = sum(counts.values())
    assert abs(total - NUM / 3) < 0.2 * NUM / 3
    choices = sd.answer_choices(question_type)
    assert set(counts) == set(choices)
    expected = total / len(choices)
    for answer in choices:
      assert abs(counts[answer] - expected) < 0.5 * expected, (question_type, counts)


def test_text_only_baseline_is_about_a_quarter(train, heldout):
  assert 0.2 <= sd.text_only_baseline(train, heldout) <= 0.3


def test_text_only_baseline_uses_majority_per_question():
  image = np.zeros((SIZE, SIZE, 3), np.uint8)
  ex = lambda q, a: sd.Example(image, q, a, 'colour')
  train = [ex('q1', 'a'), ex('q1', 'a'), ex('q1', 'b'), ex('q2', 'b')]
  heldout = [ex('q1', 'a'), ex('q2', 'a'), ex('q2', 'b'), ex('q3', 'a')]
  # q1 -> a (right), q2 -> b (one of two), unseen q3 -> overall a (right).
  assert sd.text_only_baseline(train, heldout) == 3 / 4


def test_answer_choices():
  assert sd.answer_choices('colour') == tuple(sd.COLOURS)
  assert sd.answer_choices('shape') == ('circle', 'square', 'triangle')
  assert sd.answer_choices('count') == ('one', 'two', 'three', 'four')
  with pytest.raises(ValueError):
    sd.answer_choices('size')


def test_write_dataset_round_trips(tmp_path, monkeypatch):
  out_dir = tmp_path / 'shapes'
  jsonl = sd.write_dataset(str(out_dir), 20, seed=3, size=SIZE)
  assert jsonl == str(out_dir / 'data.jsonl')
  assert sorted(os.listdir(tmp_path)) == ['shapes']  # No temp dirs left.
  examples = sd.make_examples(20, seed=3, size=SIZE)
  with open(jsonl, encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 20
  for record, ex in zip(records, examples):
    assert record['text'] == f'{ex.question} {ex.answer}'
    assert (record['question'], record['answer']) == (ex.question, ex.answer)
    assert not os.path.isabs(record['image'])
    with Image.open(out_dir / record['image']) as image:
      assert image.size == (SIZE, SIZE) and image.mode == 'RGB'
      np.testing.assert_array_equal(np.asarray(image), ex.image_HWC)

  # Same parameters: kept as is, nothing regenerated.
  def fail(*args, **kwargs):
    raise AssertionError('regenerated')

  monkeypatch.setattr(sd, 'make_examples', fail)
  assert sd.write_dataset(str(out_dir), 20, seed=3, size=SIZE) == jsonl
  monkeypatch.undo()

  # Other parameters: replaced in place.
  sd.write_dataset(str(out_dir), 5, seed=4, size=SIZE)
  with open(jsonl, encoding='utf-8') as f:
    assert len(f.readlines()) == 5
  assert len(os.listdir(out_dir / 'images')) == 5
  assert sorted(os.listdir(tmp_path)) == ['shapes']


def test_write_dataset_leaves_no_partial_output(tmp_path, monkeypatch):
  def broken_save(self, *args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(Image.Image, 'save', broken_save)
  with pytest.raises(OSError, match='disk full'):
    sd.write_dataset(str(tmp_path / 'shapes'), 5, seed=0, size=SIZE)
  assert not os.listdir(tmp_path)


def test_write_dataset_refuses_foreign_folder(tmp_path):
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(FileExistsError):
    sd.write_dataset(str(tmp_path), 5, seed=0, size=SIZE)
  assert os.listdir(tmp_path) == ['notes.txt']
