"""Tests for llama4_jax.image_processing."""

import numpy as np
import pytest
from PIL import Image, ImageFile

from llama4_jax.data import image_processing as ip
from llama4_jax.data import tokenizer as tokenizer_lib

TILE = 336
# Small stand-in ids, so failures print readably.
IDS = ip.ImageTokenIds(
    image_start=1, image_end=2, image=3, patch=4, tile_x_separator=5, tile_y_separator=6
)


def _solid(height, width, colour, mode='RGB'):
  return Image.new(mode, (width, height), colour)


# Tiling and resize targets (doc section 6; sizes are height x width).


@pytest.mark.parametrize(
    'height, width, tiling, resized',
    [
        (500, 800, (2, 3), (500, 800)),  # Fits a canvas: no resize at all.
        (1000, 300, (3, 1), (1000, 300)),
        (100, 200, (1, 1), (168, 336)),  # Upscaled until one side fills a tile.
        (2000, 2000, (4, 4), (1344, 1344)),  # Too big for any canvas.
    ],
)
def test_documented_examples(height, width, tiling, resized):
  assert ip.best_fit_tiling(height, width, TILE, 16) == tiling
  assert ip.resize_target(height, width, tiling, TILE) == resized
  processed = ip.preprocess(_solid(height, width, (9, 9, 9)), tile_size=TILE, max_tiles=16)
  n_tiles = tiling[0] * tiling[1]
  assert processed.aspect_ratio == tiling
  assert processed.pixels_NCHW.shape == (n_tiles + (n_tiles > 1), 3, TILE, TILE)
  assert processed.pixels_NCHW.dtype == np.float32


def test_ties_go_to_the_smallest_canvas():
  # 500x800: 2x3 and 3x3 both allow scale 1.26 (width-limited); 3x1 and 3x2
  # both allow 1.008 for 1000x300.
  assert ip.best_fit_tiling(500, 800, TILE, 9) == (2, 3)
  assert ip.best_fit_tiling(1000, 300, TILE, 6) == (3, 1)


def test_largest_scale_below_one_when_nothing_fits():
  # 5000x400 cannot fit 16 tiles: width limits every 1-wide grid to 0.84,
  # and 13x1 is the smallest of those (12x1 is height-limited to 0.806).
  assert ip.best_fit_tiling(5000, 400, TILE, 16) == (13, 1)
  assert ip.resize_target(5000, 400, (13, 1), TILE) == (4200, 336)
  # max_tiles=1: a big image is simply shrunk into one tile.
  assert ip.best_fit_tiling(1000, 500, TILE, 1) == (1, 1)
  assert ip.resize_target(1000, 500, (1, 1), TILE) == (336, 168)


def test_least_upscaling_wins():
  # 300x300 fits 1x1 (scale 1.12) and every larger grid (scale >= 1.12).
  assert ip.best_fit_tiling(300, 300, TILE, 16) == (1, 1)
  # 400x700: 2x3 gives 1.44 but 2x2 gives 0.96 < 1, so 2x3 it is.
  assert ip.best_fit_tiling(400, 700, TILE, 16) == (2, 3)


def test_bad_sizes_are_rejected():
  with pytest.raises(ValueError, match='positive'):
    ip.best_fit_tiling(0, 10, TILE, 16)


# Pixels.


def test_exact_values_and_padding():
  # 2x4 with 4-px tiles: already fills the width, so no resize, 2 pad rows.
  image = Image.fromarray(np.array([[[255, 0, 51]] * 4, [[0, 255, 51]] * 4], np.uint8))
  processed = ip.preprocess(image, tile_size=4, max_tiles=4)
  assert processed.aspect_ratio == (1, 1)
  pixels_CHW = processed.pixels_NCHW[0]
  fifth = (np.float32(51) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
  np.testing.assert_array_equal(pixels_CHW[:, 0, 0], [1, -1, fifth])
  np.testing.assert_array_equal(pixels_CHW[:, 1, 3], [-1, 1, fifth])
  np.testing.assert_array_equal(pixels_CHW[:, 2:, :], -1)  # Black padding.
  assert fifth == pytest.approx(-0.6)


def test_custom_mean_std():
  image = _solid(4, 4, (255, 255, 255))
  pixels = ip.preprocess(
      image, tile_size=4, max_tiles=1, mean=(0, 0.5, 1), std=(1, 0.25, 2)
  ).pixels_NCHW
  np.testing.assert_allclose(pixels[0, :, 0, 0], [1, 2, 0])


def test_pixel_range():
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (37, 90, 3), np.uint8))
  pixels = ip.preprocess(image, tile_size=32, max_tiles=6).pixels_NCHW
  assert pixels.min() >= -1 and pixels.max() <= 1
  assert pixels.min() == -1 and pixels.max() > 0.9


def test_tiles_are_row_major_and_global_tile_last():
  # A 2x3 grid of 4-px tiles, each a different colour: fits exactly.
  colours = [[(10 * (3 * r + c + 1),) * 3 for c in range(3)] for r in range(2)]
  image_HWC = np.zeros((8, 12, 3), np.uint8)
  for r in range(2):
    for c in range(3):
      image_HWC[4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = colours[r][c]
  image = Image.fromarray(image_HWC)
  processed = ip.preprocess(image, tile_size=4, max_tiles=6)
  assert processed.aspect_ratio == (2, 3)
  pixels = processed.pixels_NCHW
  assert pixels.shape == (7, 3, 4, 4)
  for tile in range(6):
    value = colours[tile // 3][tile % 3][0] / 255 * 2 - 1
    np.testing.assert_allclose(pixels[tile], value, atol=1e-6)
  global_HWC = np.asarray(image.resize((4, 4), Image.Resampling.BILINEAR))
  np.testing.assert_allclose(pixels[6], global_HWC.transpose(2, 0, 1) / 255 * 2 - 1, atol=1e-6)


def test_single_tile_has_no_global_tile():
  processed = ip.preprocess(_solid(3, 3, (0, 0, 0)), tile_size=4, max_tiles=16)
  assert processed.aspect_ratio == (1, 1)
  assert processed.pixels_NCHW.shape == (1, 3, 4, 4)


def test_non_rgb_image_is_converted():
  processed = ip.preprocess(_solid(4, 4, 255, mode='L'), tile_size=4, max_tiles=1)
  np.testing.assert_array_equal(processed.pixels_NCHW, 1)


# Prompt layout.


def test_single_tile_layout():
  assert ip.image_token_layout((1, 1), 3, IDS) == [1, 3, 4, 4, 4, 2]


def test_two_by_three_layout():
  t = 144
  layout = ip.image_token_layout((2, 3), t, IDS)
  row = [4] * t + [5] + [4] * t + [5] + [4] * t + [6]
  assert layout == [1] + row + row + [3] + [4] * t + [2]
  assert layout.count(IDS.patch) == 7 * t  # One run per tile incl. global.
  assert len(layout) == 1 + 2 * (3 * t + 3) + 1 + t + 1


def test_image_token_ids_from_tokenizer():
  tok = tokenizer_lib.train_tokenizer(['a small corpus of text'] * 20, vocab_size=300)
  ids = ip.ImageTokenIds.from_tokenizer(tok)
  assert ids.image == tok.encode('<|image|>')[0]
  assert tok.decode([ids.tile_y_separator]) == '<|tile_y_separator|>'
  prompt = tok.encode('Look: <|image|> and <|image|>?')
  layouts = [ip.image_token_layout((1, 1), 2, ids), ip.image_token_layout((1, 2), 2, ids)]
  expanded = ip.expand_image_prompt(prompt, layouts, ids.image)
  assert tok.decode(expanded) == (
      'Look: <|image_start|><|image|><|patch|><|patch|><|image_end|> and '
      '<|image_start|><|patch|><|patch|><|tile_x_separator|><|patch|>'
      '<|patch|><|tile_y_separator|><|image|><|patch|><|patch|>'
      '<|image_end|>?'
  )


def test_expand_image_prompt():
  layouts = [[1, 3, 4, 2], [1, 3, 4, 4, 2]]
  assert ip.expand_image_prompt([7, 3, 8, 3, 9], layouts, IDS.image) == [
      7,
      1,
      3,
      4,
      2,
      8,
      1,
      3,
      4,
      4,
      2,
      9,
  ]
  assert ip.expand_image_prompt([7, 8], [], IDS.image) == [7, 8]


@pytest.mark.parametrize(
    'prompt, n_images, message',
    [
        ([7, 3, 3], 1, 'Prompt has 2 <|image|> placeholders but 1 image was given'),
        ([7, 3], 2, 'Prompt has 1 <|image|> placeholder but 2 images were given'),
        ([7], 1, 'Prompt has 0 <|image|> placeholders but 1 image was given'),
    ],
)
def test_placeholder_count_mismatch(prompt, n_images, message):
  with pytest.raises(ValueError, match=message.replace('|', r'\|')):
    ip.expand_image_prompt(prompt, [[1, 3, 4, 2]] * n_images, IDS.image)


# load_image.


def test_missing_file(tmp_path):
  path = tmp_path / 'nope.png'
  with pytest.raises(ip.ImageError, match='nope.png.*does not exist'):
    ip.load_image(path)


def test_text_file_is_not_an_image(tmp_path):
  path = tmp_path / 'notes.png'
  path.write_text('just some text\n')
  with pytest.raises(ip.ImageError, match='notes.png.*not an image'):
    ip.load_image(path)


def _random_image(height=64, width=48):
  rng = np.random.default_rng(1)
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))


@pytest.mark.parametrize('suffix', ['png', 'jpg'])
@pytest.mark.parametrize('lenient_pillow', [False, True])
def test_truncated_file(tmp_path, monkeypatch, suffix, lenient_pillow):
  path = tmp_path / f'cut.{suffix}'
  _random_image().save(path)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  # Another library may have told Pillow to accept truncated files.
  monkeypatch.setattr(ImageFile, 'LOAD_TRUNCATED_IMAGES', lenient_pillow)
  with pytest.raises(ip.ImageError, match=f'cut.{suffix}.*truncated'):
    ip.load_image(path)
  assert ImageFile.LOAD_TRUNCATED_IMAGES == lenient_pillow  # Restored.


@pytest.mark.parametrize(
    'mode, array, suffix',
    [
        ('F', np.full((4, 5), 0.5, np.float32), 'tiff'),
        ('I', np.full((4, 5), 70_000, np.int32), 'tiff'),
    ],
)
def test_unconvertible_mode(tmp_path, mode, array, suffix):
  path = tmp_path / f'deep.{suffix}'
  image = Image.fromarray(array)
  assert image.mode == mode
  image.save(path)
  with pytest.raises(ip.ImageError, match=f"deep.{suffix}.*mode '{mode}'"):
    ip.load_image(path)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
  path = tmp_path / 'grey16.png'
  Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)).save(path)
  assert Image.open(path).mode == 'I;16'
  rgb = np.asarray(ip.load_image(path))
  np.testing.assert_array_equal(rgb, [[[0] * 3, [100] * 3, [255] * 3]])


def test_rgba_is_composited_over_white(tmp_path):
  path = tmp_path / 'alpha.png'
  rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128]]], np.uint8)
  Image.fromarray(rgba).save(path)
  image = ip.load_image(path)
  assert image.mode == 'RGB'
  np.testing.assert_array_equal(
      np.asarray(image), [[[255, 0, 0], [255, 255, 255], [127, 127, 127]]]
  )


def test_palette_with_transparency_and_grey(tmp_path):
  palette = Image.new('P', (2, 1))
  palette.putpalette([10, 20, 30, 200, 100, 0])
  palette.putdata([0, 1])
  palette.save(tmp_path / 'p.png', transparency=0)
  np.testing.assert_array_equal(
      np.asarray(ip.load_image(tmp_path / 'p.png')), [[[255, 255, 255], [200, 100, 0]]]
  )
  _solid(2, 3, 77, mode='L').save(tmp_path / 'l.jpg')
  grey = ip.load_image(tmp_path / 'l.jpg')
  assert grey.mode == 'RGB' and grey.size == (3, 2)
  np.testing.assert_allclose(np.asarray(grey, np.float32), 77, atol=1)


def test_exif_rotation_is_applied(tmp_path):
  path = tmp_path / 'phone.jpg'
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view.
  _random_image(height=20, width=40).save(path, exif=exif)
  assert ip.load_image(path).size == (20, 40)  # (width, height), upright.
