"""The vision tower and early fusion against transformers' Llama4ForConditionalGeneration."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama4_jax import model as model_lib
from llama4_jax.model import vision
from llama4_jax.tools import hf_convert

import hf_reference

# Its module fixtures are expensive: one test worker runs the whole file (pyproject.toml).
pytestmark = pytest.mark.xdist_group(__name__)

PATCH = hf_reference.PATCH_ID
TILE = (3, 56, 56)


@pytest.fixture(scope='module')
def hf_model():
  return hf_reference.multimodal_model()


@pytest.fixture(scope='module')
def hf_dir(hf_model, tmp_path_factory):
  path = tmp_path_factory.mktemp('hf_mm')
  hf_model.save_pretrained(path)
  return path


@pytest.fixture(scope='module')
def ours(hf_dir):
  return hf_convert.load_hf_model(str(hf_dir))


def tokens_with_patches(runs, length=60, seed=0):
  """Random text ids with `<|patch|>` runs at (row, start, count)."""
  tokens = np.random.default_rng(seed).integers(8, 128, (max(r for r, _, _ in runs) + 1, length))
  for row, start, count in runs:
    tokens[row, start : start + count] = PATCH
  return tokens


@pytest.mark.reference
@pytest.mark.slow
def test_logits_equal_transformers_with_images(ours, hf_model):
  """§9: row 0 has two tiles (32 tokens), row 1 one tile and one padding tile."""
  tokens = tokens_with_patches([(0, 3, 32), (1, 10, 16)])
  tiles = np.random.default_rng(1).standard_normal((3,) + TILE).astype(np.float32)
  reference = hf_reference.multimodal_logits(hf_model, tokens, tiles)
  pixels = np.full((2, 2) + TILE, 7.0, np.float32)  # the padding tile's value must not matter
  pixels[0], pixels[1, 0] = tiles[:2], tiles[2]
  logits, _ = ours(jnp.asarray(tokens), pixels_BMCHW=jnp.asarray(pixels))
  np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-4, rtol=1e-4)
  assert np.abs(reference).max() > 3  # large enough to show a wrong path


@pytest.mark.reference
@pytest.mark.slow
def test_one_image_per_row_and_left_padding(ours, hf_model):
  tokens = tokens_with_patches([(0, 5, 16), (1, 20, 16)], length=40, seed=2)
  mask = np.ones_like(tokens)
  mask[1, :6] = 0
  tokens[1, :6] = 0
  tiles = np.random.default_rng(3).standard_normal((2,) + TILE).astype(np.float32)
  reference = hf_reference.multimodal_logits(hf_model, tokens, tiles, attention_mask=mask)
  logits, _ = ours(jnp.asarray(tokens), jnp.asarray(mask), pixels_BMCHW=jnp.asarray(tiles[:, None]))
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], reference[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.reference
@pytest.mark.slow
def test_sharded_multimodal_logits_equal_transformers(ours, hf_model, devices):
  """The vision tower split over data x fsdp x tensor = 2 x 2 x 2 devices."""
  from llama4_jax import sharding

  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  model = sharding.put_on_mesh(ours, mesh)
  assert len(model.vision.layers.fc1.w[...].sharding.device_set) == 8
  tokens = tokens_with_patches([(row, 4, 16) for row in range(8)], length=32, seed=8)
  tiles = np.random.default_rng(9).standard_normal((8,) + TILE).astype(np.float32)
  reference = hf_reference.multimodal_logits(hf_model, tokens, tiles)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens, pixels):
    return nnx.merge(graphdef, state)(tokens, pixels_BMCHW=pixels)[0]

  with sharding.mesh_context(mesh):
    batch = sharding.batch_sharding(mesh)
    logits = forward(state, jax.device_put(tokens, batch), jax.device_put(tiles[:, None], batch))
  np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.reference
@pytest.mark.slow
def test_cached_prefill_with_images_equals_full_forward(ours):
  tokens = tokens_with_patches([(0, 2, 16)], length=36, seed=4)
  pixels = jnp.asarray(np.random.default_rng(5).standard_normal((1, 1) + TILE), jnp.float32)
  full, _ = ours(jnp.asarray(tokens), pixels_BMCHW=pixels)
  decode = nnx.jit(lambda model, *args: model.decode(*args))
  prefill, cache = decode(ours, jnp.asarray(tokens[:, :30]), ours.init_cache(1, 40), None, pixels)
  steps = [prefill]
  for t in range(30, 36):
    step, cache = decode(ours, jnp.asarray(tokens[:, t : t + 1]), cache)
    steps.append(step)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(full), atol=1e-4, rtol=1e-4)


def test_pieces_follow_the_doc():
  """Pixel shuffle order (§5.5), the unfold order (§5.1) and vision RoPE angles (§5.4)."""
  W = 3
  x = np.arange(16 * W, dtype=np.float32).reshape(1, 16, W)  # 4 x 4 patches
  ps = np.asarray(vision.pixel_shuffle(jnp.asarray(x), 2))
  for i in range(2):
    for j in range(2):
      for dy in range(2):
        for dx in range(2):
          np.testing.assert_array_equal(
              ps[0, i * 2 + j, (2 * dy + dx) * W : (2 * dy + dx + 1) * W],
              x[0, (2 * i + dy) * 4 + 2 * j + dx],
          )
  pixels = np.arange(2 * 4 * 4, dtype=np.float32).reshape(1, 2, 4, 4)
  patches = np.asarray(vision.unfold_patches(jnp.asarray(pixels), 2))
  np.testing.assert_array_equal(patches[0, 1], pixels[0, :, 0:2, 2:4].reshape(-1))  # c, ky, kx
  cfg = vision.VisionConfig()
  angles = vision.rope_angles(cfg)
  assert angles.shape == (cfg.grid**2 + 1, 4)
  assert np.all(angles[-1] == 0)  # CLS, appended last, is not rotated
  patch = 1 * cfg.grid + 2  # row y = 1, column x = 2
  np.testing.assert_allclose(angles[patch], [3, 3 * 1e4**-0.5, 2, 2 * 1e4**-0.5], rtol=1e-6)


@pytest.mark.reference
@pytest.mark.slow
def test_multimodal_round_trip_is_bit_exact(ours, hf_dir, tmp_path):
  workdir, exported = tmp_path / 'work', tmp_path / 'hf'
  cfg = hf_convert.hf_to_workdir(str(hf_dir), str(workdir))
  assert cfg.vision == ours.cfg.vision
  hf_convert.workdir_to_hf(str(workdir), str(exported))
  original = hf_reference.read_safetensors(hf_dir)
  again = hf_reference.read_safetensors(exported)
  assert sorted(again) == sorted(original)
  assert any(n.startswith('vision_model.') for n in again)
  for name, array in original.items():
    np.testing.assert_array_equal(again[name], array, err_msg=name)
  config = json.loads((exported / 'config.json').read_text())
  assert config['model_type'] == 'llama4' and config['image_token_index'] == PATCH
  assert hf_convert.model_config_from_hf(config) == cfg


def test_images_for_a_text_model_and_bad_vision_configs_are_named():
  def run_text_model_with_images():
    model = model_lib.Llama4(model_lib.ModelConfig(), rngs=nnx.Rngs(0))
    return model(jnp.zeros((1, 8), jnp.int32), pixels_BMCHW=jnp.zeros((1, 1) + TILE))

  with pytest.raises(ValueError, match='text-only model'):
    nnx.eval_shape(run_text_model_with_images)  # abstractly: the check comes first
  with pytest.raises(ValueError, match='vision.intermediate_size'):
    vision.VisionConfig(intermediate_size=64)
  with pytest.raises(ValueError, match='vision.image_size'):
    vision.VisionConfig(image_size=50)
  with pytest.raises(ValueError, match='vision.image_token_id'):
    model_lib.ModelConfig(vision={'image_token_id': 500})


@pytest.mark.reference
@pytest.mark.slow
def test_greedy_generation_with_images_equals_transformers(ours, hf_model):
  """Two prompts of different lengths (one left-padded batch) against HF, one by one."""
  import torch

  from llama4_jax import sampling

  image = [6] + [PATCH] * 16 + [7]
  prompts = [[1, 20, 21] + image + [30, 31, 32], [1] + image + [40]]
  tiles = np.random.default_rng(6).standard_normal((2, 1) + TILE).astype(np.float32)
  ours_ids = sampling.generate(
      ours, prompts, max_new_tokens=10, eos_ids=(2,), pad_id=0, pixels_BMCHW=tiles
  )
  for prompt, pixels, got in zip(prompts, tiles, ours_ids):
    with torch.no_grad():
      out = hf_model.generate(
          torch.tensor([prompt]),
          pixel_values=torch.as_tensor(pixels),
          attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
          max_new_tokens=10,
          do_sample=False,
          eos_token_id=2,
          pad_token_id=0,
      )
    expected = out[0, len(prompt) :].tolist()
    if 2 in expected:
      expected = expected[: expected.index(2) + 1]
    assert got == expected


def test_vision_flops_match_the_compiled_tower():
  """flops.vision_forward_flops_per_tile (MFU of image-text runs) against XLA's count.

  One layer (XLA counts a scanned body once) and widths where matmuls dominate
  the elementwise work that XLA counts too; compiled abstractly.
  """
  from llama4_jax import flops

  tower = vision.VisionConfig(
      hidden_size=512,
      num_heads=8,
      num_layers=1,
      intermediate_size=2048,
      projector_input_dim=512,
      projector_output_dim=512,
      vision_output_dim=512,
  )
  cfg = model_lib.ModelConfig(vision=tower)
  graphdef, state = nnx.split(model_lib.abstract_model(cfg))
  forward = jax.jit(
      lambda state, x: (lambda m: m.projector(m.vision(x)))(nnx.merge(graphdef, state))
  )
  tiles = jax.ShapeDtypeStruct((4,) + TILE, jnp.float32)
  xla = forward.lower(state, tiles).compile().cost_analysis()['flops']
  ours = 4 * flops.vision_forward_flops_per_tile(cfg)
  assert abs(ours - xla) / xla < 0.05, (ours, xla)


def test_tokens_per_tile():
  assert model_lib.LLAMA4_VISION.tokens_per_tile == 144  # 336 px, 14 px patches, ratio 0.5
  assert (
      vision.VisionConfig(image_size=32, patch_size=8, pixel_shuffle_ratio=0.5).tokens_per_tile == 4
  )
