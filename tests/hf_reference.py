"""The transformers reference (test-only): tiny random Llama 4 models with large weights."""

import os

import numpy as np
import torch
import transformers

# docs/llama4_architecture.md §9: every code path of the text model in four layers.
PARITY_TEXT_CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=32,
    intermediate_size_mlp=48,
    hidden_act='silu',
    rms_norm_eps=1e-5,
    num_local_experts=4,
    num_experts_per_tok=1,
    moe_layers=[0, 1],
    no_rope_layers=[1, 0, 1, 0],
    use_qk_norm=True,
    attention_chunk_size=8,
    attn_temperature_tuning=True,
    floor_scale=2,
    attn_scale=0.5,
    rope_parameters={
        'rope_type': 'llama3',
        'rope_theta': 10000.0,
        'factor': 8.0,
        'low_freq_factor': 1.0,
        'high_freq_factor': 4.0,
        'original_max_position_embeddings': 64,
    },
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def scale_weights_(model: torch.nn.Module, seed: int = 0):
  """§9 recipe: weights x8 (not embeddings), norms 1 + 0.1 N(0,1), biases 0.1 N(0,1).

  HF's default init gives logits of about 0.6, small enough to hide bugs.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name or 'layernorm' in name:
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      elif name.endswith('bias'):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      elif p.ndim >= 2 and 'embed' not in name:
        p.mul_(8.0)


def text_model(seed: int = 0, **overrides) -> transformers.Llama4ForCausalLM:
  torch.manual_seed(seed)
  config = transformers.Llama4TextConfig(**{**PARITY_TEXT_CONFIG, **overrides})
  model = transformers.Llama4ForCausalLM(config).eval()
  scale_weights_(model, seed)
  return model


def text_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
  """HF logits; with a mask, positions count from each row's first real token."""
  ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
  with torch.no_grad():
    return model(input_ids=ids, **_mask_kwargs(attention_mask)).logits.float().numpy()


def _mask_kwargs(attention_mask) -> dict:
  """HF's mask and positions that count from each row's first real token."""
  if attention_mask is None:
    return {}
  mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
  return dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))


# docs/llama4_architecture.md §9: 8 x 8 patches of 7 pixels, 16 image tokens per tile.
PARITY_VISION_CONFIG = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_hidden_layers=2,
    intermediate_size=128,
    image_size=56,
    patch_size=7,
    num_channels=3,
    pixel_shuffle_ratio=0.5,
    projector_input_dim=48,
    projector_output_dim=48,
    vision_output_dim=48,
    rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0},
)
PATCH_ID = 5  # image_token_index of the parity config


def multimodal_model(
    seed: int = 0, **text_overrides
) -> transformers.Llama4ForConditionalGeneration:
  torch.manual_seed(seed)
  config = transformers.Llama4Config(
      text_config={**PARITY_TEXT_CONFIG, **text_overrides},
      vision_config=PARITY_VISION_CONFIG,
      image_token_index=PATCH_ID,
      boi_token_index=6,
      eoi_token_index=7,
  )
  model = transformers.Llama4ForConditionalGeneration(config).eval()
  scale_weights_(model, seed)
  return model


def multimodal_logits(
    model, tokens: np.ndarray, pixels_NCHW: np.ndarray, attention_mask: np.ndarray | None = None
) -> np.ndarray:
  """HF logits with images: pixels are all tiles of the batch, in placeholder order."""
  ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
  with torch.no_grad():
    return (
        model(
            input_ids=ids,
            pixel_values=torch.as_tensor(pixels_NCHW, dtype=torch.float32),
            **_mask_kwargs(attention_mask),
        )
        .logits.float()
        .numpy()
    )


def read_safetensors(hf_dir) -> dict[str, np.ndarray]:
  """Every tensor of an HF checkpoint directory."""
  from safetensors import safe_open

  out = {}
  for file in sorted(os.listdir(hf_dir)):
    if file.endswith('.safetensors'):
      with safe_open(os.path.join(hf_dir, file), 'np') as f:
        out.update({name: f.get_tensor(name) for name in f.keys()})
  return out
