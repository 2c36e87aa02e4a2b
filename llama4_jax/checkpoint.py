"""Every Orbax call of the project (Orbax v1 API, orbax-checkpoint 0.12.8).

A workdir holds `config.json` (the resolved config) and `checkpoints/<step>/`.
Each checkpoint's `state` pytree is a dict of flat dicts keyed by dotted
parameter names (`stages.0.layers.1.attn.q_proj.w`):
`{'params': {...}, 'opt_state': {...}, 'step': int}` for training runs and
`{'params': {...}}` for converted checkpoints. Flat names keep checkpoints
readable, let one leaf be loaded alone, and let a converter write a checkpoint
one tensor at a time (`write_params_streaming`).
"""

import ctypes
import gc
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from orbax.checkpoint.experimental import v1 as ocp

CHECKPOINT_DIR = 'checkpoints'
STATE = 'state'  # the checkpointable holding the pytree (Orbax's default name)


def checkpoint_root(workdir: str) -> epath.Path:
  return epath.Path(workdir) / CHECKPOINT_DIR


# Flat names <-> nnx.State ------------------------------------------------------


def flatten(tree: Mapping, prefix: str = '') -> dict[str, Any]:
  """Nested dict (str/int keys) -> {'a.0.b': leaf}."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def unflatten_into(state: nnx.State, flat: Mapping[str, Any]) -> nnx.State:
  """Returns `state` with its leaves replaced by the values of the flat dict."""
  template = flatten(nnx.to_pure_dict(state))
  missing, extra = sorted(set(template) - set(flat)), sorted(set(flat) - set(template))
  if missing or extra:
    raise ValueError(f'checkpoint does not match the model: missing {missing[:5]}, '
                     f'unexpected {extra[:5]}')
  nested: dict = {}
  for name, value in flat.items():
    node = nested
    *parents, leaf = name.split('.')
    for part in parents:
      node = node.setdefault(int(part) if part.isdigit() else part, {})
    node[int(leaf) if leaf.isdigit() else leaf] = value
  state = jax.tree.map(lambda x: x, state)  # copy, so the caller's state is untouched
  nnx.replace_by_pure_dict(state, nested)
  return state


def abstract_flat(state: nnx.State, shardings=None) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat ShapeDtypeStructs (with shardings when given) to load a state into."""
  flat = flatten(nnx.to_pure_dict(state))
  shards = flatten(nnx.to_pure_dict(shardings)) if shardings is not None else {}
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shards.get(name, default))
          for name, x in flat.items()}


# Whole checkpoints ----------------------------------------------------------


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint step of a workdir, or None."""
  steps = all_steps(workdir)
  return steps[-1] if steps else None


def all_steps(workdir: str) -> list[int]:
  root = checkpoint_root(workdir)
  if not root.exists():
    return []
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and ocp.is_orbax_checkpoint(p))


def step_path(workdir: str, step: int) -> epath.Path:
  return checkpoint_root(workdir) / str(step)


def load_params(path, abstract_params: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  """Loads only the flat `params` of a checkpoint directory (any other entry is skipped)."""
  path = epath.Path(path)
  if not ocp.is_orbax_checkpoint(path):
    raise FileNotFoundError(f'{path} is not an Orbax checkpoint')
  saved = ocp.pytree_metadata(path, checkpointable_name=STATE).metadata
  if 'params' not in saved:
    raise ValueError(f'{path}: checkpoint has no "params" (entries: {sorted(saved)})')
  _check_matches(path, saved['params'], abstract_params)
  abstract = {key: (abstract_params if key == 'params' else
                    jax.tree.map(lambda _: ocp.PLACEHOLDER, value))
              for key, value in saved.items()}
  return ocp.load(path, abstract, checkpointable_name=STATE)['params']


def _check_matches(path, saved: Mapping, abstract: Mapping):
  missing = sorted(set(abstract) - set(saved))
  extra = sorted(set(saved) - set(abstract))
  if missing or extra:
    raise ValueError(f'{path}: parameters do not match the model config: '
                     f'missing {missing[:5]}{"..." if len(missing) > 5 else ""}, '
                     f'unexpected {extra[:5]}{"..." if len(extra) > 5 else ""}')
  for name, spec in abstract.items():
    if tuple(saved[name].shape) != tuple(spec.shape):
      raise ValueError(f'{path}: parameter {name} has shape {tuple(saved[name].shape)} in the '
                       f'checkpoint but {tuple(spec.shape)} in the model config')


def read_param(path, name: str) -> np.ndarray:
  """Loads one parameter of a checkpoint to host memory (for streaming export)."""
  path = epath.Path(path)
  saved = ocp.pytree_metadata(path, checkpointable_name=STATE).metadata
  abstract = jax.tree.map(lambda _: ocp.PLACEHOLDER, saved)
  meta = saved['params'][name]
  abstract['params'][name] = jax.ShapeDtypeStruct(
      meta.shape, meta.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0]))
  return np.asarray(ocp.load(path, abstract, checkpointable_name=STATE)['params'][name])


def param_names(path) -> dict[str, Any]:
  """{name: metadata with .shape and .dtype} of a checkpoint's params."""
  return dict(ocp.pytree_metadata(epath.Path(path), checkpointable_name=STATE).metadata['params'])


def write_params_streaming(path, named_arrays: Iterable[tuple[str, np.ndarray]]):
  """Writes a params-only checkpoint one array at a time, then commits it.

  Orbax's partial save stages each array in a temporary directory and
  `finalize` moves the finished checkpoint into place, so a crash leaves no
  half-written checkpoint at `path`, and host memory holds one array at a time.
  """
  path = epath.Path(path)
  if path.exists():
    raise FileExistsError(f'{path} exists; refusing to overwrite a checkpoint')
  path.parent.mkdir(parents=True, exist_ok=True)
  for name, array in named_arrays:
    ocp.partial.save(path, {'params': {name: array}})
    del array
    _release_freed_memory()
  ocp.partial.finalize(path)


def _release_freed_memory():
  """Hands freed heap pages back to the OS (glibc keeps them otherwise, so RSS
  would grow towards the model size although only one tensor is alive)."""
  gc.collect()
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except OSError:  # not glibc
    pass
