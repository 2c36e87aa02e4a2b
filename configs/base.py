"""Every key the code reads, with its default and meaning. Experiment files start here.

Not run directly; see configs/tiny.py, scout.py and maverick.py.
"""

import ml_collections as mlc

from configs import common


def get_config(arg=None) -> mlc.ConfigDict:
  del arg
  config = mlc.ConfigDict()
  config.seed = 0                    # parameter init, data order and sampling all derive from it

  # Architecture: a preset of llama4_jax.model.PRESETS expanded field by field.
  config.model = common.model_preset('tiny')

  # Device mesh: axis sizes; one may be -1 to take the remaining devices.
  config.mesh = mlc.ConfigDict(dict(
      data=1,                        # pure data parallelism (weights replicated)
      fsdp=-1,                       # data parallelism with weights sharded along `embed`
      tensor=1,                      # heads / MLP width / vocabulary
      expert=1,                      # experts of MoE layers (tokens also split over it)
  ))

  config.data = mlc.ConfigDict(dict(
      modality='text',               # 'text', or 'image_text' (needs model.vision; see llama4_jax/image_text.py)
      train_files='',                # comma-separated globs (.txt, .jsonl with "text", .npy ids); '' = built-in corpus
      eval_files='',                 # same forms; '' = the built-in corpus' validation split
      tokenizer='',                  # sentencepiece .model; '' = train/reuse one for the built-in corpus
      tokenizer_cache='',            # where the built-in tokenizer is kept; '' = <workdir>/tokenizer
      builtin_max_bytes=8_000_000,   # cap on built-in corpus text (bytes)
      seq_len=256,                   # tokens per training sequence
      packing_bins=0,                # rows packed together per first-fit group (0 = max(4 x batch, 64))
      tokenizer_train_bytes=0,       # text used to train the built-in tokenizer (0 = 4 MB)
      tiles_per_row=0,               # image_text: image tiles per row (0 = model.vision.max_tiles + 1)
      # image_text with train_files/eval_files '': the built-in shapes questions (llama4_jax/shapes_data.py).
      shapes=mlc.ConfigDict(dict(
          dir='',                    # where they are written ('' = <workdir>/shapes_data)
          train_examples=20000,
          eval_examples=600,
          seed=0,
      )),
  ))

  config.train = mlc.ConfigDict(dict(
      steps=1000,                    # optimizer updates
      batch_size=32,                 # global batch, in sequences
      grad_accum_steps=1,            # micro-batches per update (batch_size must divide)
      checkpoint_every=200,          # steps between checkpoints (and one at the end)
      keep_checkpoints=3,            # newest checkpoints kept
      eval_every=200,                # steps between validation evals (0 = only at the end)
      log_every=10,                  # steps between metric logs
      init_from='',                  # workdir/checkpoint of a converted model to fine-tune from
      load_balance_coef=0.0,         # MoE load-balancing loss weight (0 = exact HF model)
      router_z_coef=0.0,             # MoE router z-loss weight
      skip_nonfinite=False,          # on a non-finite loss/grad: False = stop, True = skip the update
      sample_tokens=48,              # length of the sample printed at the end (0 = none)
      freeze='',                     # '', 'vision' (the vision tower) or 'language' (all but vision + projector)
  ))

  config.optim = mlc.ConfigDict(dict(
      lr=3e-3,                       # peak learning rate
      warmup_steps=100,              # linear warmup from 0
      min_lr_ratio=0.1,              # cosine decay ends at lr * min_lr_ratio at train.steps
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,              # decoupled (AdamW)
      decay_norms=False,             # apply weight decay to norm scales
      decay_embeddings=False,        # apply weight decay to the token embedding
      clip_norm=1.0,                 # global gradient norm clip (0 = off)
  ))

  config.eval = mlc.ConfigDict(dict(
      batch_size=16,                 # sequences per eval batch
      max_batches=20,                # eval batches per validation (0 = whole split)
  ))
  return config
