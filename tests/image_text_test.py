"""Image-text data, freezing, training on the shapes data and generation with images."""

import json
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from configs import tiny_mm
from llama4_jax import config_lib, optim, trainer
from llama4_jax import model as model_lib
from llama4_jax.data import image_processing, image_text, shapes_data
from llama4_jax.data import text as text_data
from llama4_jax.data import tokenizer as tokenizer_lib

import small_run

# Its module fixtures are expensive: one test worker runs the whole file (pyproject.toml).
pytestmark = pytest.mark.xdist_group(__name__)


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'tok.model'
  texts = [
      f'{q} {a}'
      for q in shapes_data.QUESTIONS.values()
      for a in (
          'red green blue yellow magenta cyan circle square triangle one two three ' 'four'
      ).split()
  ] * 20
  return tokenizer_lib.train_tokenizer(texts, vocab_size=320, output_path=str(path)), str(path)


@pytest.fixture(scope='module')
def config(tok, tmp_path_factory):
  """configs/tiny_mm.py, smaller: 6 steps on 64 shapes examples."""
  root = tmp_path_factory.mktemp('mm')
  config = tiny_mm.get_config()
  for key, value in {
      'model.vocab_size': 320,
      'model.hidden_size': 64,
      'model.head_dim': 16,
      'model.intermediate_size': 64,
      'model.intermediate_size_mlp': 128,
      'data.tokenizer': tok[1],
      'data.shapes.dir': str(root / 'shapes'),
      'data.shapes.train_examples': 64,
      'data.shapes.eval_examples': 12,
      'train.steps': 6,
      'train.batch_size': 8,
      'train.log_every': 1,
      'train.checkpoint_every': 3,
      'train.eval_every': 0,
      'eval.batch_size': 8,
      'optim.warmup_steps': 2,
  }.items():
    config_lib.set_override(config, key, value)
  return config


@pytest.fixture(scope='module')
def maker(config, tok):
  return image_text.row_maker(config, config_lib.model_config(config), tok[0])


def test_row_layout_and_text_only_weights(maker, tok):
  image = Image.new('RGB', (48, 48), (255, 0, 0))
  row = maker.row(image, 'What colour are the shapes? red', 'red.png')
  ids = image_processing.ImageTokenIds.from_tokenizer(tok[0])
  text = tok[0].encode('What colour are the shapes? red')
  expected = (
      [tok[0].bos_id, ids.image_start, ids.image]
      + [ids.patch] * 16
      + [ids.image_end]
      + text
      + [tok[0].eos_id]
  )
  n = len(expected)
  np.testing.assert_array_equal(row['inputs'][:n], expected)
  np.testing.assert_array_equal(row['targets'][: n - 1], expected[1:])
  # The loss covers the text and EOS only: targets that are image tokens weigh 0.
  weighted = row['targets'][row['weights'] == 1]
  np.testing.assert_array_equal(weighted, text + [tok[0].eos_id])
  assert row['segment_ids'][:n].all() and not row['segment_ids'][n:].any()
  assert row['pixels'].shape == (1, 3, 48, 48) and np.all(row['pixels'][:, 0] == 1.0)


def test_a_missing_image_is_named_before_training(tmp_path):
  """Every record's image is checked when the split is read, not when a step first draws it."""
  Image.new('RGB', (8, 8)).save(tmp_path / 'here.png')
  lines = [{'image': 'here.png', 'text': 'a'}, {'image': 'gone.png', 'text': 'b'}]
  (tmp_path / 'data.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
  config = tiny_mm.get_config()
  config.data.train_files = str(tmp_path / 'dat*.jsonl')  # a glob of one file
  with pytest.raises(text_data.DataError, match=r'data.jsonl: record 2: image file .*gone.png'):
    image_text.split_records(config, 'train', str(tmp_path))
  config.data.train_files = str(tmp_path / '*')  # two files
  with pytest.raises(text_data.DataError, match=r'config.data.train_files=.*one JSON Lines file'):
    image_text.split_records(config, 'train', str(tmp_path))


def test_every_row_is_checked_to_fit_when_the_split_is_read(tmp_path, config, tok):
  """A text too long for data.seq_len, or an image needing more tiles than a row holds, is
  named with its record when the split is read, not when a step first draws it."""
  Image.new('RGB', (48, 48)).save(tmp_path / 'square.png')
  Image.new('RGB', (96, 40)).save(tmp_path / 'wide.png')  # 2 tiles wide, and the global one
  turned = Image.new('RGB', (96, 40))
  exif = turned.getexif()
  exif[0x0112] = 6  # a quarter turn: loaded 40 wide, 96 high, as 2 tiles high
  turned.save(tmp_path / 'turned.jpg', exif=exif)
  assert image_processing.load_image(tmp_path / 'turned.jpg').size == (40, 96)
  lines = [{'image': 'square.png', 'text': 'red'}] * 3 + [
      {'image': 'wide.png', 'text': 'red ' * 60}
  ]
  (tmp_path / 'data.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
  long_text = config.copy_and_resolve_references()
  long_text.data.train_files = str(tmp_path / 'data.jsonl')
  with pytest.raises(
      text_data.DataError,
      match=r'data.jsonl: record 4 \(.*wide.png\): \d+ tokens \(20 of them for the image\) do '
      r'not fit data.seq_len=48 \+ 1',
  ):
    image_text.make_train_iterator(
        long_text, config_lib.model_config(config), tok[0], workdir=str(tmp_path)
    )

  # With up to 4 tiles, the check reads an image's size where its text is too long for the
  # longest layout, and agrees with the row's own checks either way.
  vision = config_lib.model_config(config).vision
  vision = vision.__class__(**{**vision.to_dict(), 'max_tiles': 4})
  outcomes = set()
  for tiles_per_row in (5, 2):
    maker = image_text.RowMaker(vision, tok[0], seq_len=100, tiles_per_row=tiles_per_row)
    for name in ('square.png', 'wide.png', 'turned.jpg'):
      for words in range(0, 32, 2):  # 3 tokens each: across both images' limits
        record = image_text.Record(str(tmp_path / name), 'red ' * words)
        try:
          maker.row(image_processing.load_image(record.image), record.text, 'row')
          row_error = None
        except text_data.DataError as e:
          row_error = str(e).removeprefix('row: ')
        try:
          maker.check_records([record], 'data.jsonl')
          check_error = None
        except text_data.DataError as e:
          check_error = str(e).removeprefix(f'data.jsonl: record 1 ({record.image}): ')
        assert check_error == row_error, (tiles_per_row, name, words)
        outcomes.add(check_error and re.sub(r'\d+', 'n', check_error)[:20])
  assert outcomes == {None, 'n tokens (n of them ', 'the image needs n ti'}
  # 20 image tokens and 61 of text fit; the longest layout's 88 would not have.
  square = image_text.Record(str(tmp_path / 'square.png'), 'red ' * 20)
  image_text.RowMaker(vision, tok[0], seq_len=100, tiles_per_row=5).check_records([square], '')
  with pytest.raises(text_data.DataError, match=r'record 1: .*gone.png.* does not exist'):
    maker.check_records([image_text.Record(str(tmp_path / 'gone.png'), 'red')], 'data.jsonl')


def test_image_size_reads_the_header(tmp_path):
  Image.new('RGB', (40, 24)).save(tmp_path / 'wide.png')
  assert image_processing.image_size(tmp_path / 'wide.png') == (24, 40)
  (tmp_path / 'text.png').write_text('not an image')
  with pytest.raises(image_processing.ImageError, match=r'text.png.* not an image file'):
    image_processing.image_size(tmp_path / 'text.png')


def test_bad_records_and_images_are_named(tmp_path, maker, tok):
  (tmp_path / 'a.jsonl').write_text('{"image": "x.png"}\n')
  with pytest.raises(text_data.DataError, match=r'a.jsonl:1: missing string field "text"'):
    image_text.read_records(str(tmp_path / 'a.jsonl'))
  (tmp_path / 'b.jsonl').write_text('{"image": "x.png", "text": "hi"}\nnot json\n')
  with pytest.raises(text_data.DataError, match=r'b.jsonl:2: not valid JSON'):
    image_text.read_records(str(tmp_path / 'b.jsonl'))
  # Image paths stay in the data file's folder unless data.images_anywhere allows more.
  for i, image in enumerate(['/etc/passwd', '../x.png', 'sub/../../x.png']):
    (tmp_path / f'c{i}.jsonl').write_text(json.dumps({'image': image, 'text': 'hi'}) + '\n')
    with pytest.raises(text_data.DataError, match=f'c{i}.jsonl:1: image path .* leaves the data'):
      image_text.read_records(str(tmp_path / f'c{i}.jsonl'))
    assert image_text.read_records(str(tmp_path / f'c{i}.jsonl'), images_anywhere=True)
  (tmp_path / 'd.jsonl').write_text('{"image": "sub/../x.png", "text": "hi"}\n')
  assert image_text.read_records(str(tmp_path / 'd.jsonl'))[0].image == str(
      tmp_path / 'sub/../x.png'
  )
  # A `<|patch|>` in a record's text stays text: it takes no image feature.
  patch = maker.ids.patch
  plain = maker.row(Image.new('RGB', (48, 48)), 'a b', 'p.png')
  tricky = maker.row(Image.new('RGB', (48, 48)), 'a <|patch|> b', 'p.png')
  assert np.sum(tricky['inputs'] == patch) == np.sum(plain['inputs'] == patch)
  with pytest.raises(text_data.DataError, match='do not fit data.seq_len=48'):
    maker.row(Image.new('RGB', (48, 48)), 'word ' * 60, 'long.png')
  with pytest.raises(text_data.DataError, match='needs 3 tiles, more than data.tiles_per_row=1'):
    maker.pad_tiles(np.zeros((3, 3, 48, 48), np.float32), 'wide.png')
  cfg = config_lib.model_config(tiny_mm.get_config())
  with pytest.raises(text_data.DataError, match='image_token_id is 99'):
    image_text.RowMaker(
        cfg.vision.__class__(
            **{**cfg.vision.to_dict(), 'image_token_id': 99, 'image_size': 48, 'patch_size': 6}
        ),
        tok[0],
        seq_len=48,
        tiles_per_row=1,
    )


def test_place_images_fills_markers_in_order(tok):
  ids = image_processing.ImageTokenIds.from_tokenizer(tok[0])
  vcfg = config_lib.model_config(tiny_mm.get_config()).vision
  images = [Image.new('RGB', (48, 48), c) for c in ((255, 0, 0), (0, 0, 255))]
  prompts, pixels = image_text.place_images(
      [[1, ids.image, 40], [1, 41, ids.image]], images, vcfg, ids
  )
  assert prompts[0].count(ids.patch) == 16 and prompts[1].count(ids.patch) == 16
  assert pixels.shape == (2, 1, 3, 48, 48)
  assert pixels[0, 0, 0, 0, 0] == 1.0 and pixels[1, 0, 2, 0, 0] == 1.0  # red, then blue
  (single,), _ = image_text.place_images([[1, 40]], images[:1], vcfg, ids)
  assert single[:3] == [1, ids.image_start, ids.image]  # no marker: the image goes first
  with pytest.raises(
      ValueError, match=re.escape('1 <|image|> placeholder but 2 images were given')
  ):
    image_text.place_images([[1, ids.image], [1, 40]], images, vcfg, ids)


def test_chat_prompts_put_images_inside_the_user_turn(tok):
  """generate.py --chat: an image goes where its `<|image|>` is in the user's text, inside
  the user turn as in training, or first in it for a single prompt without markers."""
  tokenizer = tok[0]
  ids = image_processing.ImageTokenIds.from_tokenizer(tokenizer)
  vcfg = config_lib.model_config(tiny_mm.get_config()).vision
  layout = image_processing.image_token_layout((1, 1), vcfg.tokens_per_tile, ids)
  images = [Image.new('RGB', (48, 48), c) for c in ((255, 0, 0), (0, 0, 255))]
  start, end = (tokenizer.special_token_id(f'<|header_{s}|>') for s in ('start', 'end'))
  user = [tokenizer.bos_id, start, *tokenizer.encode_text('user'), end]
  answer = [tokenizer.eot_id, start, *tokenizer.encode_text('assistant'), end]
  answer += tokenizer.encode_text('\n\n')
  question = 'What colour are the shapes?'

  prompts = image_text.chat_prompts(tokenizer, [question], num_images=1)
  (single,), pixels = image_text.place_images(prompts, images[:1], vcfg, ids)
  newlines, text = tokenizer.encode_text('\n\n'), tokenizer.encode_text(question)
  assert single == user + newlines + layout + text + answer
  assert pixels.shape == (1, 1, 3, 48, 48)

  texts = [f'<|image|>{question}', 'How many shapes? <|image|>']
  prompts, pixels = image_text.place_images(
      image_text.chat_prompts(tokenizer, texts, num_images=2), images, vcfg, ids
  )
  assert prompts[0] == user + newlines + layout + text + answer
  assert prompts[1] == user + tokenizer.encode_text('\n\nHow many shapes? ') + layout + answer
  assert pixels[0, 0, 0, 0, 0] == 1.0 and pixels[1, 0, 2, 0, 0] == 1.0  # red, then blue
  # Without markers, two prompts do not say where their images go.
  with pytest.raises(ValueError, match=re.escape('0 <|image|> placeholders but 2 images')):
    image_text.place_images(
        image_text.chat_prompts(tokenizer, ['a', 'b'], num_images=2), images, vcfg, ids
    )


@pytest.mark.slow
def test_freezing_keeps_the_frozen_parts(config):
  cfg = config_lib.model_config(config)
  shapes = nnx.state(model_lib.abstract_model(cfg), nnx.Param)
  params = jax.tree.map(lambda p: np.zeros(p.shape, p.dtype), shapes)
  grads = jax.tree.map(lambda p: np.ones(p.shape, p.dtype), shapes)
  for freeze, frozen_part, trained_part in (
      ('vision', 'vision', 'projector'),
      ('language', 'embed', 'vision'),
  ):
    tx = optim.make_optimizer(config.optim, 10, params, freeze)
    update = jax.jit(tx.update)
    state = jax.jit(tx.init)(params)
    for _ in range(3):
      updates, state = update(grads, state, params)
    new = nnx.to_pure_dict(optax.apply_updates(params, updates))
    old = nnx.to_pure_dict(params)
    same = jax.tree.map(np.array_equal, new[frozen_part], old[frozen_part])
    assert all(jax.tree.leaves(same)), freeze
    assert not all(
        jax.tree.leaves(jax.tree.map(np.array_equal, new[trained_part], old[trained_part]))
    ), freeze


@pytest.fixture(scope='module')
def trained(config, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  return trainer.train_and_evaluate(config, str(workdir)), workdir


@pytest.mark.slow
def test_training_on_the_shapes_data(trained):
  result, workdir = trained
  assert np.isfinite(result['eval_loss']) and result['step'] == 6
  assert 0 <= result['qa_accuracy'] <= 1 and result['qa_questions'] == 12
  assert set(result['qa_accuracy_by_question']) <= {'colour', 'shape', 'count'}
  assert 0 <= result['text_only_accuracy'] <= 1
  first, *_ = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert first['step'] == 1


@pytest.mark.slow
def test_generate_script_with_an_image(trained, tok, tmp_path):
  _, workdir = trained
  image = tmp_path / 'shape.png'
  Image.fromarray(shapes_data.make_examples(1, seed=3)[0].image_HWC).save(image)
  out = tmp_path / 'ids.json'
  result = small_run.run_script(
      'generate.py',
      f'--workdir={workdir}',
      f'--image={image}',
      '--prompt=What colour are the shapes?',
      '--max_new_tokens=4',
      f'--output={out}',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  ids = json.loads(out.read_text())['ids']
  assert len(ids) == 1 and 1 <= len(ids[0]) <= 4
  # --chat: one prompt (its image first in its user turn), or two with a marker each.
  one, two = small_run.run_scripts(
      tmp_path,
      [
          ['generate.py', f'--workdir={workdir}', f'--image={image}', '--chat']
          + ['--prompt=What colour are the shapes?', '--max_new_tokens=2'],
          ['generate.py', f'--workdir={workdir}', f'--image={image}', f'--image={image}']
          + ['--chat', '--prompt=<|image|>Colour?', '--prompt=Shape? <|image|>']
          + ['--max_new_tokens=2', f'--output={out}'],
      ],
  )
  assert one['status'] == 0 and two['status'] == 0, (one['output'][-2000:], two['output'][-2000:])
  assert len(json.loads(out.read_text())['ids']) == 2


@pytest.mark.slow
def test_eval_scores_an_image_text_run_as_training_did(trained):
  from llama4_jax import evaluation

  result, workdir = trained
  (row,) = evaluation.evaluate_workdir(str(workdir), log=lambda *_: None)
  assert row['step'] == 6
  np.testing.assert_allclose(row['loss'], result['eval_loss'], rtol=1e-5)


def test_each_process_decodes_only_its_own_rows(config, tok, tmp_path, monkeypatch):
  """2 processes, each holding every other row (as where a model axis spans the hosts):
  each decodes half of each global batch's images, and its rows are the 1-process batches'.
  Evaluation fills one more batch shard with a padding row."""
  cfg = config_lib.model_config(config)
  decoded = []
  load_image = image_text.image_processing.load_image
  monkeypatch.setattr(
      image_text.image_processing, 'load_image', lambda p: decoded.append(p) or load_image(p)
  )
  B, E = config.train.batch_size, config.eval.batch_size

  def batches(train_rows, eval_rows):
    it = image_text.make_train_iterator(config, cfg, tok[0], workdir=str(tmp_path), rows=train_rows)
    train = [next(it) for _ in range(2)]
    evals = image_text.make_eval_batches(config, cfg, tok[0], workdir=str(tmp_path), rows=eval_rows)
    return train, evals

  whole = batches(None, None)
  decoded.clear()
  train_parts = [np.arange(p, B, 2) for p in range(2)]
  eval_parts = [np.arange(p, E + 1, 2) for p in range(2)]  # E + 1 rows: the last is padding
  halves = [
      batches(text_data.BatchRows(t, B), text_data.BatchRows(e, E + 1))
      for t, e in zip(train_parts, eval_parts)
  ]
  evals = len(whole[1])
  # Per process: 2 train batches of B/2 rows, eval batches of about E/2 rows (+1 template each).
  assert len(decoded) <= 2 * (2 * B // 2 + evals * (E // 2 + 1) + 2)
  for split, parts in ((0, train_parts), (1, eval_parts)):
    for i, batch in enumerate(whole[split]):
      if split:  # as the padding rows of the last batch are made
        batch = text_data.pad_rows(batch, rows=E + 1, fill={'inputs': tok[0].pad_id})
      for p, indices in enumerate(parts):
        for key, x in batch.items():
          np.testing.assert_array_equal(halves[p][split][i][key], x[indices])


def test_train_iterator_resumes_from_its_state(config, tok, tmp_path):
  """The checkpointed iterator state gives the batches an uninterrupted iterator gives."""
  cfg = config_lib.model_config(config)
  make = lambda: image_text.make_train_iterator(config, cfg, tok[0], workdir=str(tmp_path))
  it = make()
  next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  assert not np.array_equal(expected[0]['pixels'], expected[1]['pixels'])
  resumed = make()
  resumed.set_state(state)
  for batch in expected:
    again = next(resumed)
    for key in batch:
      np.testing.assert_array_equal(again[key], batch[key])
