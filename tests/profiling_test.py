"""The step profiler attributes executed ops to the model's named scopes."""

import re

import jax
import jax.numpy as jnp

from llama4_jax.tools import profiling


def test_step_breakdown_groups_ops_by_named_scope():
  @jax.jit
  def step(x):
    with jax.named_scope('attention_core'):
      y = jax.nn.softmax(x @ x.T, axis=-1)
    with jax.named_scope('optimizer'):
      y = jnp.sqrt(jnp.abs(y) + 1.0)
    return jnp.tanh(y @ x)

  x = jnp.ones((256, 256))
  step(x).block_until_ready()
  breakdown, _ = profiling.step_breakdown(lambda: step(x), step.lower(x).compile().as_text())
  assert {
      'attention core (scores, mask, softmax, values)',
      'optimizer (AdamW update, clipping)',
  } <= set(breakdown)
  assert all(seconds >= 0 for seconds in breakdown.values())
  assert sum(breakdown.values()) > 0


def test_step_breakdown_counts_the_matmul_flops_each_part_ran():
  """Fused or not, in a loop's body once per iteration; none in ops without a dot."""

  @jax.jit
  def step(x, w, s):
    with jax.named_scope('attention_core'):
      y = jnp.tanh(x @ w)  # [128, 256] @ [256, 64]
    return jax.lax.fori_loop(0, 3, lambda i, y: jnp.tanh(y @ s) + i, y)  # [128, 64] @ [64, 64]

  x, w, s = jnp.ones((128, 256)), jnp.ones((256, 64)) / 256, jnp.ones((64, 64)) / 64
  step(x, w, s).block_until_ready()
  seconds, matmul_flops = profiling.step_breakdown(
      lambda: step(x, w, s), step.lower(x, w, s).compile().as_text()
  )
  assert set(matmul_flops) == set(seconds)
  assert matmul_flops['attention core (scores, mask, softmax, values)'] == 2 * 128 * 256 * 64
  assert matmul_flops[profiling.DENSE_MATMULS] == 3 * 2 * 128 * 64 * 64
  assert matmul_flops.get(profiling.OTHER, 0) == 0


def test_loops_are_not_counted_twice():
  """A loop's own event spans its body's ops, which are timed themselves."""

  @jax.jit
  def step(x, n):
    return jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y @ x), x)

  x = jnp.ones((64, 64))
  text = step.lower(x, 3).compile().as_text()
  loops = re.findall(r'%([\w.]+) = .* while\(%', text)
  assert loops
  paths = profiling._op_paths(text)
  assert not set(loops) & set(paths)
  assert [path for path in paths.values() if path.endswith('while/body/dot_general')]


def test_categorize_falls_back_to_the_op_kind():
  assert profiling.categorize('dot.3', 'jit(step)/dot_general') == profiling.DENSE_MATMULS
  assert profiling.categorize('fusion.1', 'jit(step)/moe_dispatch/gather') == (
      'MoE dispatch (sort, gather, scatter, padding)'
  )
  assert profiling.categorize('fusion.2', 'jit(step)/moe_dispatch/expert_matmuls/dot_general') == (
      'MoE expert matmuls'
  )
  assert profiling.categorize('add.1', '') == profiling.OTHER
