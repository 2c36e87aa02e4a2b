"""Logical axis names, the one rules table that maps them to mesh axes, and the mesh.

Parameters carry logical names where they are created (`param(value, names)`);
activations get hints through `shard(x, *names)`. Neither ever names a mesh
axis: `LOGICAL_RULES` is the only place where `embed` becomes `fsdp`.
"""

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')

# The batch is split over every axis that does not split the model's weights
# on the activations' batch dimension.
BATCH_AXES = ('data', 'fsdp', 'expert')

LOGICAL_RULES = (
    # Parameters.
    ('vocab', 'tensor'),  # embedding rows and lm_head columns
    ('embed', 'fsdp'),  # model width D: FSDP shards every weight along it
    ('q_heads', 'tensor'),  # query heads N
    ('kv_heads', 'tensor'),  # key/value heads K
    ('head_dim', None),  # H
    ('mlp', 'tensor'),  # MLP / expert hidden width F
    ('expert', 'expert'),  # expert index E
    ('layers', None),  # the scanned layer axis
    ('norm', None),  # norm scales
    # Activations.
    ('act_batch', BATCH_AXES),
    ('act_seq', None),
    # The residual stream between layers, split over `tensor` as MaxText does: each tensor
    # shard would otherwise hold its batch rows whole (Maverick at 4 sequences per chip and
    # tensor 4: 16 sequences of [8192, 5120]). A layer gathers it for its projections and
    # reduce-scatters its output (Megatron's sequence parallelism, on the model dimension).
    ('act_embed', 'tensor'),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
)


def mesh_shape(shape: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of `MESH_AXES` for `num_devices`; one size in `shape` may be -1 (the rest)."""
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'mesh: unknown axes {sorted(unknown)}; axes are {MESH_AXES}')
  sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
  given = dict(zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh: at most one axis may be -1, got {given}')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh: sizes must be positive or -1, got {given}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f'mesh: {num_devices} devices are not divisible by the fixed axes '
          f'{given} (product {known})'
      )
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
        f'mesh: {given} needs {int(np.prod(sizes))} devices, but {num_devices} ' f'are available'
    )
  return tuple(sizes)


def make_mesh(shape: dict[str, int], devices=None) -> jax.sharding.Mesh:
  """Builds a mesh over `MESH_AXES` (see mesh_shape).

  Axes are Auto (GSPMD): jax 0.10 defaults to Explicit, under which the
  logical-rules style needs an out_sharding on every ambiguous op.

  Devices of several TPU slices (multi-slice) put the slices on the `data` axis: only its
  gradient reduction crosses the data-centre network between slices, every other axis stays
  inside a slice's interconnect. `mesh.data` must then be a multiple of the slice count.
  """
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(shape, len(devices))
  axis_types = (AxisType.Auto,) * len(sizes)
  num_slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if num_slices == 1:
    return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)
  data = MESH_AXES.index('data')
  if sizes[data] % num_slices:
    raise ValueError(
        f'mesh: the devices span {num_slices} slices, which go on the data axis, but data is '
        f'{sizes[data]} (set config.mesh.data to a multiple of {num_slices})'
    )
  per_slice = list(sizes)
  per_slice[data] //= num_slices
  between_slices = [num_slices if i == data else 1 for i in range(len(sizes))]
  devices_array = mesh_utils.create_hybrid_device_mesh(per_slice, between_slices, devices)
  return jax.sharding.Mesh(devices_array, MESH_AXES, axis_types=axis_types)


_platform = contextvars.ContextVar('platform', default=None)


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh):
  """Runs the enclosed code on `mesh` with `LOGICAL_RULES` for the logical names."""
  token = _platform.set(mesh.devices.flat[0].platform)
  try:
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
      yield mesh
  finally:
    _platform.reset(token)


def platform() -> str:
  """The platform the code being traced is compiled for: the current mesh's devices' ('tpu'
  for a TPU topology the fit check compiles for on a CPU machine), else JAX's default backend.
  Kernel choices (the MoE grouped matmul and its interpret mode) follow it."""
  return _platform.get() or jax.default_backend()


def batch_shards(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None) -> int:
  """How many ways the batch dimension is split: on `mesh`, else on the current mesh."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty:
    return 1
  return math.prod(dict(mesh.shape).get(a, 1) for a in BATCH_AXES)


def fill_batch_shards(rows: int, shards: int) -> int:
  """An evaluation batch of `rows`, rounded up to fill the mesh's batch shards (the extra
  rows are padding of weight 0)."""
  return -(-rows // shards) * shards


def param(value: jax.Array, names: tuple[str | None, ...]) -> nnx.Param:
  """A parameter with logical axis names, one per dimension.

  It is not placed where it is created: a jitted init places it through out_shardings
  computed from its names (`state_shardings`), so the same modules also build without a
  mesh (unit tests, conversion, eval_shape).
  """
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def logical_to_spec(names: Sequence[str | None], rules=LOGICAL_RULES) -> P:
  """Maps logical axis names to a PartitionSpec through `rules`."""
  table = dict(rules)
  unknown = [n for n in names if n is not None and n not in table]
  if unknown:
    raise KeyError(f'logical axis names {unknown} are not in the sharding rules')
  return P(*(table[n] if n is not None else None for n in names))


def fit_spec(spec: P, shape: tuple[int, ...], mesh_shape: dict[str, int]) -> P:
  """Replicates each dimension that its mesh axes, all together, do not divide.

  E.g. 2 kv heads on a tensor axis of 4: the heads are replicated rather than
  making the whole layout impossible.
  """
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    names = tuple(a for a in names if mesh_shape.get(a, 1) > 1)
    size = int(np.prod([mesh_shape[a] for a in names])) if names else 1
    fitted.append(None if not names or dim % size else (names[0] if len(names) == 1 else names))
  return P(*fitted)


def current_spec(names: Sequence[str | None], shape: tuple[int, ...]) -> P:
  """The PartitionSpec of an array of `shape` with logical `names` on the current mesh, under
  the active rules (what `state_shardings` gives a parameter of those names)."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = spmd.get_logical_axis_rules() or LOGICAL_RULES
  return fit_spec(logical_to_spec(names, rules), shape, dict(mesh.shape))


def shard(x: jax.Array, *names: str | None) -> jax.Array:
  """Hints the sharding of activation `x` by logical names (no-op without a mesh)."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, current_spec(names, x.shape))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
  """The sharding of input batches: leading axis over the batch axes."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def process_batch_rows(
    mesh: jax.sharding.Mesh, global_rows: int, process_index: int | None = None
) -> np.ndarray:
  """The rows of a global batch of `global_rows` that a process feeds (default: this one):
  those its devices hold under `batch_sharding`, in order, as `to_global_batch` places them.

  A block of global_rows / process_count when the batch axes alone span the processes. Where a
  model axis spans them too (Maverick's tensor axis of 4 over v5p hosts of 4 chips), a
  process holds rows far apart, the same as its peers on that axis, and feeds them alike.
  """
  process_index = jax.process_index() if process_index is None else process_index
  held = set()
  row_slices = batch_sharding(mesh, 1).devices_indices_map((global_rows,))
  for device, (row_slice,) in row_slices.items():
    if device.process_index == process_index:
      held.update(range(*row_slice.indices(global_rows)))
  return np.array(sorted(held), np.int64)


def to_global_batch(
    local_batch: dict[str, np.ndarray], batch_sharding, global_rows: int | None = None
) -> dict[str, jax.Array]:
  """This process's rows of a global batch of `global_rows` (its `process_batch_rows`; None:
  one process feeds them all) -> global arrays sharded over the batch axes."""
  return {
      k: jax.make_array_from_process_local_data(
          batch_sharding, v, None if global_rows is None else (global_rows, *v.shape[1:])
      )
      for k, v in local_batch.items()
  }


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a state pytree: nnx Variables by their logical names, the rest replicated."""

  def one(x):
    if isinstance(x, nnx.Variable):
      names = x.get_metadata().get('out_sharding')
      spec = fit_spec(logical_to_spec(names, rules), x.shape, dict(mesh.shape)) if names else P()
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def put_on_mesh(module: nnx.Module, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES) -> nnx.Module:
  """The module with every variable placed by its logical sharding on `mesh`."""
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh, rules)))
