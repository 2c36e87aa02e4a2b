"""Hugging Face Llama 4 checkpoints <-> llama4_jax parameters, one tensor at a time.

Reads `config.json` and safetensors (single file or sharded with an index) of
`Llama4ForCausalLM` (`model_type: llama4_text`) or
`Llama4ForConditionalGeneration` (`llama4`: text tensors under `language_model.`,
the vision tower under `vision_model.`, the projector `multi_modal_projector.`).
Every HF `nn.Linear` weight [out, in] is transposed to our [in, out] layout and
split into heads where we keep heads as an axis; the fused experts'
`gate_up_proj` [E, D, 2F] is split on its last axis. Our stacked tensors (one
per block position, stacked over the stage's repeats) are assembled slice by
slice, so peak host memory is one of our stacked tensors plus one HF tensor.
"""

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from etils import epath

from llama4_jax import model as model_lib
from llama4_jax.model import vision as vision_lib

SAFETENSORS_INDEX = 'model.safetensors.index.json'


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message names the file/tensor/field."""


# Config ----------------------------------------------------------------------


def text_config_from_hf(hf: dict[str, Any], source: str = 'config.json') -> dict[str, Any]:
  """The text-model part of an HF config dict (`llama4` or `llama4_text`)."""
  model_type = hf.get('model_type')
  if model_type == 'llama4':
    if 'text_config' not in hf:
      raise ConversionError(f'{source}: model_type "llama4" without a "text_config"')
    text = dict(hf['text_config'])
    text.setdefault('model_type', 'llama4_text')
    return text
  if model_type == 'llama4_text':
    return dict(hf)
  raise ConversionError(
      f'{source}: model_type is {model_type!r}; expected "llama4" or '
      f'"llama4_text" (a Llama 4 checkpoint)'
  )


def model_config_from_hf(
    hf: dict[str, Any], source: str = 'config.json', **overrides
) -> model_lib.ModelConfig:
  """ModelConfig from an HF config dict, applying HF's defaults and legacy keys."""
  c = text_config_from_hf(hf, source)
  get = lambda key, default: default if c.get(key) is None else c[key]
  if get('tie_word_embeddings', False):
    raise ConversionError(f'{source}: tie_word_embeddings=true is not a Llama 4 layout')
  L = get('num_hidden_layers', 48)
  D, N = get('hidden_size', 5120), get('num_attention_heads', 40)
  step = get('interleave_moe_layer_step', 1)
  moe_layers = get('moe_layers', list(range(step - 1, L, step)))
  interval = get('no_rope_layer_interval', 4)
  no_rope_layers = c.get('no_rope_layers') or [int((i + 1) % interval != 0) for i in range(L)]
  rope = _rope_parameters(c, source)
  eos = get('eos_token_id', 2)
  if 'vision' not in overrides:
    overrides['vision'] = vision_config_from_hf(hf, source)
  try:
    return model_lib.ModelConfig(
        vocab_size=get('vocab_size', 202048),
        hidden_size=D,
        num_layers=L,
        num_heads=N,
        num_kv_heads=get('num_key_value_heads', 8),
        head_dim=get('head_dim', D // N),
        intermediate_size=get('intermediate_size', 8192),
        intermediate_size_mlp=get('intermediate_size_mlp', 16384),
        num_experts=get('num_local_experts', 16),
        num_experts_per_tok=get('num_experts_per_tok', 1),
        moe_layers=tuple(moe_layers),
        no_rope_layers=tuple(no_rope_layers),
        use_qk_norm=bool(get('use_qk_norm', True)),
        # Absent: HF's default 8192; an explicit null turns chunking off.
        attention_chunk_size=int(c.get('attention_chunk_size', 8192) or 0),
        # Early hub configs carry the int 4 here; it means "on".
        attn_temperature_tuning=bool(get('attn_temperature_tuning', True)),
        floor_scale=int(get('floor_scale', 8192)),
        attn_scale=float(get('attn_scale', 0.1)),
        rms_norm_eps=float(get('rms_norm_eps', 1e-5)),
        max_position_embeddings=int(get('max_position_embeddings', 131072)),
        initializer_range=float(get('initializer_range', 0.02)),
        bos_token_id=int(get('bos_token_id', 1)),
        eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),),
        pad_token_id=int(get('pad_token_id', 0)),
        **rope,
        **overrides,
    )
  except (ValueError, TypeError) as e:
    raise ConversionError(f'{source}: {e}') from e


# transformers' Llama4VisionConfig defaults (5.23.0), for the keys a saved config may omit.
HF_VISION_DEFAULTS = dict(
    hidden_size=768,
    num_hidden_layers=34,
    num_attention_heads=16,
    intermediate_size=5632,
    image_size=448,
    patch_size=14,
    num_channels=3,
    pixel_shuffle_ratio=0.5,
    projector_input_dim=4096,
    projector_output_dim=4096,
    vision_output_dim=7680,
)


def vision_config_from_hf(
    hf: dict[str, Any], source: str = 'config.json'
) -> vision_lib.VisionConfig | None:
  """The vision tower of a `llama4` config (None for a text-only checkpoint)."""
  v = hf.get('vision_config') if hf.get('model_type') == 'llama4' else None
  if not v:
    return None
  rope = dict(v.get('rope_parameters') or {})
  defaults = vision_lib.VisionConfig()
  # transformers leaves out of a saved config the values equal to its class defaults:
  # a missing key means Llama4VisionConfig's default.
  get = lambda key: HF_VISION_DEFAULTS[key] if v.get(key) is None else v[key]
  try:
    return vision_lib.VisionConfig(
        hidden_size=get('hidden_size'),
        num_layers=get('num_hidden_layers'),
        num_heads=get('num_attention_heads'),
        intermediate_size=get('intermediate_size'),
        image_size=get('image_size'),
        patch_size=get('patch_size'),
        num_channels=get('num_channels'),
        pixel_shuffle_ratio=get('pixel_shuffle_ratio'),
        projector_input_dim=get('projector_input_dim'),
        projector_output_dim=get('projector_output_dim'),
        vision_output_dim=get('vision_output_dim'),
        rope_theta=float(rope.get('rope_theta', v.get('rope_theta', 10000.0))),
        image_token_id=hf.get('image_token_index', defaults.image_token_id),
        boi_token_id=hf.get('boi_token_index', defaults.boi_token_id),
        eoi_token_id=hf.get('eoi_token_index', defaults.eoi_token_id),
    )
  except (ValueError, TypeError) as e:
    raise ConversionError(f'{source}: {e}') from e


def _rope_parameters(c: dict[str, Any], source: str) -> dict[str, Any]:
  """HF5 `rope_parameters`, or HF4 `rope_theta` + `rope_scaling`, as our flat fields."""
  params = dict(c.get('rope_parameters') or {})
  if c.get('rope_scaling'):
    params = {**c['rope_scaling'], **params}
  theta = params.get('rope_theta', c.get('rope_theta', 500000.0))
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type not in ('default', 'llama3'):
    raise ConversionError(f'{source}: rope type {rope_type!r} is not supported (default, llama3)')
  out = dict(rope_theta=float(theta), rope_type=rope_type)
  if rope_type == 'llama3':
    out.update(
        rope_factor=float(params['factor']),
        rope_low_freq_factor=float(params['low_freq_factor']),
        rope_high_freq_factor=float(params['high_freq_factor']),
        rope_original_max_position=int(
            params.get('original_max_position_embeddings') or c.get('max_position_embeddings', 8192)
        ),
    )
  return out


def hf_text_config(cfg: model_lib.ModelConfig) -> dict[str, Any]:
  """An HF `llama4_text` config.json dict (for `Llama4ForCausalLM`)."""
  rope: dict[str, Any] = {'rope_type': cfg.rope_type, 'rope_theta': cfg.rope_theta}
  if cfg.rope_type == 'llama3':
    rope.update(
        factor=cfg.rope_factor,
        low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_position_embeddings=cfg.rope_original_max_position,
    )
  return {
      'architectures': ['Llama4ForCausalLM'],
      'model_type': 'llama4_text',
      'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.hidden_size,
      'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.head_dim,
      'intermediate_size': cfg.intermediate_size,
      'intermediate_size_mlp': cfg.intermediate_size_mlp,
      'hidden_act': 'silu',
      'num_local_experts': cfg.num_experts,
      'num_experts_per_tok': cfg.num_experts_per_tok,
      'moe_layers': list(cfg.moe_layers),
      'no_rope_layers': list(cfg.no_rope_layers),
      'use_qk_norm': cfg.use_qk_norm,
      'attention_chunk_size': cfg.attention_chunk_size or None,
      'attn_temperature_tuning': cfg.attn_temperature_tuning,
      'floor_scale': cfg.floor_scale,
      'attn_scale': cfg.attn_scale,
      'rms_norm_eps': cfg.rms_norm_eps,
      'max_position_embeddings': cfg.max_position_embeddings,
      'initializer_range': cfg.initializer_range,
      'rope_parameters': rope,
      'rope_theta': cfg.rope_theta,
      'rope_scaling': rope if cfg.rope_type == 'llama3' else None,
      'bos_token_id': cfg.bos_token_id,
      'eos_token_id': cfg.eos_token_ids[0]
      if len(cfg.eos_token_ids) == 1
      else list(cfg.eos_token_ids),
      'pad_token_id': cfg.pad_token_id,
      'tie_word_embeddings': False,
      'attention_bias': False,
  }


def hf_config(cfg: model_lib.ModelConfig) -> dict[str, Any]:
  """config.json: `llama4_text` for a text model, `llama4` with the vision tower."""
  text = hf_text_config(cfg)
  v = cfg.vision
  if v is None:
    return text
  vision = {
      'model_type': 'llama4_vision_model',
      'hidden_size': v.hidden_size,
      'num_hidden_layers': v.num_layers,
      'num_attention_heads': v.num_heads,
      'intermediate_size': v.intermediate_size,
      'image_size': v.image_size,
      'patch_size': v.patch_size,
      'num_channels': v.num_channels,
      'pixel_shuffle_ratio': v.pixel_shuffle_ratio,
      'projector_input_dim': v.projector_input_dim,
      'projector_output_dim': v.projector_output_dim,
      'vision_output_dim': v.vision_output_dim,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': v.rope_theta},
      'rope_theta': v.rope_theta,
      'norm_eps': v.norm_eps,
      'hidden_act': 'gelu',
      'vision_feature_select_strategy': 'default',
      'multi_modal_projector_bias': False,
  }
  del text['architectures']
  return {
      'architectures': ['Llama4ForConditionalGeneration'],
      'model_type': 'llama4',
      'text_config': text,
      'vision_config': vision,
      'image_token_index': v.image_token_id,
      'boi_token_index': v.boi_token_id,
      'eoi_token_index': v.eoi_token_id,
      'tie_word_embeddings': False,
  }


# Tensor name mapping -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """How one of our per-layer tensors comes from (and goes back to) an HF tensor."""

  hf_suffix: str  # name after `model.layers.{i}.`
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _linear(*split):
  """[out, in] <-> [in, *split] (split = the out axis as several axes)."""
  return (
      lambda w: w.T.reshape(w.shape[1], *split) if split else w.T,
      lambda w: w.reshape(w.shape[0], -1).T,
  )


def _linear_in_split(*split):
  """[out, in] <-> [*split, out] (split = the in axis as several axes, e.g. o_proj)."""
  return (lambda w: w.T.reshape(*split, w.shape[0]), lambda w: w.reshape(-1, w.shape[-1]).T)


_IDENTITY = (lambda w: w, lambda w: w)


def layer_rules(cfg: model_lib.ModelConfig, is_moe: bool) -> dict[str, TensorRule]:
  """Our within-layer parameter name -> rule. gate_up_proj maps to two of ours."""
  N, K, H, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  rules = {
      'attn_norm.scale': TensorRule('input_layernorm.weight', *_IDENTITY),
      'ffn_norm.scale': TensorRule('post_attention_layernorm.weight', *_IDENTITY),
      'attn.q_proj.w': TensorRule('self_attn.q_proj.weight', *_linear(N, H)),
      'attn.k_proj.w': TensorRule('self_attn.k_proj.weight', *_linear(K, H)),
      'attn.v_proj.w': TensorRule('self_attn.v_proj.weight', *_linear(K, H)),
      'attn.o_proj.w': TensorRule('self_attn.o_proj.weight', *_linear_in_split(N, H)),
  }
  if is_moe:
    rules.update(
        {
            'ffn.router.w': TensorRule('feed_forward.router.weight', *_linear()),
            'ffn.wi_gate': TensorRule(
                'feed_forward.experts.gate_up_proj', lambda w: w[..., :F], None
            ),
            'ffn.wi_up': TensorRule(
                'feed_forward.experts.gate_up_proj', lambda w: w[..., F:], None
            ),
            'ffn.wo': TensorRule('feed_forward.experts.down_proj', *_IDENTITY),
        }
    )
    for ours, theirs in (('gate', 'gate_proj'), ('up', 'up_proj'), ('down', 'down_proj')):
      rules[f'ffn.shared_expert.{ours}.w'] = TensorRule(
          f'feed_forward.shared_expert.{theirs}.weight', *_linear()
      )
  else:
    for ours, theirs in (('gate', 'gate_proj'), ('up', 'up_proj'), ('down', 'down_proj')):
      rules[f'ffn.{ours}.w'] = TensorRule(f'feed_forward.{theirs}.weight', *_linear())
  return rules


GLOBAL_RULES = {
    'embed': TensorRule('model.embed_tokens.weight', *_IDENTITY),
    'final_norm.scale': TensorRule('model.norm.weight', *_IDENTITY),
    'lm_head.w': TensorRule('lm_head.weight', *_linear()),
}


VISION_GLOBAL_RULES = {  # full HF names (no language_model. prefix)
    'vision.patch_embed.w': TensorRule('vision_model.patch_embedding.linear.weight', *_linear()),
    'vision.class_embedding': TensorRule('vision_model.class_embedding', *_IDENTITY),
    'vision.positions': TensorRule('vision_model.positional_embedding_vlm', *_IDENTITY),
    'vision.pre_norm.scale': TensorRule('vision_model.layernorm_pre.weight', *_IDENTITY),
    'vision.pre_norm.bias': TensorRule('vision_model.layernorm_pre.bias', *_IDENTITY),
    'vision.post_norm.scale': TensorRule('vision_model.layernorm_post.weight', *_IDENTITY),
    'vision.post_norm.bias': TensorRule('vision_model.layernorm_post.bias', *_IDENTITY),
    'vision.adapter_fc1.w': TensorRule('vision_model.vision_adapter.mlp.fc1.weight', *_linear()),
    'vision.adapter_fc2.w': TensorRule('vision_model.vision_adapter.mlp.fc2.weight', *_linear()),
    'projector.w': TensorRule('multi_modal_projector.linear_1.weight', *_linear()),
}


def vision_layer_rules(v: vision_lib.VisionConfig) -> dict[str, TensorRule]:
  """Our vision-layer parameter name -> rule (suffix after `vision_model.model.layers.{j}.`)."""
  N, H = v.num_heads, v.hidden_size // v.num_heads
  heads = (lambda b: b.reshape(N, H), lambda b: b.reshape(-1))
  rules = {
      'attn_norm.scale': TensorRule('input_layernorm.weight', *_IDENTITY),
      'attn_norm.bias': TensorRule('input_layernorm.bias', *_IDENTITY),
      'mlp_norm.scale': TensorRule('post_attention_layernorm.weight', *_IDENTITY),
      'mlp_norm.bias': TensorRule('post_attention_layernorm.bias', *_IDENTITY),
      'o.w': TensorRule('self_attn.o_proj.weight', *_linear_in_split(N, H)),
      'o.b': TensorRule('self_attn.o_proj.bias', *_IDENTITY),
      'fc1.w': TensorRule('mlp.fc1.weight', *_linear()),
      'fc1.b': TensorRule('mlp.fc1.bias', *_IDENTITY),
      'fc2.w': TensorRule('mlp.fc2.weight', *_linear()),
      'fc2.b': TensorRule('mlp.fc2.bias', *_IDENTITY),
  }
  for x in 'qkv':
    rules[f'{x}.w'] = TensorRule(f'self_attn.{x}_proj.weight', *_linear(N, H))
    rules[f'{x}.b'] = TensorRule(f'self_attn.{x}_proj.bias', *heads)
  return rules


def expected_vision_shapes(v: vision_lib.VisionConfig, D: int) -> dict[str, tuple[int, ...]]:
  """Every HF vision/projector tensor name with the shape the config implies."""
  W, F, A = v.hidden_size, v.intermediate_size, v.projector_output_dim
  shapes = {
      'vision_model.patch_embedding.linear.weight': (W, v.num_channels * v.patch_size**2),
      'vision_model.class_embedding': (W,),
      'vision_model.positional_embedding_vlm': (v.grid**2 + 1, W),
      'vision_model.vision_adapter.mlp.fc1.weight': (v.projector_input_dim, F),
      'vision_model.vision_adapter.mlp.fc2.weight': (A, A),
      'multi_modal_projector.linear_1.weight': (D, v.vision_output_dim),
  }
  for norm in ('layernorm_pre', 'layernorm_post'):
    shapes.update({f'vision_model.{norm}.weight': (W,), f'vision_model.{norm}.bias': (W,)})
  for j in range(v.num_layers):
    p = f'vision_model.model.layers.{j}.'
    for x in 'qkvo':
      shapes.update(
          {p + f'self_attn.{x}_proj.weight': (W, W), p + f'self_attn.{x}_proj.bias': (W,)}
      )
    for norm in ('input_layernorm', 'post_attention_layernorm'):
      shapes.update({p + f'{norm}.weight': (W,), p + f'{norm}.bias': (W,)})
    shapes.update(
        {
            p + 'mlp.fc1.weight': (F, W),
            p + 'mlp.fc1.bias': (F,),
            p + 'mlp.fc2.weight': (W, F),
            p + 'mlp.fc2.bias': (W,),
        }
    )
  return shapes


def expected_hf_shapes(cfg: model_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every HF text tensor name (no prefix) with the shape the config implies."""
  V, D, N, K, H = cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  E, F, Fm = cfg.num_experts, cfg.intermediate_size, cfg.intermediate_size_mlp
  shapes = {
      'model.embed_tokens.weight': (V, D),
      'model.norm.weight': (D,),
      'lm_head.weight': (V, D),
  }
  for i, kind in enumerate(cfg.layer_kinds()):
    p = f'model.layers.{i}.'
    shapes.update(
        {
            p + 'input_layernorm.weight': (D,),
            p + 'post_attention_layernorm.weight': (D,),
            p + 'self_attn.q_proj.weight': (N * H, D),
            p + 'self_attn.k_proj.weight': (K * H, D),
            p + 'self_attn.v_proj.weight': (K * H, D),
            p + 'self_attn.o_proj.weight': (D, N * H),
        }
    )
    if kind.is_moe:
      shapes.update(
          {
              p + 'feed_forward.router.weight': (E, D),
              p + 'feed_forward.experts.gate_up_proj': (E, D, 2 * F),
              p + 'feed_forward.experts.down_proj': (E, F, D),
              p + 'feed_forward.shared_expert.gate_proj.weight': (F, D),
              p + 'feed_forward.shared_expert.up_proj.weight': (F, D),
              p + 'feed_forward.shared_expert.down_proj.weight': (D, F),
          }
      )
    else:
      shapes.update(
          {
              p + 'feed_forward.gate_proj.weight': (Fm, D),
              p + 'feed_forward.up_proj.weight': (Fm, D),
              p + 'feed_forward.down_proj.weight': (D, Fm),
          }
      )
  return shapes


# Reading HF checkpoints -----------------------------------------------------------


class HFCheckpointReader:
  """Random access to the tensors of an HF checkpoint directory, one at a time."""

  def __init__(self, hf_dir: str):
    self.dir = epath.Path(hf_dir)
    config_path = self.dir / 'config.json'
    if not self.dir.is_dir():
      raise ConversionError(f'{self.dir}: not a directory')
    if not config_path.exists():
      raise ConversionError(f'{config_path}: missing (an HF checkpoint needs its config.json)')
    try:
      self.hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
      raise ConversionError(f'{config_path}: not valid JSON ({e})') from e
    self.config = model_config_from_hf(self.hf_config, str(config_path))
    self.prefix = 'language_model.' if self.hf_config.get('model_type') == 'llama4' else ''
    self.file_of = self._index()

  def _index(self) -> dict[str, str]:
    """tensor name -> safetensors file name, from the index or the single file."""
    from safetensors import safe_open

    index_path = self.dir / SAFETENSORS_INDEX
    if index_path.exists():
      try:
        weight_map = json.loads(index_path.read_text())['weight_map']
      except (json.JSONDecodeError, KeyError) as e:
        raise ConversionError(f'{index_path}: not a safetensors index ({e})') from e
      for file in sorted(set(weight_map.values())):
        if not (self.dir / file).exists():
          raise ConversionError(
              f'{index_path} names shard {file}, which is missing from {self.dir}'
          )
      return dict(weight_map)
    files = sorted(p.name for p in self.dir.glob('*.safetensors'))
    if not files:
      raise ConversionError(f'{self.dir}: no *.safetensors files and no {SAFETENSORS_INDEX}')
    if len(files) > 1:
      raise ConversionError(f'{self.dir}: several safetensors files but no {SAFETENSORS_INDEX}')
    try:
      with safe_open(os.fspath(self.dir / files[0]), 'np') as f:
        return {name: files[0] for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types
      raise ConversionError(f'{self.dir / files[0]}: unreadable safetensors file ({e})') from e

  def check_names_and_shapes(self):
    """Fails on unknown or missing tensors and on shapes that disagree with config.json."""
    from safetensors import safe_open

    expected = {self.prefix + k: v for k, v in expected_hf_shapes(self.config).items()}
    if self.config.vision is not None:
      expected.update(expected_vision_shapes(self.config.vision, self.config.hidden_size))
    names = set(self.file_of)
    if self.config.vision is None:  # a text model from a checkpoint without vision_config
      names = {n for n in names if not n.startswith(('vision_model.', 'multi_modal_projector.'))}
    unknown = sorted(names - set(expected))
    if unknown:
      raise ConversionError(
          f'{self.dir}: unknown tensor {unknown[0]} in {self.file_of[unknown[0]]} '
          f'(not part of a Llama 4 checkpoint with this config.json)'
      )
    missing = sorted(set(expected) - names)
    if missing:
      raise ConversionError(
          f'{self.dir}: tensor {missing[0]} is missing ' f'({len(missing)} missing in all)'
      )
    for file in sorted(set(self.file_of.values())):
      path = self.dir / file
      try:
        with safe_open(os.fspath(path), 'np') as f:
          for name in f.keys():
            if name in expected:
              shape = tuple(f.get_slice(name).get_shape())
              if shape != expected[name]:
                raise ConversionError(
                    f'{path}: tensor {name} has shape {shape}, but config.json implies '
                    f'{expected[name]}'
                )
      except ConversionError:
        raise
      except Exception as e:
        raise ConversionError(f'{path}: unreadable safetensors file ({e})') from e

  def get(self, name: str, text: bool = True) -> np.ndarray:
    """A tensor by its name; text tensors without the `language_model.` prefix."""
    from safetensors import safe_open

    name = self.prefix + name if text else name
    path = self.dir / self.file_of[name]
    try:
      with safe_open(os.fspath(path), 'np') as f:
        return f.get_tensor(name)
    except Exception as e:
      raise ConversionError(f'{path}: cannot read tensor {name} ({e})') from e


def iter_our_params(
    reader: HFCheckpointReader, cfg: model_lib.ModelConfig, dtype=None
) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (our flat name, array) for every parameter, reading HF tensors lazily."""
  cast = (lambda a: a.astype(dtype)) if dtype else (lambda a: a)
  for name, rule in GLOBAL_RULES.items():
    yield name, cast(rule.to_ours(reader.get(rule.hf_suffix)))
  index_map = model_lib.layer_index_map(cfg)
  for s, stage in enumerate(cfg.stages()):
    for j, kind in enumerate(stage.kinds):
      layers = [i for i, (si, _, ji) in enumerate(index_map) if si == s and ji == j]
      for ours, rule in layer_rules(cfg, kind.is_moe).items():
        yield f'stages.{s}.layers.{j}.{ours}', _stack(
            len(layers),
            (cast(rule.to_ours(reader.get(f'model.layers.{i}.{rule.hf_suffix}'))) for i in layers),
        )
  if cfg.vision is None:
    return
  for name, rule in VISION_GLOBAL_RULES.items():
    yield name, cast(rule.to_ours(reader.get(rule.hf_suffix, text=False)))
  for ours, rule in vision_layer_rules(cfg.vision).items():
    yield f'vision.layers.{ours}', _stack(
        cfg.vision.num_layers,
        (
            cast(
                rule.to_ours(
                    reader.get(f'vision_model.model.layers.{j}.{rule.hf_suffix}', text=False)
                )
            )
            for j in range(cfg.vision.num_layers)
        ),
    )


def _stack(count: int, pieces: Iterator[np.ndarray]) -> np.ndarray:
  """np.stack of `count` pieces, filled slice by slice: one HF tensor alive at a time."""
  stacked = None
  for r, piece in enumerate(pieces):
    if stacked is None:
      stacked = np.empty((count,) + piece.shape, piece.dtype)
    stacked[r] = piece
    del piece
  return stacked


def iter_hf_tensors(
    get_param: Callable[[str], np.ndarray], cfg: model_lib.ModelConfig
) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array) from our flat params, fetched one at a time by name."""
  text = 'language_model.' if cfg.vision is not None else ''
  for name, rule in GLOBAL_RULES.items():
    yield text + rule.hf_suffix, np.ascontiguousarray(rule.to_hf(get_param(name)))
  index_map = model_lib.layer_index_map(cfg)
  for s, stage in enumerate(cfg.stages()):
    for j, kind in enumerate(stage.kinds):
      prefix = f'stages.{s}.layers.{j}.'
      layers = [(i, r) for i, (si, r, ji) in enumerate(index_map) if si == s and ji == j]
      for ours, rule in layer_rules(cfg, kind.is_moe).items():
        if ours == 'ffn.wi_up':
          continue  # written together with wi_gate as the fused gate_up_proj
        stacked = get_param(prefix + ours)
        up = get_param(prefix + 'ffn.wi_up') if ours == 'ffn.wi_gate' else None
        for i, r in layers:
          if up is not None:  # fused a layer at a time: never a second pair of stacks
            layer = np.concatenate([stacked[r], up[r]], axis=-1)
          else:  # a copy of its own, not a view holding the whole stack while it waits
            layer = np.array(rule.to_hf(stacked[r]), order='C')
          yield f'{text}model.layers.{i}.{rule.hf_suffix}', layer
        del stacked, up
  if cfg.vision is None:
    return
  for name, rule in VISION_GLOBAL_RULES.items():
    yield rule.hf_suffix, np.ascontiguousarray(rule.to_hf(get_param(name)))
  for ours, rule in vision_layer_rules(cfg.vision).items():
    stacked = get_param(f'vision.layers.{ours}')
    for j in range(cfg.vision.num_layers):
      yield (
          f'vision_model.model.layers.{j}.{rule.hf_suffix}',
          np.array(rule.to_hf(stacked[j]), order='C'),  # its own, as the text layers'
      )


def write_safetensors(
    out_dir: str, tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int = 5 << 30
) -> list[str]:
  """Writes tensors into shards of at most max_shard_bytes plus an index; streams."""
  from safetensors.numpy import save_file

  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  weight_map: dict[str, int] = {}
  current: dict[str, np.ndarray] = {}
  current_bytes, total = 0, 0
  tmp_names = []

  def flush():
    nonlocal current, current_bytes
    if current:
      tmp = f'shard-{len(tmp_names):05d}.tmp'
      save_file(current, os.fspath(out / tmp), metadata={'format': 'pt'})
      tmp_names.append(tmp)
      for name in current:
        weight_map[name] = len(tmp_names) - 1
      current, current_bytes = {}, 0

  for name, array in tensors:
    if current and current_bytes + array.nbytes > max_shard_bytes:
      flush()
    current[name] = array
    current_bytes += array.nbytes
    total += array.nbytes
  flush()
  n = len(tmp_names)
  names = [f'model-{k + 1:05d}-of-{n:05d}.safetensors' for k in range(n)]
  for tmp, final in zip(tmp_names, names):
    os.replace(out / tmp, out / final)
  index = {
      'metadata': {'total_size': total},
      'weight_map': {t: names[k] for t, k in sorted(weight_map.items())},
  }
  (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
  return names


def model_from_flat_params(cfg: model_lib.ModelConfig, flat: dict[str, Any]) -> model_lib.Llama4:
  """Builds a model whose parameters are the given flat arrays (host or device)."""
  import jax.numpy as jnp
  from flax import nnx

  from llama4_jax import checkpoint

  graphdef, state = nnx.split(model_lib.abstract_model(cfg))
  state = checkpoint.unflatten_tree(state, {k: jnp.asarray(v) for k, v in flat.items()})
  return nnx.merge(graphdef, state)


def load_hf_model(hf_dir: str, **overrides) -> model_lib.Llama4:
  """An HF text checkpoint as a model in memory (small models; tests, quick looks)."""
  reader = HFCheckpointReader(hf_dir)
  reader.check_names_and_shapes()
  cfg = reader.config.replace(**overrides) if overrides else reader.config
  dtype = np.dtype(cfg.param_dtype) if cfg.param_dtype != 'bfloat16' else None
  return model_from_flat_params(cfg, dict(iter_our_params(reader, cfg, dtype)))


# Whole conversions -----------------------------------------------------------------


def hf_to_workdir(hf_dir: str, workdir: str, base_config=None):
  """Converts an HF checkpoint into `workdir` (config.json + checkpoints/0), streaming, and
  copies its tokenizer files (tokenizer.json and side files) into <workdir>/tokenizer."""
  from llama4_jax import checkpoint, config_lib
  from llama4_jax.data import tokenizer as tokenizer_lib

  reader = HFCheckpointReader(hf_dir)
  reader.check_names_and_shapes()
  stored_dtype = reader.get(GLOBAL_RULES['embed'].hf_suffix).dtype
  cfg = reader.config.replace(
      param_dtype=str(stored_dtype)
      if stored_dtype.name in ('float32', 'bfloat16', 'float16')
      else 'float32'
  )
  config = base_config if base_config is not None else config_lib.base_config()
  with config.unlocked():
    config.model = dataclasses.asdict(cfg)
  checkpoint.write_params_streaming(checkpoint.step_path(workdir, 0), iter_our_params(reader, cfg))
  tokenizer_lib.copy_tokenizer_files(hf_dir, str(epath.Path(workdir) / tokenizer_lib.TOKENIZER_DIR))
  config_lib.save(config, workdir)  # last: a workdir with a config is a finished conversion
  return cfg


def workdir_to_hf(
    workdir: str, hf_dir: str, step: int | None = None, max_shard_bytes: int = 5 << 30
) -> list[str]:
  """Exports a workdir's checkpoint as HF safetensors + config.json, one tensor at a time,
  with the workdir's released tokenizer files if it has them."""
  from llama4_jax import checkpoint, config_lib
  from llama4_jax.data import tokenizer as tokenizer_lib

  cfg = config_lib.model_config(config_lib.load(workdir))
  path, _ = checkpoint.resolve_checkpoint(workdir, step)
  out = epath.Path(hf_dir)
  existing = (
      [p.name for p in out.glob('*') if p.name.endswith('.safetensors') or p.name == 'config.json']
      if out.exists()
      else []
  )
  if existing:  # new shards beside old ones would leave a mixed, stale checkpoint
    raise FileExistsError(
        f'{hf_dir} already holds a checkpoint ({", ".join(sorted(existing)[:3])}'
        f'{", ..." if len(existing) > 3 else ""}); give an empty or new --hf_dir'
    )
  tensors = iter_hf_tensors(lambda name: checkpoint.read_param(path, name), cfg)
  files = write_safetensors(hf_dir, tensors, max_shard_bytes)
  config_json = hf_config(cfg)
  config_json['torch_dtype'] = cfg.param_dtype
  (epath.Path(hf_dir) / 'config.json').write_text(json.dumps(config_json, indent=2))
  tokenizer_lib.copy_tokenizer_files(str(epath.Path(workdir) / tokenizer_lib.TOKENIZER_DIR), hf_dir)
  return files
