"""Llama 4 Maverick (17B active, 128 experts, 400B total) pre-training shape.

  python scripts/train.py --config=configs/maverick.py --workdir=$WORKDIR
  python scripts/train.py --config=configs/maverick.py:vision ...   # with the vision tower (maverick_mm)

Weights (experts included) sharded over `fsdp` (the rest) and `tensor` (4), MaxText's
layout: on a v5p-256, fsdp 32 x tensor 4 fits 4 sequences per chip (README,
docs/fit_check.md). bf16 compute, each layer rematerialised from its input in host
memory.
"""

from llama4_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, vision=False)
  config = config_lib.base_config()
  config.model = config_lib.model_preset('maverick_mm' if args.vision else 'maverick')
  config.mesh.tensor = 4
  config.mesh.fsdp = -1
  config.data.seq_len = 8192
  config.train.loss_chunk = 512  # [rows, 512, V] float32 logits at a time, not [rows, 8192, V]
  config.model.remat = 'offload_layer_inputs'  # each layer's input waits in host memory
  config.train.steps = 100_000
  config.train.batch_size = 512  # 4 sequences per chip on a v5p-256
  config.train.checkpoint_every = 1000
  config.train.eval_every = 1000
  config.optim.lr = 2e-4
  config.optim.warmup_steps = 2000
  return config
