"""The text model against transformers, on one device and on the 8-device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama4_jax import model as model_lib
from llama4_jax import sharding
from llama4_jax.model import attention, layers
from llama4_jax.tools import hf_convert

import hf_reference

ATOL = 1e-4


def converted(tmp_path, hf_model, shard_size='100KB'):
  """Saves the HF model in several safetensors shards and converts it back in memory."""
  hf_model.save_pretrained(tmp_path / 'hf', max_shard_size=shard_size)
  assert len(list((tmp_path / 'hf').glob('*.safetensors'))) > 1
  return hf_convert.load_hf_model(str(tmp_path / 'hf'))


def inputs(batch=2, length=60, pad=5, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 128, (batch, length))
  mask = np.ones((batch, length), np.int32)
  mask[1, :pad] = 0
  tokens[1, :pad] = 0
  return tokens, mask


def assert_matches_hf(ours, ref, mask):
  valid = mask.astype(bool)
  assert np.abs(ref).max() > 3, 'reference logits too small to catch bugs'
  np.testing.assert_allclose(ours[valid], ref[valid], atol=ATOL, rtol=ATOL)


# 64 tokens are 8 whole chunks: the chunked layers take the banded path (and the global
# layers the triangular one, as 40 and 64 tokens do everywhere below).
@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize('top_k, length', [(1, 60), (2, 64)])
def test_logits_match_transformers(tmp_path, top_k, length):
  hf = hf_reference.text_model(num_experts_per_tok=top_k)
  model = converted(tmp_path, hf)
  tokens, mask = inputs(length=length)
  ref = hf_reference.text_logits(hf, tokens, mask)
  ours, _ = model(jnp.asarray(tokens), jnp.asarray(mask))
  assert_matches_hf(np.asarray(ours), ref, mask)


@pytest.mark.reference
def test_no_padding_matches_default_positions(tmp_path):
  hf = hf_reference.text_model()
  model = converted(tmp_path, hf)
  tokens, _ = inputs(pad=0)
  ours, _ = model(jnp.asarray(tokens))
  assert_matches_hf(np.asarray(ours), hf_reference.text_logits(hf, tokens), np.ones_like(tokens))


@pytest.mark.reference
@pytest.mark.slow
def test_irregular_layer_pattern_matches_transformers(tmp_path):
  """MoE and RoPE lists that are not periodic: stages of scanned and single layers."""
  overrides = dict(
      num_hidden_layers=7, moe_layers=[0, 2, 3, 5], no_rope_layers=[1, 0, 1, 0, 1, 0, 1]
  )
  hf = hf_reference.text_model(**overrides)
  model = converted(tmp_path, hf)
  stages = model.cfg.stages()
  assert (
      any(stage.repeats > 1 for stage in stages)
      and sum(len(s.kinds) * s.repeats for s in stages) == 7
  )
  tokens, mask = inputs()
  ours, _ = model(jnp.asarray(tokens), jnp.asarray(mask))
  assert_matches_hf(np.asarray(ours), hf_reference.text_logits(hf, tokens, mask), mask)


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize(
    'mesh_shape',
    [
        dict(data=2, fsdp=2, tensor=2),
        dict(fsdp=2, expert=2, tensor=2),
    ],
)
def test_sharded_logits_match_transformers(tmp_path, devices, mesh_shape):
  hf = hf_reference.text_model(num_experts_per_tok=2)
  mesh = sharding.make_mesh(mesh_shape)
  model = sharding.put_on_mesh(converted(tmp_path, hf), mesh)
  kernel = model.stages[0].layers[0].ffn.wi_gate
  assert len(kernel[...].sharding.device_set) == 8
  tokens, mask = inputs(batch=8)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens, mask):
    logits, _ = nnx.merge(graphdef, state)(tokens, mask)
    return logits

  with sharding.mesh_context(mesh):
    batch = sharding.batch_sharding(mesh)
    ours = forward(state, jax.device_put(tokens, batch), jax.device_put(mask, batch))
  assert_matches_hf(np.asarray(ours), hf_reference.text_logits(hf, tokens, mask), mask)


@pytest.mark.parametrize('blocks_per_chunk', [1, attention.BAND_BLOCKS_PER_CHUNK, 4, 3])
def test_banded_attention_equals_masked_attention_with_packing(blocks_per_chunk):
  """Values and gradients of the chunked layers' path without a cache, packed and padded,
  with 1, 2 and 4 query blocks per chunk (3 does not divide the chunk: whole-chunk blocks)."""
  B, T, N, K, H, C = 2, 64, 4, 2, 8, 16
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32) for _ in range(2))
  segments = np.ones((B, T), np.int32)
  segments[0, :5] = 0  # left padding
  segments[1, 20:], segments[1, 41:], segments[1, 60:] = 2, 3, 0  # packed, chunks not block-aligned
  mask = attention.make_attention_inputs(jnp.asarray(segments), 0, T, C).chunked_mask_BTS
  valid = segments != 0  # padding queries attend to nothing; their output is unused
  weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32) * valid[:, :, None, None]
  full = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, mask))
  banded = jax.jit(lambda q, k, v: attention.banded_attention(q, k, v, mask, C, blocks_per_chunk))
  np.testing.assert_allclose(
      np.asarray(banded(q, k, v))[valid], np.asarray(full(q, k, v))[valid], atol=1e-6
  )
  loss = lambda attend, q, k, v: jnp.sum(attend(q, k, v) * weights)
  gradients = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)
  for got, want in zip(gradients(banded, q, k, v), gradients(full, q, k, v)):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_triangular_attention_equals_masked_attention_with_packing():
  """Values and gradients of the global layers' path without a cache, packed and padded."""
  B, T, N, K, H = 2, 64, 4, 2, 8
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32) for _ in range(2))
  segments = np.ones((B, T), np.int32)
  segments[0, :5] = 0  # left padding
  segments[1, 20:], segments[1, 41:], segments[1, 60:] = 2, 3, 0  # packed, then right padding
  mask = attention.make_attention_inputs(jnp.asarray(segments), 0, T, None).causal_mask_BTS
  valid = segments != 0  # padding queries attend to nothing; their output is unused
  weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32) * valid[:, :, None, None]
  full = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, mask))
  triangular = jax.jit(lambda q, k, v: attention.triangular_attention(q, k, v, mask))
  np.testing.assert_allclose(
      np.asarray(triangular(q, k, v))[valid], np.asarray(full(q, k, v))[valid], atol=1e-6
  )
  loss = lambda attend, q, k, v: jnp.sum(attend(q, k, v) * weights)
  gradients = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)
  grads_full, grads_triangular = gradients(full, q, k, v), gradients(triangular, q, k, v)
  for got, want in zip(grads_triangular, grads_full):
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize('kernel', ['blocked', 'flash'])
@pytest.mark.parametrize('chunked', [False, True])
@pytest.mark.parametrize('offset', [0, 7])  # queries after 7 cached keys (prefill into a cache)
def test_blocked_attention_equals_dot_product_attention(kernel, chunked, offset):
  """Values and gradients, with left padding, packed documents, chunks, and a block
  size (16) that divides neither the 50 queries nor the chunk size (12)."""
  B, T, N, K, H, C = 2, 50, 4, 2, 8, 12
  S = offset + T
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32) for _ in range(2))
  segments = np.ones((B, S), np.int32)
  segments[0, :5] = 0  # left padding
  segments[1, 20:], segments[1, 41:] = 2, 3  # packed documents
  inputs_ = attention.make_attention_inputs(jnp.asarray(segments), offset, T, C)
  mask = inputs_.chunked_mask_BTS if chunked else inputs_.causal_mask_BTS
  valid = np.asarray(inputs_.valid_BT)  # padding queries attend to nothing; unused outputs
  weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32) * valid[:, :, None, None]

  def loss(attend, q, k, v):
    return jnp.sum(attend(q, k, v) * weights)

  dense = lambda q, k, v: attention.dot_product_attention(q, k, v, mask)
  if kernel == 'blocked':
    blocked = lambda q, k, v: attention.blocked_attention(q, k, v, inputs_.mask_parts(chunked), 16)
  else:  # key blocks of 8: some blocks of the chunked mask are empty and skipped
    blocked = lambda q, k, v: attention.flash_attention(q, k, v, inputs_, chunked, 16, 8)
  np.testing.assert_allclose(
      np.asarray(blocked(q, k, v))[valid], np.asarray(dense(q, k, v))[valid], atol=1e-6
  )
  grads_dense = jax.grad(loss, argnums=(1, 2, 3))(dense, q, k, v)
  grads_blocked = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)(blocked, q, k, v)
  for got, want in zip(grads_blocked, grads_dense):
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.reference
@pytest.mark.parametrize('key_block', [0, 8])  # 0: blocked, 8: flash
@pytest.mark.parametrize('length', [60, 64])
def test_blocked_attention_matches_transformers(tmp_path, monkeypatch, key_block, length):
  """The whole model with attention_query_block: chunked and global layers take the blocked (or
  flash) path, also at 64 tokens, whole chunks, where the band would hold every query's scores."""
  monkeypatch.setattr(attention, 'banded_attention', None)  # not called with query blocks
  hf = hf_reference.text_model()
  converted_model = converted(tmp_path, hf)
  cfg = converted_model.cfg.replace(attention_query_block=16, attention_key_block=key_block)
  model = model_lib.Llama4(cfg, rngs=nnx.Rngs(0))
  nnx.update(model, nnx.state(converted_model))
  tokens, mask = inputs(length=length)
  ours, _ = model(jnp.asarray(tokens), jnp.asarray(mask))
  assert_matches_hf(np.asarray(ours), hf_reference.text_logits(hf, tokens, mask), mask)


def test_a_packed_document_gets_the_same_logits_wherever_it_is_packed():
  """RoPE positions, chunks and the NoPE layers' temperature all restart at the document:
  the same 20 tokens alone in a row or packed after 13 others give the same logits."""
  cfg = model_lib.PRESETS['parity']
  assert cfg.attn_temperature_tuning and cfg.floor_scale == 2  # the temperature grows fast
  model = model_lib.Llama4(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  document, other = rng.integers(3, 128, 20), rng.integers(3, 128, 13)
  tokens = np.zeros((2, 40), np.int32)
  segments = np.zeros((2, 40), np.int32)
  tokens[0, :20], segments[0, :20] = document, 1
  tokens[1, :13], segments[1, :13] = other, 1
  tokens[1, 13:33], segments[1, 13:33] = document, 2
  logits, _ = model(jnp.asarray(tokens), jnp.asarray(segments))
  alone, packed = np.asarray(logits[0, :20]), np.asarray(logits[1, 13:33])
  np.testing.assert_allclose(packed, alone, atol=1e-5 * np.abs(alone).max())


@pytest.mark.parametrize('remat', ['full', 'layer', 'offload_layer_inputs'])
def test_remat_policies_keep_loss_and_gradients(remat):
  """Each policy recomputes (or offloads) differently; the numbers stay those of no remat."""
  cfg = model_lib.PRESETS['parity'].replace(attention_query_block=16, attention_key_block=8)
  tokens, mask = inputs(length=40)

  def loss_and_grads(cfg):
    model = model_lib.Llama4(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def loss(state):
      logits, _ = nnx.merge(graphdef, state)(jnp.asarray(tokens), jnp.asarray(mask))
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    if cfg.remat == 'offload_layer_inputs':  # the layer inputs [B, T, D] go to host memory
      assert 'f32<host>[2,40,64]' in str(jax.make_jaxpr(jax.grad(loss))(state))
    return jax.jit(jax.value_and_grad(loss))(state)

  want_loss, want_grads = loss_and_grads(cfg)
  got_loss, got_grads = loss_and_grads(cfg.replace(remat=remat))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, atol=1e-6 * float(np.abs(want).max()) + 1e-9)


@pytest.mark.parametrize(
    'x_shape, w_shape, contracted',
    [
        ((2, 5, 8), (8, 3, 4), 1),  # q_proj: BTD,DNH->BTNH
        ((2, 5, 3, 4), (3, 4, 8), 2),  # o_proj: BTNH,NHD->BTD
    ],
)
def test_project_and_its_gradients_equal_tensordot(x_shape, w_shape, contracted):
  rng = np.random.default_rng(0)
  x, w, dy = (
      jnp.asarray(rng.standard_normal(s), jnp.float32)
      for s in (x_shape, w_shape, x_shape[: len(x_shape) - contracted] + w_shape[contracted:])
  )
  reference = lambda x, w: jnp.sum(jnp.tensordot(x, w, contracted) * dy)
  ours = lambda x, w: jnp.sum(layers.project(x, w, contracted) * dy)
  for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(reference, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(ours(x, w), reference(x, w), rtol=1e-6)


def test_layer_stages_cover_every_layer():
  R, N = model_lib.LayerKind(True, True), model_lib.LayerKind(False, True)
  d = model_lib.LayerKind(True, False)
  assert model_lib.layer_stages((R, R, R, N) * 12) == (model_lib.Stage((R, R, R, N), 12),)
  stages = model_lib.layer_stages((d, R, N, R, N, R, N, d))
  assert [len(s.kinds) * s.repeats for s in stages] == [1, 6, 1]
  assert model_lib.layer_stages((R, N, d)) == (model_lib.Stage((R, N, d), 1),)


@pytest.mark.parametrize(
    'name,total',
    [
        ('scout', 107_769_861_120),
        ('maverick', 400_711_848_960),
        ('scout_mm', 108_641_793_536),
        ('maverick_mm', 401_583_781_376),
    ],
)  # doc §3
def test_preset_parameter_counts(name, total):
  cfg = model_lib.PRESETS[name]
  abstract = model_lib.abstract_model(cfg)
  assert model_lib.count_params(nnx.state(abstract, nnx.Param)) == total
  assert cfg.stages() == (model_lib.Stage(cfg.layer_kinds()[:4], 12),)


def test_every_parameter_has_known_logical_axes():
  state = nnx.state(model_lib.abstract_model(model_lib.PRESETS['maverick_mm']), nnx.Param)
  table = dict(sharding.LOGICAL_RULES)
  for path, var in nnx.to_flat_state(state):
    names = var.out_sharding
    assert names is not None and len(names) == var.shape.__len__(), path
    assert all(n is None or n in table for n in names), (path, names)
    if path[0] == 'stages' or path[:2] == ('vision', 'layers'):
      assert names[0] == 'layers', path


def test_bad_model_config_names_the_field():
  with pytest.raises(ValueError, match='num_kv_heads'):
    model_lib.ModelConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match='no_rope_layers'):
    model_lib.ModelConfig(num_layers=3)
  with pytest.raises(ValueError, match='moe_layers'):
    model_lib.ModelConfig(moe_layers=(7,))


@pytest.mark.parametrize(
    'config, key',
    [
        (dict(rope_factor=0.0), 'rope_factor'),  # NaN logits
        (dict(rope_factor=-1.0), 'rope_factor'),
        (dict(rope_low_freq_factor=0.0), 'rope_low_freq_factor'),  # ZeroDivisionError
        (dict(rope_high_freq_factor=0.0), 'rope_high_freq_factor'),
        (dict(rope_high_freq_factor=float('nan')), 'rope_high_freq_factor'),
        (dict(rope_theta=0.0), 'rope_theta'),
        (dict(vision={'pixel_shuffle_ratio': 0.0}), 'vision.pixel_shuffle_ratio'),
        (dict(vision={'pixel_shuffle_ratio': float('nan')}), 'vision.pixel_shuffle_ratio'),
    ],
)
def test_bad_rope_and_pixel_shuffle_configs_name_the_field(config, key):
  with pytest.raises(ValueError, match=rf'^config\.model\.{key}: must be'):
    model_lib.ModelConfig(**config)


def test_llama3_factors_are_only_checked_for_llama3_and_any_order_is_finite():
  model_lib.ModelConfig(rope_type='default', rope_factor=0.0, rope_low_freq_factor=0.0)
  # high < low empties the interpolated band (transformers computes the same); no NaN.
  cfg = model_lib.ModelConfig(rope_low_freq_factor=4.0, rope_high_freq_factor=1.0)
  assert np.isfinite(cfg.rope_inverse_frequencies()).all()


def test_vision_layer_norms_ignore_norm_eps_like_transformers():
  """HF's vision LayerNorms are nn.LayerNorm(width): torch's eps 1e-5, whatever norm_eps is."""
  from llama4_jax.model import vision

  def encode(norm_eps):
    cfg = vision.VisionConfig(norm_eps=norm_eps)
    kw = dict(std=0.02, dtype=jnp.float32, param_dtype=jnp.float32)
    tower = vision.VisionEncoder(cfg, rngs=nnx.Rngs(0), **kw)
    pixels = np.random.default_rng(0).standard_normal((2, 3, cfg.image_size, cfg.image_size))
    return np.asarray(tower(jnp.asarray(pixels, jnp.float32)))

  np.testing.assert_array_equal(encode(0.5), encode(1e-5))
