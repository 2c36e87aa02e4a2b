"""Helpers for config files: preset expansion and the `:arg` string parser."""

import dataclasses

import ml_collections as mlc

from llama4_jax import model as model_lib


def model_preset(name: str, **overrides) -> mlc.ConfigDict:
  """A ModelConfig preset expanded into a ConfigDict, so every field is overridable."""
  if name not in model_lib.PRESETS:
    raise ValueError(f'unknown model preset {name!r}; presets are {sorted(model_lib.PRESETS)}')
  fields = dataclasses.asdict(model_lib.PRESETS[name].replace(**overrides))
  return mlc.ConfigDict(fields)


def parse_arg(arg: str | None, **spec) -> mlc.ConfigDict:
  """Parses 'a=1,b,c=x' against typed defaults: `parse_arg(arg, runlocal=False, lr=1e-3)`.

  A bare name sets a boolean to True; unknown names are an error.
  """
  out = mlc.ConfigDict(spec)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in spec:
      raise ValueError(f'config arg {key!r} is unknown; known: {sorted(spec)}')
    default = spec[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ('', '1', 'true', 'yes')
    else:
      out[key] = type(default)(value)
  return out
