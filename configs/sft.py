"""Chat fine-tuning (SFT) of a trained or converted model: the loss covers the assistant's turns.

The built-in example, minutes on a 2-core CPU: the tiny main job's model (trained on Python
sources) learns to answer questions about small tables (llama4_jax/data/chat_task.py);
the run ends with the held-out exact-match accuracy before and after.

  python scripts/train.py --config=configs/tiny.py --workdir=/tmp/llama4_tiny
  python scripts/train.py --config=configs/sft.py:tiny --workdir=/tmp/llama4_sft \
      --config.train.init_from=/tmp/llama4_tiny

The released Scout (converted; its tokenizer.json comes with it) on your conversations,
JSON Lines of {"messages": [{"role": ..., "content": ...}, ...]} (llama4_jax/data/chat.py):

  python scripts/convert_checkpoint.py --hf_dir=$SCOUT_HF_DIR --workdir=$SCOUT
  python scripts/train.py --config=configs/sft.py:scout --workdir=$RUN \
      --config.train.init_from=$SCOUT \
      --config.data.train_files=chats.jsonl --config.data.eval_files=held_out.jsonl

The model's architecture is the one of the workdir given as train.init_from (text-only or
with its vision tower; train.model_from_init); how it is computed (bf16, remat, attention
blocks), the weights' dtype, the mesh and the memory settings are the preset's
(configs/tiny.py, configs/scout.py). What else changes is the data and an optimizer fit for
fine-tuning: a learning rate well below pre-training's, a short warmup, cosine decay, no
weight decay.
"""

import os
import runpy

PRESETS = {
    # name: (steps, batch size, sequence length, peak learning rate)
    'tiny': (300, 16, 256, 1e-3),
    'scout': (1000, 128, 8192, 1e-5),
}


def get_config(arg=None):
  name = arg or 'tiny'
  if name not in PRESETS:
    raise ValueError(f'configs/sft.py:{name}: unknown preset; presets are {sorted(PRESETS)}')
  steps, batch_size, seq_len, lr = PRESETS[name]
  preset = runpy.run_path(os.path.join(os.path.dirname(__file__), f'{name}.py'))
  config = preset['get_config']()
  config.train.model_from_init = True  # the architecture of the model given as init_from
  config.data.modality = 'chat'
  config.data.seq_len = seq_len
  config.train.steps = steps
  config.train.batch_size = batch_size
  config.train.checkpoint_every = steps // 3
  config.train.eval_every = steps // 3
  config.train.sample_tokens = 16  # the length of an answer
  config.optim.lr = lr
  config.optim.warmup_steps = steps // 10
  config.optim.min_lr_ratio = 0.1
  config.optim.weight_decay = 0.0
  config.eval.batch_size = 16 if name == 'tiny' else config.eval.batch_size
  config.eval.max_batches = 0  # every held-out conversation
  return config
