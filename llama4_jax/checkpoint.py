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
from orbax.checkpoint.experimental import v1 as ocp

CHECKPOINT_DIR = 'checkpoints'
STATE = 'state'  # the checkpointable holding the pytree (Orbax's default name)


def checkpoint_root(workdir: str) -> epath.Path:
  return epath.Path(workdir) / CHECKPOINT_DIR


# Flat names <-> pytrees -----------------------------------------------------------


def flatten_tree(tree) -> dict[str, Any]:
  """Any pytree (nnx.State, optax state, dicts) -> {'dotted.path': leaf}."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = [str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path]
    if parts and parts[-1] == 'value':  # the array inside an nnx.Variable
      parts.pop()
    out['.'.join(parts)] = leaf
  return out


def unflatten_tree(template, flat: Mapping[str, Any]):
  """`template`'s structure (nnx Variables included) with the leaves of `flat`."""
  names = list(flatten_tree(template))
  missing, extra = sorted(set(names) - set(flat)), sorted(set(flat) - set(names))
  if missing or extra:
    raise ValueError(f'checkpoint does not match the model: missing {missing[:5]}, '
                     f'unexpected {extra[:5]}')
  treedef = jax.tree_util.tree_structure(template)
  return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def abstract_flat(tree, shardings=None) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat ShapeDtypeStructs (with shardings when given) to load a tree into."""
  flat = flatten_tree(tree)
  shards = flatten_tree(shardings) if shardings is not None else {}
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
  saved = ocp.metadata(path, checkpointable_name=STATE).metadata
  if 'params' not in saved:
    raise ValueError(f'{path}: checkpoint has no "params" (entries: {sorted(saved)})')
  _check_matches(path, saved['params'], abstract_params)
  abstract = {key: (abstract_params if key == 'params' else
                    jax.tree.map(lambda _: ocp.PLACEHOLDER, value))
              for key, value in saved.items()}
  return ocp.load(path, abstract, checkpointable_name=STATE)['params']


def load_params_tree(path, abstract_params, shardings=None):
  """A checkpoint's params in the structure (and shardings) of `abstract_params`."""
  flat = load_params(path, abstract_flat(abstract_params, shardings))
  return unflatten_tree(abstract_params, flat)


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
  saved = ocp.metadata(path, checkpointable_name=STATE).metadata
  abstract = jax.tree.map(lambda _: ocp.PLACEHOLDER, saved)
  meta = saved['params'][name]
  abstract['params'][name] = jax.ShapeDtypeStruct(
      meta.shape, meta.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0]))
  return np.asarray(ocp.load(path, abstract, checkpointable_name=STATE)['params'][name])


def param_names(path) -> dict[str, Any]:
  """{name: metadata with .shape and .dtype} of a checkpoint's params."""
  return dict(ocp.metadata(epath.Path(path), checkpointable_name=STATE).metadata['params'])


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


# Training checkpoints -------------------------------------------------------------


class _AlwaysSave:
  """Save decision policy: the training loop decides when to save."""

  def should_save(self, step, previous_steps, *, context):
    del step, previous_steps, context
    return True


class TrainCheckpointer:
  """Periodic, asynchronous, atomic saves of the train state, keeping the newest N.

  The saved pytree is {'params', 'opt_state' (flat dicts), 'step', 'data'}
  where 'data' holds each process's input-iterator state as a JSON string.
  Orbax writes into a temporary directory and renames it on commit, so a crash
  mid-save leaves the previous checkpoints untouched; leftovers of an
  interrupted save are removed on the next start.
  """

  def __init__(self, workdir: str, keep: int):
    from orbax.checkpoint.experimental.v1 import training
    self._ckpt = training.Checkpointer(
        checkpoint_root(workdir), save_decision_policy=_AlwaysSave(),
        preservation_policy=training.preservation_policies.LatestN(keep),
        cleanup_tmp_directories=True)
    self.workdir = workdir

  def latest_step(self) -> int | None:
    latest = self._ckpt.latest
    return None if latest is None else int(latest.step)

  def save(self, step: int, train_state: Mapping, data_states: list[str]):
    """Starts an asynchronous save (returns once the arrays are copied off device)."""
    tree = {'params': flatten_tree(train_state['params']),
            'opt_state': flatten_tree(train_state['opt_state']),
            'step': train_state['step'],
            'data': {str(i): s for i, s in enumerate(data_states)}}
    self._ckpt.save_pytree_async(step, tree, force=True)

  def restore(self, step: int, abstract_state: Mapping, shardings: Mapping):
    """Returns (train state in `abstract_state`'s structure and shardings, data states)."""
    path = step_path(self.workdir, step)
    saved = self._ckpt.metadata(step).metadata
    abstract = {'params': abstract_flat(abstract_state['params'], shardings['params']),
                'opt_state': abstract_flat(abstract_state['opt_state'], shardings['opt_state']),
                'step': jax.ShapeDtypeStruct((), abstract_state['step'].dtype,
                                             sharding=shardings['step']),
                'data': {k: '' for k in saved['data']}}
    _check_matches(path, saved['params'], abstract['params'])
    _check_matches(path, saved['opt_state'], abstract['opt_state'])
    tree = self._ckpt.load_pytree(step, abstract)
    state = {'params': unflatten_tree(abstract_state['params'], tree['params']),
             'opt_state': unflatten_tree(abstract_state['opt_state'], tree['opt_state']),
             'step': tree['step']}
    return state, [tree['data'][str(i)] for i in range(len(tree['data']))]

  def wait(self):
    self._ckpt.wait()

  def close(self):
    self._ckpt.close()
