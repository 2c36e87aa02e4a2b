"""MoE dispatches against the dense reference, expert parallelism, router statistics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama4_jax import model as model_lib
from llama4_jax import sharding
from llama4_jax.model import moe

import numerics

# Float32 rounding bounds (numerics.py) for layer_inputs' sizes: an expert sums over D, then F,
# and adds K experts; the loss and the weight gradients also sum over the N tokens.
FORWARD_TERMS = 32 + 48 + 2
GRADIENT_TERMS = 96 + FORWARD_TERMS
assert_forward_close = functools.partial(numerics.assert_close, terms=FORWARD_TERMS)


def layer_inputs(E=8, K=2, N=96, D=32, F=48, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (N, D))
  logits = jax.random.normal(keys[1], (N, E)) * 3
  top, experts = jax.lax.top_k(logits, K)
  weights = jax.nn.sigmoid(top)
  w = lambda k, shape: jax.random.normal(k, shape) * 0.3
  return x, weights, experts, w(keys[2], (E, D, F)), w(keys[3], (E, D, F)), w(keys[4], (E, F, D))


def loss_and_grads(dispatch, args):
  def loss(x, weights, g, u, o):
    y, _ = dispatch(x, weights, args[2], g, u, o)
    return jnp.sum(jnp.sin(y))

  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(args[0], args[1], *args[3:])


DISPATCHES = {
    'blocked': functools.partial(moe.blocked_dropless_dispatch, block_size=8),
    'looped': moe.looped_dropless_dispatch,
    'ragged': moe.ragged_dropless_dispatch,
    'megablox': moe.megablox_dropless_dispatch,  # Pallas interpret mode on CPU
    'capacity_ample': functools.partial(moe.capacity_dispatch, capacity_factor=8.0),
    'gathered': moe.gathered_dispatch,
}


@pytest.mark.slow
@pytest.mark.parametrize('top_k', [1, 2])
@pytest.mark.parametrize('name', sorted(DISPATCHES))
def test_dispatch_matches_dense_forward_and_gradients(name, top_k):
  args = layer_inputs(K=top_k)
  want = loss_and_grads(moe.dense_dispatch, args)
  got = loss_and_grads(DISPATCHES[name], args)
  jax.tree.map(functools.partial(numerics.assert_close, terms=GRADIENT_TERMS), got, want)


@pytest.mark.slow
def test_capacity_drops_assignments_past_capacity_in_token_order():
  x, weights, experts, g, u, o = layer_inputs(E=4, K=1, N=64)
  factor = 0.5
  capacity = int(np.ceil(factor * 64 / 4))
  y, dropped = moe.capacity_dispatch(x, weights, experts, g, u, o, capacity_factor=factor)
  # Reference: zero the weight of every assignment beyond its expert's first `capacity`.
  e = np.asarray(experts[:, 0])
  rank = np.array([np.sum(e[:n] == e[n]) for n in range(64)])
  kept = rank < capacity
  want, _ = moe.dense_dispatch(x, weights * kept[:, None], experts, g, u, o)
  assert_forward_close(y, want)
  assert int(dropped) == int((~kept).sum()) > 0


@pytest.mark.slow
def test_blocked_dispatch_cost_is_bounded_by_blocks():
  """The compiled blocked dispatch does (A + E*b) rows of work, not E*A."""
  args = layer_inputs(E=64, K=1, N=1024, D=16, F=16)
  blocked = jax.jit(functools.partial(moe.blocked_dropless_dispatch, block_size=16))
  dense = jax.jit(moe.dense_dispatch)
  flops = lambda f: f.lower(*args).compile().cost_analysis()['flops']
  assert flops(blocked) < flops(dense) / 10


@pytest.mark.slow
@pytest.mark.parametrize('tokens,top_k', [(1, 1), (3, 2), (96, 1), (96, 2)])
def test_switched_dispatch_matches_dense(tokens, top_k):
  """The inference layout's dispatch: a row per assignment (A <= E) or padded blocks (A > E)."""
  x, weights, experts, g, u, o = layer_inputs(K=top_k, N=tokens)
  want, _ = moe.dense_dispatch(x, weights, experts, g, u, o)
  got, _ = jax.jit(functools.partial(moe.switched_dispatch, block_size=8))(
      x, weights, experts, list(zip(g, u, o))
  )
  assert_forward_close(got, want)


@pytest.mark.slow
def test_switched_dispatch_with_all_tokens_on_one_expert():
  """8 of the layout's A/b + E = 16 blocks hold assignments; the rest take the zero branch."""
  x, weights, experts, g, u, o = layer_inputs(E=8, K=1, N=64)
  experts = jnp.zeros_like(experts)  # every token to expert 0: 8 of the 16 blocks used
  fn = jax.jit(functools.partial(moe.switched_dispatch, block_size=8))
  want, _ = moe.dense_dispatch(x, weights, experts, g, u, o)
  assert_forward_close(fn(x, weights, experts, list(zip(g, u, o)))[0], want)
  _, _, expert_n, used = moe._block_layout(x, weights, experts, 8, 8)
  assert int(used) == 8 and expert_n.shape == (16,)


@pytest.fixture(scope='module')
def moe_cfg():
  return model_lib.PRESETS['parity'].replace(
      num_experts=8, num_experts_per_tok=2, hidden_size=32, intermediate_size=16
  )


def layer_and_input(cfg, batch=8, length=12):
  layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
  for w in (layer.wi_gate, layer.wi_up, layer.wo):
    w[...] = w[...] * 20  # large enough that a wrong route shows
  x = jax.random.normal(jax.random.key(1), (batch, length, cfg.hidden_size))
  return layer, x


def layer_loss_and_grads(layer, x, mesh=None):
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    y, stats = nnx.merge(graphdef, state)(x)
    return jnp.sum(jnp.sin(y)), stats['dropped_fraction']

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  if mesh is None:
    return fn(state, x)
  with sharding.mesh_context(mesh):
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    x = jax.device_put(x, sharding.batch_sharding(mesh, ndim=3))
    return fn(state, x)


@pytest.mark.slow
@pytest.mark.parametrize(
    'dispatch,mesh_shape,factor',
    [
        ('dropless', dict(expert=8), 1.25),
        ('dropless', dict(data=2, expert=2, tensor=2), 1.25),
        ('dropless/blocked', dict(fsdp=4, tensor=2), 1.25),  # Maverick's layout; GPUs' kernel
        ('dropless/megablox', dict(fsdp=2, expert=2, tensor=2), 1.25),  # TPU's kernel, interpreted
        ('dense', dict(fsdp=2, expert=4), 1.25),
        # Capacity is per expert group: with one group the drops are those of one device.
        ('capacity', dict(expert=4, tensor=2), 0.6),
        ('capacity', dict(data=2, fsdp=2, expert=2), 8.0),
    ],
    ids=str,
)
def test_expert_parallel_layer_matches_single_device(
    devices, moe_cfg, dispatch, mesh_shape, factor
):
  dispatch, _, grouped_matmul = dispatch.partition('/')
  cfg = moe_cfg.replace(
      moe_dispatch=dispatch,
      moe_capacity_factor=factor,
      moe_grouped_matmul=grouped_matmul or moe_cfg.moe_grouped_matmul,
  )
  layer, x = layer_and_input(cfg)
  (want_loss, want_dropped), want_grads = layer_loss_and_grads(layer, x)
  mesh = sharding.make_mesh(mesh_shape)
  (loss, dropped), grads = layer_loss_and_grads(layer, x, mesh)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(dropped, want_dropped, atol=1e-7)
  if factor < 1:
    assert float(dropped) > 0
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grads, want_grads
  )


@pytest.mark.slow
def test_load_balance_loss_is_one_when_balanced_and_split_invariant():
  E, K = 4, 1
  logits = jnp.zeros((2, 8, E))
  experts = jnp.tile(jnp.arange(E), 4).reshape(2, 8, K)
  stats = moe.router_statistics(logits, experts, jnp.ones((2, 8), bool))
  np.testing.assert_allclose(stats['load_balance_loss'], 1.0, rtol=1e-6)
  np.testing.assert_allclose(stats['tokens_per_expert'], [4, 4, 4, 4])
  # A mean over sequences: two halves of a batch average to the whole.
  logits = jax.random.normal(jax.random.key(0), (4, 8, E))
  experts = jax.lax.top_k(logits, 2)[1]
  valid = jnp.ones((4, 8), bool).at[1, :3].set(False)
  whole = moe.router_statistics(logits, experts, valid)['load_balance_loss']
  halves = [
      moe.router_statistics(logits[i : i + 2], experts[i : i + 2], valid[i : i + 2])[
          'load_balance_loss'
      ]
      for i in (0, 2)
  ]
  np.testing.assert_allclose(whole, np.mean(halves), rtol=1e-6)


def test_padding_does_not_count_in_statistics():
  logits = jax.random.normal(jax.random.key(0), (1, 6, 4))
  experts = jax.lax.top_k(logits, 1)[1]
  valid = jnp.array([[False, False, True, True, True, True]])
  stats = moe.router_statistics(logits, experts, valid)
  assert float(stats['tokens_per_expert'].sum()) == 4


@pytest.mark.parametrize('dispatch', ['capacity', 'dropless'])
def test_padding_takes_no_expert_capacity(moe_cfg, dispatch):
  """Row 1 is half padding, all one vector (padding shares one embedding): it must not fill
  an expert, so row 0's outputs and the drops are those of a batch whose padding differs."""
  cfg = moe_cfg.replace(moe_dispatch=dispatch, moe_capacity_factor=0.5)
  layer, x = layer_and_input(cfg, batch=2, length=16)
  valid = jnp.ones((2, 16), bool).at[1, :8].set(False)
  same_padding = x.at[1, :8].set(x[0, 0])
  other_padding = x.at[1, :8].set(jax.random.normal(jax.random.key(5), (8, cfg.hidden_size)))
  y_same, stats_same = layer(same_padding, valid)
  y_other, stats_other = layer(other_padding, valid)
  assert_forward_close(y_same[valid], y_other[valid])
  np.testing.assert_allclose(stats_same['dropped_fraction'], stats_other['dropped_fraction'])
  if dispatch == 'capacity':  # 24 real tokens x 2 assignments, 8 experts x 4 slots
    assert 0 < float(stats_same['dropped_fraction']) < 1


def test_ragged_dispatch_zeroes_rows_outside_every_group(monkeypatch):
  """ragged_dot's rows past the groups are unspecified: garbage there must not leak."""
  x, weights, experts, g, u, o = layer_inputs(E=4, K=2, N=16)
  experts = experts.at[:5].set(4)  # 5 tokens routed to no expert (padding, other devices)
  real_ragged_dot = jax.lax.ragged_dot
  monkeypatch.setattr(jax.lax, 'ragged_dot', lambda x, w, sizes: real_ragged_dot(x, w, sizes) + 7.0)
  got, _ = moe.ragged_dropless_dispatch(x, weights, experts, g, u, o)
  monkeypatch.undo()
  want, _ = moe.dense_dispatch(x, weights, experts, g, u, o)
  np.testing.assert_allclose(got[:5], want[:5], atol=1e-6)  # no expert at all: zero


def test_megablox_dispatch_with_tokens_routed_nowhere():
  """Assignments to no expert (padding, other devices' experts) sort past every group; the
  kernel's rows there are not defined and must not leak, nor take a gradient."""
  x, weights, experts, g, u, o = layer_inputs(E=4, K=2, N=20)
  args = (x, weights, experts.at[:5].set(4), g, u, o)
  want = loss_and_grads(moe.dense_dispatch, args)
  got = loss_and_grads(moe.megablox_dropless_dispatch, args)
  jax.tree.map(functools.partial(numerics.assert_close, terms=GRADIENT_TERMS), got, want)


@pytest.mark.slow
@pytest.mark.parametrize('dispatch', ['dropless', 'capacity'])
@pytest.mark.parametrize('length', [1, 12])
def test_split_experts_layer_matches_stacked(moe_cfg, dispatch, length):
  cfg = moe_cfg.replace(moe_dispatch=dispatch, moe_capacity_factor=0.6)
  layer, x = layer_and_input(cfg, batch=2, length=length)
  want, want_stats = layer(x)
  split = nnx.clone(layer)
  split.split_experts()
  assert split.experts_split == (dispatch != 'capacity')  # capacity keeps dropping what it drops
  got, stats = split(x)
  assert_forward_close(got, want)
  np.testing.assert_allclose(stats['dropped_fraction'], want_stats['dropped_fraction'])
