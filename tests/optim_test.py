"""Optimizer: schedule shape and the weight-decay mask."""

import jax
import ml_collections as mlc
import numpy as np
import pytest
from flax import nnx

from llama4_jax import model as model_lib
from llama4_jax import optim
from llama4_jax.model import vision


def optim_config(**kw):
  base = dict(
      lr=1.0,
      warmup_steps=10,
      min_lr_ratio=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      decay_norms=False,
      decay_embeddings=False,
      clip_norm=1.0,
  )
  return mlc.ConfigDict({**base, **kw})


def test_warmup_then_cosine_to_min_ratio():
  schedule = optim.learning_rate_schedule(optim_config(), total_steps=100)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(100)), 0.1, rtol=1e-5)
  assert float(schedule(50)) < float(schedule(20))


@pytest.mark.parametrize("freeze, clip_norm", [("", 1.0), ("", 0.0), ("vision", 1.0)])
def test_the_schedule_step_counts_applied_updates_only(freeze, clip_norm):
  cfg = model_lib.PRESETS["parity"].replace(vision=vision.VisionConfig() if freeze else None)
  params = nnx.state(model_lib.Llama4(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  tx = optim.make_optimizer(optim_config(clip_norm=clip_norm), 100, params, freeze)
  opt_state = tx.init(params)
  assert int(optim.schedule_step(opt_state)) == 0
  grads = jax.tree.map(np.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  assert int(optim.schedule_step(opt_state)) == 1


def test_weight_decay_skips_norms_and_embeddings_unless_asked():
  params = nnx.state(model_lib.abstract_model(model_lib.PRESETS["parity"]), nnx.Param)

  def decayed(**kw):
    mask = optim.weight_decay_mask(params, optim_config(**kw))
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    return {jax.tree_util.keystr(path) for path, value in flat if value}

  default = decayed()
  assert not any("scale" in p or "['embed']" in p for p in default)
  assert any("q_proj" in p for p in default) and any("['lm_head']" in p for p in default)
  assert any("scale" in p for p in decayed(decay_norms=True))
  assert any("['embed']" in p for p in decayed(decay_embeddings=True))


def test_weight_decay_never_reaches_biases_of_the_vision_tower():
  """nnx state paths end in `.value`: the bias test must look at the name before it."""
  cfg = model_lib.PRESETS["parity"].replace(vision=vision.VisionConfig())
  params = nnx.state(model_lib.abstract_model(cfg), nnx.Param)
  mask = optim.weight_decay_mask(params, optim_config(decay_norms=True))
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  biases = [p for p in flat if "['b']" in p or "['bias']" in p]
  assert len(biases) >= 8 and not any(flat[p] for p in biases)
  assert flat["['vision']['layers']['q']['w'].value"]
