"""llama4_jax: Llama 4 in JAX/Flax NNX."""

import flax

# Parameters carry logical sharding metadata, but are placed by `jax.jit`
# out_shardings computed from it (see sharding.state_shardings), so that the
# same modules also build without a mesh (unit tests, conversion, eval_shape).
flax.config.update('flax_always_shard_variable', False)
