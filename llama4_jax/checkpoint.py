"""Every Orbax call of the project (Orbax v1 API, orbax-checkpoint 0.12.8).

A workdir holds `config.json` (the resolved config) and `checkpoints/<step>/`.
Each checkpoint's `state` pytree is a dict of flat dicts keyed by dotted
parameter names (`stages.0.layers.1.attn.q_proj.w`):
`{'params': {...}, 'opt_state': {...}, 'step': int, 'data': {process: iterator state}}`
for training runs (the data entry: each process's input-iterator state, as JSON) and
`{'params': {...}}` for converted checkpoints. Flat names keep checkpoints
readable, let one leaf be loaded alone, and let a converter write a checkpoint
one tensor at a time (`write_params_streaming`).
"""

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.experimental import v1 as ocp

from llama4_jax import host_memory

CHECKPOINT_DIR = 'checkpoints'
STATE = 'state'  # the checkpointable holding the pytree (Orbax's default name)
UNREADABLE_SUFFIX = '.unreadable'  # a skipped checkpoint is kept under <step>.unreadable
READ_RETRIES = 3  # a failed checkpoint read is tried again this many times (`read_newest`)
RETRY_DELAY_S = 1.0  # ... after waits of 1, 2, 4 s: a storage hiccup, not an outage


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or written; the message names its step or path."""


class ModelMismatchError(ValueError):
  """A readable checkpoint of another model (names or shapes differ from the config)."""


def _reason(e: Exception, limit: int = 300) -> str:
  """An exception as one short line (Orbax/tensorstore messages carry whole specs)."""
  text = ' '.join(str(e).split())
  text = text if len(text) <= limit else text[:limit] + '...'
  return f'{type(e).__name__}: {text}' if not isinstance(e, (OSError, CheckpointError)) else text


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
    raise ModelMismatchError(
        f'checkpoint does not match the model: missing {missing[:5]}, ' f'unexpected {extra[:5]}'
    )
  treedef = jax.tree_util.tree_structure(template)
  return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def abstract_flat(tree, shardings=None) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat ShapeDtypeStructs (with shardings when given) to load a tree into."""
  flat = flatten_tree(tree)
  shards = flatten_tree(shardings) if shardings is not None else {}
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {
      name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shards.get(name, default))
      for name, x in flat.items()
  }


# Whole checkpoints ----------------------------------------------------------


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint step of a workdir, or None."""
  steps = all_steps(workdir)
  return steps[-1] if steps else None


def all_steps(workdir: str) -> list[int]:
  root = checkpoint_root(workdir)
  if not root.exists():
    return []
  return sorted(
      int(p.name) for p in root.iterdir() if p.name.isdigit() and ocp.is_orbax_checkpoint(p)
  )


def step_path(workdir: str, step: int) -> epath.Path:
  return checkpoint_root(workdir) / str(step)


def saved_steps(workdir: str) -> list[int]:
  """`all_steps`, but none is an error naming the checkpoint folder."""
  steps = all_steps(workdir)
  if not steps:
    raise FileNotFoundError(f'{checkpoint_root(workdir)}: no complete checkpoint')
  return steps


class Processes(NamedTuple):
  """This process among the run's: its index, and an all-gather of a small int array (returns
  [processes, ...] in process order); None with one process, which has nothing to exchange.
  `run_processes()` gives the run's; tests pass simulated ones."""

  index: int = 0
  allgather: Callable[[np.ndarray], np.ndarray] | None = None


def run_processes() -> Processes:
  if jax.process_count() == 1:
    return Processes()
  return Processes(jax.process_index(), lambda x: np.asarray(multihost_utils.process_allgather(x)))


def _failed_processes(step: int, ok: bool, processes: Processes) -> list[int]:
  """The processes that could not read `step`; every process calls this at the same point."""
  if processes.allgather is None:
    return [] if ok else [processes.index]
  table = np.asarray(processes.allgather(np.array([step, ok], np.int32))).reshape(-1, 2)
  if len(set(table[:, 0].tolist())) > 1:  # each lists the checkpoints itself
    raise CheckpointError(
        f'processes see different checkpoints (the step each one tries: {table[:, 0].tolist()})'
    )
  return [i for i, (_, read) in enumerate(table.tolist()) if not read]


def read_newest(
    workdir: str,
    steps: Sequence[int],
    read: Callable[[int], Any],
    *,
    retries: int | None = None,
    retry_delay: float | None = None,
    processes: Processes | None = None,
):
  """(step, read(step), newer unreadable steps) for the newest of `steps` that `read` reads;
  None if there are no steps.

  A read that fails (CheckpointError) is tried again `retries` times (READ_RETRIES) after
  waits of `retry_delay` (RETRY_DELAY_S), doubling each time. Every failure is retried: the
  exception does not tell a storage timeout from a damaged file (tensorstore raises
  ValueError for both, with the status in the message), and a damaged checkpoint only costs
  the waits. A checkpoint that still cannot be read is skipped with a warning naming its
  step; if none can be read this raises CheckpointError listing each step and why.

  With several processes (`processes`, default the run's), all try the same steps in the same
  order and exchange after each attempt whether it succeeded: a step counts as read only if
  every process read it, and as unreadable for all if any process cannot read it after the
  retries. A resume needs every process's shards, so all resume from the same step, and no
  process moves on (or sets a step aside) alone. One process exchanges nothing.
  """
  retries = READ_RETRIES if retries is None else retries
  if retries < 0:
    raise ValueError(f'retries={retries}: must be 0 or more')
  retry_delay = RETRY_DELAY_S if retry_delay is None else retry_delay
  processes = processes or run_processes()
  unreadable = []
  for step in reversed(steps):
    for attempt in range(retries + 1):
      try:
        value, error = read(step), None
      except CheckpointError as e:
        value, error = None, e
      failed = _failed_processes(step, error is None, processes)
      if not failed:
        return step, value, [s for s, _ in unreadable]
      value = None  # read here but not by every process: dropped, all resume from one step
      error = error or CheckpointError(f'processes {failed} cannot read it')
      if attempt < retries:
        wait = retry_delay * 2**attempt
        logging.warning(
            'checkpoint step %d: read failed, trying again in %.1f s (%d of %d): %s',
            *(step, wait, attempt + 1, retries, error),
        )
        time.sleep(wait)
    logging.warning('checkpoint step %d cannot be read, trying an older one: %s', step, error)
    unreadable.append((step, error))
  if unreadable:
    raise CheckpointError(
        f'{checkpoint_root(workdir)}: no checkpoint can be read; '
        + '; '.join(f'step {s}: {e}' for s, e in unreadable)
    )
  return None


def set_aside(workdir: str, steps: Sequence[int], processes: Processes | None = None):
  """Renames unreadable checkpoints to <step>.unreadable (kept for inspection).

  `steps` are ones every process found unreadable (`read_newest`): process 0 renames them
  and the others wait for it, so that none lists the checkpoints halfway; a failed rename is
  raised on every process.
  """
  if not steps:
    return
  processes = processes or run_processes()
  error = None
  if processes.index == 0:
    try:
      for step in steps:
        path = step_path(workdir, step)
        aside, n = path.parent / f'{step}{UNREADABLE_SUFFIX}', 1
        while aside.exists():
          aside, n = path.parent / f'{step}{UNREADABLE_SUFFIX}{n}', n + 1
        path.rename(aside)
        logging.warning('unreadable checkpoint step %d moved to %s', step, aside)
    except OSError as e:
      error = e
  if processes.allgather is not None:  # the wait for process 0, and its outcome
    renamed = processes.allgather(np.array([error is None], np.int32))
    if not np.asarray(renamed).reshape(-1)[0] and error is None:
      error = OSError('process 0 could not move them aside')
  if error is not None:
    raise CheckpointError(f'could not set aside unreadable checkpoints {list(steps)}: {error}')


def resolve_checkpoint(workdir: str, step: int | None = None) -> tuple[epath.Path, int]:
  """(directory, step) of checkpoint `step` (default: the newest complete one)."""
  steps = saved_steps(workdir)
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f'{workdir}: no checkpoint for step {step}; saved steps: {steps}')
  return step_path(workdir, step), step


def load_params(path, abstract_params: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  """Loads only the flat `params` of a checkpoint directory (any other entry is skipped)."""
  path = epath.Path(path)
  if not ocp.is_orbax_checkpoint(path):
    raise FileNotFoundError(f'{path} is not an Orbax checkpoint')
  saved = _saved_tree(path)
  if 'params' not in saved:
    raise ValueError(f'{path}: checkpoint has no "params" (entries: {sorted(saved)})')
  _check_matches(path, saved['params'], abstract_params)
  abstract = {
      key: (abstract_params if key == 'params' else jax.tree.map(lambda _: ocp.PLACEHOLDER, value))
      for key, value in saved.items()
  }
  try:
    return ocp.load(path, abstract, checkpointable_name=STATE)['params']
  except Exception as e:  # tensorstore and Orbax raise many types for a damaged file
    raise CheckpointError(f'{path}: unreadable checkpoint ({_reason(e)})') from e


def _saved_tree(path: epath.Path) -> Mapping[str, Any]:
  """The checkpoint's tree of leaf metadata; CheckpointError if its files are damaged.

  Orbax's metadata files are JSON: a truncated one is named here, before Orbax
  half-reads the checkpoint (it returns None for a broken tree, or fails with
  pending reads that flood the log).
  """
  state = path / STATE
  json_files = [state / name for name in ('_METADATA', '_sharding', '_strings.json')]
  for file in json_files + list((state / 'array_metadatas').glob('*')):
    if file.exists():  # a missing file is Orbax's to judge (some are optional)
      try:
        json.loads(file.read_text())
      except (ValueError, OSError) as e:
        raise CheckpointError(f'{file}: damaged checkpoint file ({_reason(e)})') from e
  try:
    saved = ocp.metadata(path, checkpointable_name=STATE).metadata
  except Exception as e:  # a missing file surfaces as one of several Orbax errors
    raise CheckpointError(f'{path}: unreadable checkpoint ({_reason(e)})') from e
  if not isinstance(saved, Mapping):
    raise CheckpointError(f'{path}: unreadable checkpoint (no tree metadata)')
  return saved


def load_params_tree(path, abstract_params, shardings=None):
  """A checkpoint's params in the structure (and shardings) of `abstract_params`."""
  flat = load_params(path, abstract_flat(abstract_params, shardings))
  return unflatten_tree(abstract_params, flat)


def _check_matches(path, saved: Mapping, abstract: Mapping):
  missing = sorted(set(abstract) - set(saved))
  extra = sorted(set(saved) - set(abstract))
  if missing or extra:
    raise ModelMismatchError(
        f'{path}: parameters do not match the model config: '
        f'missing {missing[:5]}{"..." if len(missing) > 5 else ""}, '
        f'unexpected {extra[:5]}{"..." if len(extra) > 5 else ""}'
    )
  for name, spec in abstract.items():
    if tuple(saved[name].shape) != tuple(spec.shape):
      raise ModelMismatchError(
          f'{path}: parameter {name} has shape {tuple(saved[name].shape)} in '
          f'the checkpoint but {tuple(spec.shape)} in the model config'
      )


def read_param(path, name: str) -> np.ndarray:
  """Loads one parameter of a checkpoint to host memory (for streaming export)."""
  path = epath.Path(path)
  saved = _saved_tree(path)
  abstract = jax.tree.map(lambda _: ocp.PLACEHOLDER, saved)
  meta = saved['params'][name]
  abstract['params'][name] = jax.ShapeDtypeStruct(
      meta.shape, meta.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  )
  try:
    return np.asarray(ocp.load(path, abstract, checkpointable_name=STATE)['params'][name])
  except Exception as e:  # tensorstore and Orbax raise many types for a damaged file
    raise CheckpointError(f'{path}: unreadable checkpoint ({_reason(e)})') from e


def param_names(path) -> dict[str, Any]:
  """{name: metadata with .shape and .dtype} of a checkpoint's params."""
  return dict(_saved_tree(epath.Path(path))['params'])


PARTIAL_SAVE_SUFFIX = '.partial_save'  # where Orbax stages a partial save before finalize


def write_params_streaming(
    path, named_arrays: Iterable[tuple[str, np.ndarray]], group_bytes: int = 4 << 20
):
  """Writes a params-only checkpoint a few arrays at a time, then commits it.

  Orbax's partial save stages each group in a temporary directory and
  `finalize` moves the finished checkpoint into place, so a crash leaves no
  half-written checkpoint at `path`. Small arrays are saved in groups of about
  `group_bytes` (one partial save costs ~0.2 s, which dominated converting
  small models), a large one as soon as it arrives: host memory holds one
  group or one large array.
  """
  path = epath.Path(path)
  if path.exists():
    raise FileExistsError(f'{path} exists; refusing to overwrite a checkpoint')
  path.parent.mkdir(parents=True, exist_ok=True)
  # What a write killed before its finalize left (Orbax refuses to add to it): start afresh.
  staged = path.parent / f'{path.name}{PARTIAL_SAVE_SUFFIX}'
  if staged.exists():
    logging.warning('%s: removing the partial save a killed write left', staged)
    staged.rmtree()
  group, size = {}, 0

  def flush():
    nonlocal group, size
    if group:
      ocp.partial.save(path, {'params': group})
      group, size = {}, 0
      host_memory.release_freed_memory()

  for name, array in named_arrays:
    group[name] = array
    size += array.nbytes
    del array
    if size >= group_bytes:  # now, before the next array is made
      flush()
  flush()
  ocp.partial.finalize(path)


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
  interrupted save are removed on the next start. A save that fails (a full
  disk) raises CheckpointError at the next save or wait; a checkpoint that
  cannot be read is skipped by `restore_latest`.
  """

  def __init__(
      self,
      workdir: str,
      keep: int,
      *,
      read_retries: int | None = None,
      retry_delay: float | None = None,
      processes: Processes | None = None,
  ):
    """`read_retries`, `retry_delay` and `processes` are `read_newest`'s, for `restore_latest`."""
    from orbax.checkpoint.experimental.v1 import training

    self._ckpt = training.Checkpointer(
        checkpoint_root(workdir),
        save_decision_policy=_AlwaysSave(),
        preservation_policy=training.preservation_policies.LatestN(keep),
        cleanup_tmp_directories=True,
    )
    self.workdir = workdir
    self._read = dict(retries=read_retries, retry_delay=retry_delay, processes=processes)
    self._pending = None  # the step of the save in flight

  def steps(self) -> list[int]:
    """Steps of the committed checkpoints, oldest first."""
    return [int(c.step) for c in self._ckpt.checkpoints]

  def latest_step(self) -> int | None:
    latest = self._ckpt.latest
    return None if latest is None else int(latest.step)

  def save(self, step: int, train_state: Mapping, data_states: list[str]):
    """Starts an asynchronous save (returns once the arrays are copied off device).

    Waits for the previous save first (Orbax would too) so that a failure is
    reported with the step it belongs to.
    """
    self.wait()
    tree = {
        'params': flatten_tree(train_state['params']),
        'opt_state': flatten_tree(train_state['opt_state']),
        'step': train_state['step'],
        'data': {str(i): s for i, s in enumerate(data_states)},
    }
    try:
      self._ckpt.save_async(step, tree, force=True)
    except Exception as e:  # an OSError, or whatever Orbax wraps it in
      raise self._save_error(step, e) from e
    self._pending = step

  def _save_error(self, step: int | None, e: Exception) -> CheckpointError:
    steps = all_steps(self.workdir)  # what is on disk now
    kept = (
        f'complete checkpoints {steps} are intact (a rerun resumes from step {steps[-1]})'
        if steps
        else 'no checkpoint is complete yet'
    )
    what = (
        f'could not write checkpoint step {step} to {step_path(self.workdir, step)}'
        if step is not None
        else f'checkpointing in {checkpoint_root(self.workdir)} failed'
    )
    return CheckpointError(f'{what}: {_reason(e)}; {kept}')

  def restore(self, step: int, abstract_state: Mapping, shardings: Mapping):
    """Returns (train state in `abstract_state`'s structure and shardings, data states).

    Raises CheckpointError if the checkpoint cannot be read (a file truncated or
    missing) and ModelMismatchError if it holds another model.
    """
    path = step_path(self.workdir, step)
    saved = _saved_tree(path)
    if not {'params', 'opt_state', 'step', 'data'} <= set(saved):
      raise CheckpointError(
          f'{path}: not a complete training checkpoint ' f'(entries: {sorted(saved)})'
      )
    abstract = {
        'params': abstract_flat(abstract_state['params'], shardings['params']),
        'opt_state': abstract_flat(abstract_state['opt_state'], shardings['opt_state']),
        'step': jax.ShapeDtypeStruct((), abstract_state['step'].dtype, sharding=shardings['step']),
        'data': {k: '' for k in saved['data']},
    }
    _check_matches(path, saved['params'], abstract['params'])
    _check_matches(path, saved['opt_state'], abstract['opt_state'])
    try:
      tree = self._ckpt.load(step, abstract)
    except Exception as e:  # tensorstore and Orbax raise many types for a damaged file
      raise CheckpointError(f'{path}: unreadable checkpoint ({_reason(e)})') from e
    if int(jax.device_get(tree['step'])) != step:
      raise CheckpointError(f'{path}: holds step {int(jax.device_get(tree["step"]))}, not {step}')
    state = {
        'params': unflatten_tree(abstract_state['params'], tree['params']),
        'opt_state': unflatten_tree(abstract_state['opt_state'], tree['opt_state']),
        'step': tree['step'],
    }
    return state, [tree['data'][str(i)] for i in range(len(tree['data']))]

  def restore_latest(self, abstract_state: Mapping, shardings: Mapping):
    """(step, train state, data states) of the newest checkpoint that can be read; None if none.

    A read that fails is retried; a newer checkpoint that still cannot be read (a truncated
    or deleted file) is skipped with a warning naming its step, and moved aside to
    `<step>.unreadable` so that the run can save that step again. With several processes,
    they agree on both (`read_newest`, `set_aside`). If no checkpoint can be read this raises
    CheckpointError: starting from scratch would silently throw the run away.
    """
    found = read_newest(
        self.workdir,
        self.steps(),
        lambda s: self.restore(s, abstract_state, shardings),
        **self._read,
    )
    if found is None:
      return None
    step, (state, data_states), unreadable = found
    if unreadable:
      set_aside(self.workdir, unreadable, self._read['processes'])
      self._ckpt.reload()
    return step, state, data_states

  def wait(self):
    """Blocks until the save in flight is committed; CheckpointError if it failed."""
    step, self._pending = self._pending, None
    try:
      self._ckpt.wait()
    except Exception as e:
      raise self._save_error(step, e) from e

  def close(self):
    self.wait()
    self._ckpt.close()
