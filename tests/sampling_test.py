"""KV-cache decoding: equal to the full forward pass, and greedy ids equal to transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from llama4_jax import model as model_lib
from llama4_jax import sampling
from llama4_jax.model import attention, moe
from llama4_jax.tools import hf_convert

import hf_reference
import small_run


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  path = tmp_path_factory.mktemp('hf')
  hf = hf_reference.text_model(num_experts_per_tok=2)
  hf.save_pretrained(path, max_shard_size='100KB')
  return hf, hf_convert.load_hf_model(str(path))


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize('layout, query_block', [('stacked', 0), ('decode', 0), ('decode', 8)])
def test_cached_decoding_equals_full_forward_at_every_step(
    converted, monkeypatch, layout, query_block
):
  """Prefill 20 tokens, then 20 single-token steps: crosses chunk boundaries at 24 and 32.

  'decode' is the layout sampling.generate decodes with (per-layer, per-expert weights). With
  query blocks of 8 the prefill's 20 queries take blocks of 8 (and 4 of padding) on both kinds
  of layer: the global ones over the cache, the chunked ones over the ring.
  """
  _, model = converted
  if query_block:
    blocked = model_lib.Llama4(
        model.cfg.replace(attention_query_block=query_block), rngs=nnx.Rngs(0)
    )
    nnx.update(blocked, nnx.state(model))
    model = blocked
  ring_blocks = []  # the chunked layers' prefills that took query blocks
  take_blocks = attention.blocked_attention

  def count_ring_blocks(q, k, v, parts, block):
    ring_blocks.append(parts.key_index_S is not None)  # a ring's keys are not 0, 1, ...
    return take_blocks(q, k, v, parts, block)

  monkeypatch.setattr(attention, 'blocked_attention', count_ring_blocks)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 128, (2, 40)).astype(np.int32)
  segments = np.ones_like(tokens)
  segments[1, :5] = 0  # left padding in row 1
  full, _ = model(jnp.asarray(tokens), jnp.asarray(segments))
  if layout == 'decode':
    model = model_lib.decode_layout(model)
    moe_layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, moe.MoE)]
    assert moe_layers and all(m.experts_split for m in moe_layers)
  cache = model.init_cache(2, 40)
  logits, cache = model.decode(jnp.asarray(tokens[:, :20]), cache, jnp.asarray(segments[:, :20]))
  steps = [logits]
  decode = jax.jit(lambda t, c: model.decode(t, c))
  for t in range(20, 40):
    logits, cache = decode(jnp.asarray(tokens[:, t : t + 1]), cache)
    steps.append(logits)
  cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
  valid = segments.astype(bool)
  np.testing.assert_allclose(cached[valid], np.asarray(full)[valid], atol=1e-4, rtol=1e-4)
  assert any(ring_blocks) == bool(query_block)


@pytest.mark.reference
@pytest.mark.slow
def test_greedy_ids_equal_transformers_generate(converted):
  hf, model = converted
  prompts = [[1, 17, 33, 45, 9, 100, 7], [1, 64, 3]]
  ours = sampling.generate(model, prompts, max_new_tokens=30, eos_ids=[2], pad_id=0)
  tokens, segments = sampling.left_pad(prompts, pad_id=0)
  with torch.no_grad():
    out = hf.generate(
        torch.as_tensor(tokens, dtype=torch.long),
        attention_mask=torch.as_tensor(segments, dtype=torch.long),
        max_new_tokens=30,
        do_sample=False,
        eos_token_id=2,
        pad_token_id=0,
    )
  for row, ids in enumerate(out[:, tokens.shape[1] :].tolist()):
    cut = next((i + 1 for i, t in enumerate(ids) if t == 2), len(ids))
    assert ours[row] == ids[:cut], row
  assert max(len(r) for r in ours) > 10


@pytest.mark.reference
@pytest.mark.slow
def test_sampling_is_seeded_and_respects_top_k(converted):
  _, model = converted
  prompts = [[1, 5, 6, 7]] * 3
  a = sampling.generate(
      model, prompts, max_new_tokens=12, eos_ids=[], temperature=1.0, top_k=3, seed=1
  )
  b = sampling.generate(
      model, prompts, max_new_tokens=12, eos_ids=[], temperature=1.0, top_k=3, seed=1
  )
  assert a == b and len(set(map(tuple, a))) > 1  # same seed, same ids; rows differ

  def draws(logits, top_k, top_p):  # 50 draws, one compiled call (eager ones take 16 s)
    keys = jax.random.split(jax.random.key(0), 50)
    draw = lambda key: sampling.sample_logits(
        jnp.array([logits]), key, jnp.float32(1.0), top_k, jnp.float32(top_p)
    )[0]
    return set(jax.jit(jax.vmap(draw))(keys).tolist())

  assert draws([0.0, 1.0, 2.0, 3.0], top_k=2, top_p=1.0) == {2, 3}
  assert draws([0.0, 0.0, 10.0, 10.0], top_k=0, top_p=0.5) <= {2, 3}


@pytest.mark.reference
@pytest.mark.slow
def test_stops_at_eos_per_row_and_generates_at_least_one_token(converted):
  _, model = converted
  greedy = sampling.generate(model, [[1, 17, 33]], max_new_tokens=8, eos_ids=[])[0]
  stop = greedy[2]
  out = sampling.generate(model, [[1, 17, 33]], max_new_tokens=8, eos_ids=[stop])[0]
  assert out == greedy[: greedy.index(stop) + 1]
  assert sampling.generate(model, [[1, 17, 33]], max_new_tokens=1, eos_ids=[]) == [greedy[:1]]
  with pytest.raises(ValueError, match='max_new_tokens must be at least 1, got 0'):
    sampling.generate(model, [[1, 17, 33]], max_new_tokens=0, eos_ids=[])


@pytest.mark.reference
@pytest.mark.slow
def test_generate_script_writes_ids(tmp_path, converted):
  hf, model = converted
  hf.save_pretrained(tmp_path / 'hf')
  converted_run = small_run.run_script(
      'convert_checkpoint.py', f'--hf_dir={tmp_path}/hf', f'--workdir={tmp_path}/ours'
  )
  assert converted_run.returncode == 0, converted_run.stderr[-2000:]
  result = small_run.run_script(
      'generate.py',
      f'--workdir={tmp_path}/ours',
      '--prompt_ids=1,17,33,45',
      '--prompt_ids=1,64',
      '--max_new_tokens=10',
      f'--output={tmp_path}/ids.json',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  ids = json.loads((tmp_path / 'ids.json').read_text())['ids']
  assert ids == sampling.generate(
      model, [[1, 17, 33, 45], [1, 64]], max_new_tokens=10, eos_ids=model.cfg.eos_token_ids
  )
  too_long = small_run.run_script(
      'generate.py', f'--workdir={tmp_path}/ours', '--prompt_ids=1,2', '--max_new_tokens=5000'
  )
  assert too_long.returncode == 1 and 'max_position_embeddings' in too_long.stderr
  no_tokenizer = small_run.run_script('generate.py', f'--workdir={tmp_path}/ours', '--prompt=hello')
  assert no_tokenizer.returncode == 1 and 'tokenizer' in no_tokenizer.stderr


@pytest.mark.reference
def test_chunked_layers_keep_only_a_chunk_of_keys(converted):
  _, model = converted
  cache = model.init_cache(2, 100)
  lengths = [layer['k'].shape[2] for stage in cache['layers'] for layer in stage]
  kinds = [kind for stage in model.cfg.stages() for kind in stage.kinds]
  assert lengths == [8 if kind.use_rope else 100 for kind in kinds]  # attention_chunk_size 8


def test_nucleus_keeps_at_least_the_most_likely_token():
  """top_p <= 0 keeps the top token (HF's min_tokens_to_keep=1); it used to keep every one."""
  logits = jnp.log(jnp.array([[0.15, 0.5, 0.3, 0.05]]))
  for top_p, kept in [(0.0, [0, 1, 0, 0]), (-1.0, [0, 1, 0, 0]), (0.5, [0, 1, 0, 0])]:
    assert np.isfinite(sampling._nucleus(logits, jnp.float32(top_p))).astype(int).tolist() == [
        kept
    ], top_p
  assert np.isfinite(sampling._nucleus(logits, jnp.float32(0.51))).sum() == 2


@pytest.fixture(scope='module')
def multimodal():
  from llama4_jax.model import vision

  return model_lib.Llama4(model_lib.ModelConfig(vision=vision.VisionConfig()), rngs=nnx.Rngs(0))


@pytest.mark.parametrize('top_p', [0.0, -0.5, 1.5, float('nan')])
def test_generate_refuses_top_p_outside_0_1(multimodal, top_p):
  with pytest.raises(ValueError, match=r'top_p must be in \(0, 1\]'):
    sampling.generate(multimodal, [[1, 9]], max_new_tokens=1, eos_ids=[2], top_p=top_p)


def test_generate_refuses_placeholders_that_are_not_the_tiles_image_tokens(multimodal):
  """Checked on the host, before anything compiles: the model cannot under jit."""
  vcfg = multimodal.cfg.vision
  patch, per_tile = vcfg.image_token_id, vcfg.tokens_per_tile  # 16 per tile
  tile = np.random.default_rng(0).standard_normal((3, vcfg.image_size, vcfg.image_size))
  pixels = np.zeros((2, 2) + tile.shape, np.float32)
  pixels[0, :2] = pixels[1, 0] = tile  # row 0: two tiles, row 1: one and a zero padding tile
  good = [[1] + [patch] * 2 * per_tile + [9], [1] + [patch] * per_tile + [9]]

  def generate(prompts):
    return sampling.generate(
        multimodal, prompts, max_new_tokens=1, eos_ids=[2], pixels_BMCHW=pixels
    )

  # 23 placeholders for one 16-token tile: the surplus would repeat the last image token.
  surplus = [good[0], [1] + [patch] * (per_tile + 7) + [9]]
  with pytest.raises(
      ValueError, match='prompt 1 has 23 <.patch.> placeholders .* 1 image tiles need 16'
  ):
    generate(surplus)
  # A tile with no placeholders would be dropped.
  missing = [[1] + [patch] * per_tile + [9], good[1]]
  with pytest.raises(ValueError, match='prompt 0 has 16 .* 2 image tiles need 32'):
    generate(missing)
  with pytest.raises(ValueError, match='3 prompts'):
    generate(good + [[1, 9]])
  assert [len(ids) for ids in generate(good)] == [1, 1]
  # Without images, no placeholder either.
  with pytest.raises(ValueError, match='prompt 0 has 16 .* 0 image tiles need 0'):
    sampling.generate(multimodal, good[1:], max_new_tokens=1, eos_ids=[2])


def test_cached_prefill_builds_the_ring_mask_a_query_block_at_a_time():
  """A long prompt's prefill holds no [B, T, W + T] mask for the chunked layers' ring (it
  grew with the prompt's square: 17 GB per row at Scout's 128k tokens), only one query
  block's: its scratch memory is the full forward pass's, give or take far less than that."""
  T = 4096
  cfg = model_lib.PRESETS['parity'].replace(
      attention_chunk_size=64, attention_query_block=256, max_position_embeddings=T
  )
  graphdef, state = nnx.split(model_lib.abstract_model(cfg))
  tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)

  def prefill(state, tokens):
    model = nnx.merge(graphdef, state)
    return model.decode(tokens, model.init_cache(1, T), last_logits_only=True)[0]

  def forward(state, tokens):
    return nnx.merge(graphdef, state).hidden_states(tokens)[0]

  def scratch(f):
    return jax.jit(f).lower(state, tokens).compile().memory_analysis().temp_size_in_bytes

  ring_mask_bytes = T * (64 + T)
  assert scratch(prefill) < scratch(forward) + ring_mask_bytes / 4
