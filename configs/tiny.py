"""Tiny Llama 4 trained on the built-in corpus (the Python standard library) on CPU.

  python scripts/train.py --config=configs/tiny.py --workdir=/tmp/llama4_tiny

Four layers (3 RoPE + chunked, 1 NoPE + global; MoE with 4 experts on layers 1
and 3), vocabulary 4096. It is the README's main job and the tests' model.
"""

from llama4_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.model.dtype = 'float32'
  config.data.seq_len = 256
  config.train.steps = 400
  config.train.batch_size = 16
  config.train.checkpoint_every = 200
  config.train.eval_every = 200
  config.train.log_every = 20
  config.optim.lr = 3e-3
  config.optim.warmup_steps = 50
  return config


def sweep(add, arg=None):
  """Learning-rate sweep (the README's example); see llama4_jax/tools/sweep.py.

  python scripts/sweep.py --config=configs/tiny.py --workdir=/tmp/tiny_lr --parallel=1
  python scripts/sweep.py --summarize=/tmp/tiny_lr
  """
  del arg
  for lr in (1e-3, 3e-3, 1e-2):
    add(**{'optim.lr': lr})
