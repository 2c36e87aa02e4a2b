"""Llama 4 Scout (17B active, 16 experts, 109B total) pre-training shape.

  python scripts/train.py --config=configs/scout.py --workdir=$WORKDIR
  python scripts/train.py --config=configs/scout.py:vision ...   # with the vision tower (scout_mm)

Sized for a TPU v5p-256 / 256 H100-class GPUs: FSDP over all devices, bf16 compute,
each layer rematerialised from its input kept in host memory, attention in blocks of 512
queries. The batch, 1024 sequences, is MaxText's 8 per chip on a v5p-256 (it fits: README,
docs/fit_check.md); 256 H100s fit 3 per GPU (--config.train.batch_size=768). Fine-tune a
converted checkpoint with --config.train.init_from=$CONVERTED_WORKDIR.
"""

from llama4_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, vision=False)
  config = config_lib.base_config()
  config.model = config_lib.model_preset('scout_mm' if args.vision else 'scout')
  config.mesh.fsdp = -1
  config.data.seq_len = 8192
  config.train.loss_chunk = 512  # [rows, 512, V] float32 logits at a time, not [rows, 8192, V]
  config.model.remat = 'offload_layer_inputs'  # each layer's input waits in host memory
  config.train.steps = 100_000
  config.train.batch_size = 1024  # 8 sequences per chip on a v5p-256, MaxText's layout
  config.train.checkpoint_every = 1000
  config.train.eval_every = 1000
  config.optim.lr = 3e-4
  config.optim.warmup_steps = 2000
  config.optim.weight_decay = 0.1
  return config
