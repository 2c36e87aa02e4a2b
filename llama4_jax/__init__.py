"""llama4_jax: Llama 4 (text and vision) in JAX/Flax NNX.

model/ is the network, data/ what it reads, tools/ what works around a run; the run itself
(config, sharding, training, checkpoints, evaluation, sampling) is the flat modules here.
"""
