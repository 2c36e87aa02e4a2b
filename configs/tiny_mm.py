"""Tiny multimodal Llama 4 trained on the built-in shapes questions on CPU.

  python scripts/train.py --config=configs/tiny_mm.py --workdir=/tmp/llama4_tiny_mm

The tiny text model of configs/tiny.py with a 2-layer vision tower on 48-pixel
single-tile images (8 x 8 patches of 6 pixels, 16 image tokens per image).
The data (llama4_jax/data/shapes_data.py) are generated on first use: coloured
shapes with questions about their colour, kind and count. At the end the run
reports its held-out answer accuracy and the best a text-only model can do.
"""

from llama4_jax import config_lib
from llama4_jax.model import vision


def get_config(arg=None):
  config = config_lib.base_config()
  config.model.vision = vision.VisionConfig(
      hidden_size=64,
      num_layers=2,
      num_heads=4,
      intermediate_size=256,
      image_size=48,
      patch_size=6,
      pixel_shuffle_ratio=0.5,
      projector_input_dim=128,
      projector_output_dim=128,
      vision_output_dim=128,
      max_tiles=1,
      # The built-in tokenizer's ids (llama4_jax/data/tokenizer.py SPECIAL_TOKENS order).
      image_token_id=12,
      boi_token_id=9,
      eoi_token_id=10,
  ).to_dict()
  config.data.modality = 'image_text'
  config.data.seq_len = 48
  config.train.steps = 2500
  config.train.batch_size = 32
  config.train.checkpoint_every = 500
  config.train.eval_every = 500
  config.train.log_every = 50
  # 3e-3 drives the fresh vision tower's GELUs dead before it learns anything.
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 100
  config.eval.batch_size = 32
  config.eval.max_batches = 10
  return config
