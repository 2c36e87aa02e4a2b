"""Llama 4 image preprocessing (tiling, pixels) and image prompt layout.

Follows HF `Llama4ImageProcessor` / `Llama4Processor` and the architecture
doc, section 6: the image is resized without distortion into the best canvas
of up to `max_tiles` square tiles, padded bottom/right with black, normalised
to [-1, 1] and cut into row-major tiles. A multi-tile image also gets a
global tile (the whole image squashed to one tile) last. In the prompt each
tile becomes a run of `<|patch|>` tokens, which the model replaces with that
tile's vision features in order of occurrence.
"""

import contextlib
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Modes whose samples are 8-bit colour or grey, so Pillow's RGB conversion
# means what it says. 'I' and 'F' are left out: they have no defined range
# and Pillow clips them to 0..255 (a 16-bit frame comes out nearly white).
# So are 'LAB' (Pillow copies the bands, it does not convert the colours)
# and in-memory-only modes such as premultiplied 'RGBa' / 'La'.
RGB_CONVERTIBLE_MODES = ('1', 'L', 'LA', 'P', 'PA', 'RGB', 'RGBA', 'RGBX', 'CMYK', 'YCbCr')
# 16-bit grey (e.g. a 16-bit greyscale PNG) spans 0..65535 by definition, so
# we can bring it down to 8 bits ourselves instead of letting Pillow clip it.
GREY16_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')


class ImageError(ValueError):
  """An image file or image that cannot be used; the message names it."""


class ProcessedImage(NamedTuple):
  pixels_NCHW: np.ndarray  # float32 [n_tiles, 3, tile, tile]; global tile last.
  aspect_ratio: tuple[int, int]  # (tiles_high, tiles_wide), global excluded.


class ImageTokenIds(NamedTuple):
  """Ids of the special tokens an image's prompt layout is made of."""

  image_start: int
  image_end: int
  image: int  # `<|image|>`: the user's placeholder, and the global-tile mark.
  patch: int  # Replaced by one vision feature each.
  tile_x_separator: int
  tile_y_separator: int

  @classmethod
  def from_tokenizer(cls, tokenizer) -> 'ImageTokenIds':
    return cls(*(tokenizer.special_token_id(f'<|{name}|>') for name in cls._fields))


# The released models' ids (docs/llama4_architecture.md §7), for checkpoints without our tokenizer.
LLAMA4_IMAGE_TOKEN_IDS = ImageTokenIds(
    image_start=200080,
    image_end=200081,
    image=200090,
    patch=200092,
    tile_x_separator=200084,
    tile_y_separator=200085,
)


def image_token_ids_for(vision_cfg, tokenizer=None) -> ImageTokenIds:
  """The image tokens of a model with this vision tower: its tokenizer's, whose `<|patch|>`
  must be the model's image_token_id (else the images would silently go nowhere); without a
  tokenizer, the released models' ids, if the model uses them."""
  if tokenizer is None:
    if vision_cfg.image_token_id == LLAMA4_IMAGE_TOKEN_IDS.patch:
      return LLAMA4_IMAGE_TOKEN_IDS
    raise ValueError('images need the tokenizer that defines the image tokens; pass --tokenizer')
  ids = ImageTokenIds.from_tokenizer(tokenizer)
  if ids.patch != vision_cfg.image_token_id:
    raise ValueError(
        f"the tokenizer's <|patch|> id is {ids.patch}, but "
        f'config.model.vision.image_token_id is {vision_cfg.image_token_id}'
    )
  return ids


def load_image(path: str | os.PathLike) -> Image.Image:
  """Reads, fully decodes, EXIF-rotates and converts an image file to RGB.

  Raises:
    ImageError: the file is missing, not an image, truncated or corrupt, or
      has a pixel mode outside the conversion policy (see `to_rgb`).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ImageError(f'Image file {path!r} does not exist.')
  try:
    with _fail_on_truncation(), Image.open(path) as image:
      image.load()  # Decode every byte now: open() only reads the header.
      # As HF `load_image`: phone photos are stored sideways plus a tag.
      image = ImageOps.exif_transpose(image)
  except Image.UnidentifiedImageError:
    raise ImageError(f'{path!r} is not an image file Pillow can read.') from None
  except (
      OSError,
      SyntaxError,
      ValueError,
      Image.DecompressionBombError,
  ) as e:  # Pillow reports corrupt data with any of these.
    raise ImageError(f'Cannot decode image file {path!r}: {e}') from e
  return to_rgb(image, name=path)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
  """(height, width) of an image file as stored, read from its header alone.

  An EXIF quarter turn (which `load_image` applies) would swap the two; callers that need
  only the tile count or the prompt layout's length may ignore it: `best_fit_tiling` of the
  turned image is the transposed grid, of as many tiles.
  """
  path = os.fspath(path)
  try:
    with Image.open(path) as image:
      return image.height, image.width
  except FileNotFoundError:
    raise ImageError(f'Image file {path!r} does not exist.') from None
  except Image.UnidentifiedImageError:
    raise ImageError(f'{path!r} is not an image file Pillow can read.') from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError(f'Cannot read the header of image file {path!r}: {e}') from e


@contextlib.contextmanager
def _fail_on_truncation():
  """Makes Pillow raise on a truncated file even if another library set its
  global to accept them (it then fills the missing part silently)."""
  saved = ImageFile.LOAD_TRUNCATED_IMAGES
  ImageFile.LOAD_TRUNCATED_IMAGES = False
  try:
    yield
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = saved


def to_rgb(image: Image.Image, name: str = 'image') -> Image.Image:
  """An RGB copy of `image`; transparency is composited over white.

  White, not black, and a transparency key (`info['transparency']`) counts
  as alpha: both as HF `image_transforms.convert_to_rgb`.

  Raises:
    ImageError: the mode is not in RGB_CONVERTIBLE_MODES or GREY16_MODES.
  """
  if image.mode in GREY16_MODES:
    grey_HW = np.asarray(image).astype(np.float32) / 257  # 65535 -> 255.
    image = Image.fromarray(np.round(grey_HW).astype(np.uint8))
  if image.mode not in RGB_CONVERTIBLE_MODES:
    raise ImageError(
        f'{name}: pixel mode {image.mode!r} has no meaningful RGB conversion; '
        f'save it as 8-bit RGB or greyscale (supported modes: '
        f'{", ".join(RGB_CONVERTIBLE_MODES + GREY16_MODES)}).'
    )
  if 'A' in image.getbands() or image.info.get('transparency') is not None:
    white = Image.new('RGBA', image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert('RGBA')).convert('RGB')
  return image.convert('RGB')


def best_fit_tiling(height: int, width: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
  """(tiles_high, tiles_wide) of the canvas an image is fitted into.

  Among all grids of at most `max_tiles` tiles, takes the one needing the
  least upscaling if any grid fits the image without downscaling, otherwise
  the least downscaling; ties go to the fewest tiles (least padding).
  """
  if min(height, width, tile_size, max_tiles) < 1:
    raise ValueError(
        f'Need positive sizes, got image {height}x{width}, '
        f'tile_size {tile_size}, max_tiles {max_tiles}.'
    )
  grids_G2 = np.array(
      [(h, n // h) for n in range(1, max_tiles + 1) for h in range(1, n + 1) if n % h == 0]
  )
  # float32, as HF's torch code: equal ties and rankings in the same places.
  canvas_G2 = (grids_G2 * tile_size).astype(np.float32)
  scales_G = np.minimum(canvas_G2[:, 0] / np.float32(height), canvas_G2[:, 1] / np.float32(width))
  fits = scales_G >= 1
  scale = scales_G[fits].min() if fits.any() else scales_G.max()
  candidates_G2 = grids_G2[scales_G == scale]
  h, w = candidates_G2[np.argmin(candidates_G2.prod(axis=1))]
  return int(h), int(w)


def tile_count(aspect_ratio: tuple[int, int]) -> int:
  """Tiles of an image fitted into an aspect_ratio grid: the grid's, and a multi-tile
  image's global tile."""
  grid = aspect_ratio[0] * aspect_ratio[1]
  return grid + 1 if grid > 1 else 1


def resize_target(
    height: int, width: int, aspect_ratio: tuple[int, int], tile_size: int
) -> tuple[int, int]:
  """(height, width) the image is resized to before padding to its canvas.

  Upscaling is capped: a side only grows to `tile_size`, so a small image is
  enlarged to fill one tile, never the whole canvas.
  """
  cap_h = min(max(height, tile_size), aspect_ratio[0] * tile_size)
  cap_w = min(max(width, tile_size), aspect_ratio[1] * tile_size)
  # HF `get_max_res_without_distortion`, in the same float64 arithmetic.
  scale_h, scale_w = cap_h / height, cap_w / width
  if scale_w < scale_h:
    new_h, new_w = min(math.floor(height * scale_w), cap_h), cap_w
  else:
    new_h, new_w = cap_h, min(math.floor(width * scale_h), cap_w)
  return max(new_h, 1), max(new_w, 1)


def preprocess(
    image: Image.Image,
    *,
    tile_size: int,
    max_tiles: int,
    mean: Sequence[float] = (0.5,) * 3,
    std: Sequence[float] = (0.5,) * 3,
) -> ProcessedImage:
  """Tiles and normalises one image (any mode `to_rgb` accepts)."""
  image = to_rgb(image) if image.mode != 'RGB' else image
  tiles_high, tiles_wide = best_fit_tiling(image.height, image.width, tile_size, max_tiles)
  new_h, new_w = resize_target(image.height, image.width, (tiles_high, tiles_wide), tile_size)
  canvas_HWC = np.zeros(
      (tiles_high * tile_size, tiles_wide * tile_size, 3), np.uint8
  )  # Padding is black: -1 once normalised.
  canvas_HWC[:new_h, :new_w] = _resize(image, new_h, new_w)
  tiles_HWC = _normalise(canvas_HWC, mean, std).reshape(
      tiles_high, tile_size, tiles_wide, tile_size, 3
  )
  tiles_NCHW = tiles_HWC.transpose(0, 2, 4, 1, 3).reshape(
      -1, 3, tile_size, tile_size
  )  # Row-major: tile row outer.
  if tiles_high * tiles_wide > 1:
    global_HWC = _normalise(_resize(image, tile_size, tile_size), mean, std)
    tiles_NCHW = np.concatenate([tiles_NCHW, global_HWC.transpose(2, 0, 1)[None]])
  return ProcessedImage(tiles_NCHW, (tiles_high, tiles_wide))


def _resize(image: Image.Image, height: int, width: int) -> np.ndarray:
  # PIL bilinear as META; HF5 resizes tensors with torchvision instead, so
  # its pixels can differ slightly (docs/llama4_architecture.md §11).
  return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))


def _normalise(pixels_HWC: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  # In float32 as META; HF5 normalises in bfloat16, which can differ by one
  # bf16 ulp. Model parity tests feed both models the same pixels, so this
  # does not matter there. Dividing by 255 keeps 0 and 255 at exactly -1, 1.
  scaled_HWC = pixels_HWC.astype(np.float32) / np.float32(255)
  return (scaled_HWC - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def image_token_layout(
    aspect_ratio: tuple[int, int], tokens_per_tile: int, ids: ImageTokenIds
) -> list[int]:
  """Token ids standing for one image in the prompt (doc section 6).

  The `<|patch|>` runs come in the order of the tiles in `pixels_NCHW`, so
  the model's in-order replacement pairs each run with its tile.
  """
  tiles_high, tiles_wide = aspect_ratio
  patches = [ids.patch] * tokens_per_tile
  layout = [ids.image_start]
  if tiles_high * tiles_wide > 1:
    for _ in range(tiles_high):
      for x in range(tiles_wide):
        layout += patches
        layout += [ids.tile_x_separator] if x < tiles_wide - 1 else []
      layout.append(ids.tile_y_separator)
  return layout + [ids.image] + patches + [ids.image_end]  # Global/only tile.


def expand_image_prompt(
    token_ids: Sequence[int], layouts: Sequence[Sequence[int]], image_id: int
) -> list[int]:
  """Replaces the i-th `<|image|>` placeholder with `layouts[i]`.

  Args:
    token_ids: a tokenized prompt; each image is one `<|image|>` id, which is
      what the text '<|image|>' (or the chat template) tokenizes to.
    layouts: `image_token_layout` of each image, in prompt order.
    image_id: the id of `<|image|>`.

  Raises:
    ValueError: the placeholder count differs from the number of images.
  """
  n_markers = sum(1 for token in token_ids if token == image_id)
  if n_markers != len(layouts):
    raise ValueError(f'Prompt has {placeholder_mismatch(n_markers, len(layouts))}.')
  remaining = iter(layouts)
  expanded = []
  for token in token_ids:
    expanded += next(remaining) if token == image_id else [token]
  return expanded


def placeholder_mismatch(n_markers: int, n_images: int) -> str:
  """'2 <|image|> placeholders but 1 image was given'."""
  return (
      f'{_plural(n_markers, "<|image|> placeholder")} but {_plural(n_images, "image")} '
      f'{"was" if n_images == 1 else "were"} given'
  )


def _plural(n: int, noun: str) -> str:
  return f'{n} {noun}' + ('' if n == 1 else 's')
