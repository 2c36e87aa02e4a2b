"""Ahead-of-time fit check: compile the real train step for a mesh of devices it need not have.

The train step of `trainer.compile_steps` (same function, shardings and
donation) is lowered with ShapeDtypeStruct inputs that carry the run's
shardings, so no parameter is ever allocated, and compiled for a mesh of

  * a real TPU slice (`tpu_devices('v5p-256')`): the devices of a topology
    description from libtpu (requirements-compile.txt), compiled by the TPU
    compiler itself, which is what decides whether a program fits: a program
    that does not fit fails to compile, and the report says by how much; or
  * fake CPU devices (`use_fake_cpu_devices`), on any machine: parameter,
    optimizer-state and batch bytes are exact for any backend, but the
    temporaries are what the CPU compiler schedules, only an estimate of a
    TPU or GPU compile, which fuses and schedules differently.

`compiled.memory_analysis()` gives per-device argument, output and temporary
sizes, and `compiled.cost_analysis()` the FLOPs. XLA's FLOP count covers a
scanned loop body once, so the model FLOPs of `flops.py` are reported next to it.
"""

import dataclasses
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from llama4_jax import config_lib, flops, sharding, trainer
from llama4_jax import model as model_lib
from llama4_jax.data import image_text

GiB = 2**30

# Memory per device in GiB (data-sheet sizes; what a program may use is a little less).
ACCELERATORS = {
    'tpu-v5e': 16,
    'tpu-v4': 32,
    'tpu-v6e': 32,
    'a100-40gb': 40,
    'a100-80gb': 80,
    'h100': 80,
    'tpu-v5p': 95,
    'h200': 141,
    'b200': 180,
}

# Below this fraction of an accelerator's memory a config "fits"; above it but
# under 100% it is "tight": allocators, collectives' buffers and the difference
# between the CPU compile and the real one need some headroom.
FIT_FRACTION = 0.9


# TPU slices ---------------------------------------------------------------------

# Chip grids by chip count. v4 and v5p: 3-D tori of two-core chips, named by cores (v5p-256 is
# 128 chips), the two cores of a chip one device ('megacore'); wrap-around links from 64 chips.
# v5e and v6e: 2-D grids of one-core chips, named by chips; a side of 16 wraps around.
_TORUS_3D = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
}
_GRID_2D = {
    1: (1, 1),
    4: (2, 2),
    8: (2, 4),
    16: (4, 4),
    32: (4, 8),
    64: (8, 8),
    128: (8, 16),
    256: (16, 16),
}
# name prefix: (topology prefix, chips per name unit, memory key in ACCELERATORS)
TPU_GENERATIONS = {
    'v4': ('v4', 0.5, 'tpu-v4'),
    'v5p': ('v5', 0.5, 'tpu-v5p'),
    'v5e': ('v5e', 1, 'tpu-v5e'),
    'v6e': ('v6e', 1, 'tpu-v6e'),
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """A TPU slice the TPU compiler can target without one: what `get_topology_desc` needs."""

  name: str  # e.g. v5p-256
  topology: str  # e.g. v5:4x4x8
  chip_config: str  # megacore: a chip's two cores are one device
  wrap: tuple[bool, bool, bool]
  accelerator: str  # its key in ACCELERATORS (memory per chip)

  @property
  def chips(self) -> int:
    return int(np.prod([int(d) for d in self.topology.split(':')[1].split('x')]))


def tpu_slice(name: str) -> TpuSlice:
  """The slice called `name` (v4-N, v5p-N, v5e-N, v6e-N, as Cloud TPU names them)."""
  generation, _, count = name.lower().partition('-')
  if generation not in TPU_GENERATIONS or not count.isdigit():
    raise ValueError(
        f'--topology={name}: not a TPU slice name like v5p-256 or v5e-64 (generations '
        f'{sorted(TPU_GENERATIONS)})'
    )
  prefix, chips_per_unit, accelerator = TPU_GENERATIONS[generation]
  chips = int(int(count) * chips_per_unit)
  grids = _GRID_2D if chips_per_unit == 1 else _TORUS_3D
  if chips not in grids:
    sizes = sorted(int(c / chips_per_unit) for c in grids)
    raise ValueError(f'--topology={name}: unknown size; {generation} sizes are {sizes}')
  grid = grids[chips]
  if chips_per_unit == 1:
    wrap = (grid[0] == 16, grid[1] == 16, False)
  else:
    wrap = (chips >= 64,) * 3
  topology = f'{prefix}:' + 'x'.join(str(d) for d in grid)
  chip_config = 'default' if chips_per_unit == 1 else 'megacore'
  return TpuSlice(name.lower(), topology, chip_config, wrap, accelerator)


def tpu_devices(target: TpuSlice, num_slices: int = 1) -> list:
  """The devices of `num_slices` such slices, from libtpu's topology description."""
  try:
    from jax.experimental import topologies

    description = topologies.get_topology_desc(
        platform='tpu',
        topology_name=target.topology,
        chip_config_name=target.chip_config,
        chips_per_host_bounds=(2, 2, 1),
        num_slices=num_slices,
        wrap=target.wrap,
    )
  except Exception as e:  # no libtpu, or one that does not know the topology
    raise RuntimeError(
        f'cannot describe {target.name} ({target.topology}): {" ".join(str(e).split())[:300]}; '
        f'the TPU compiler comes with libtpu: pip install -r requirements-compile.txt'
    ) from e
  return list(description.devices)


# Fake devices -----------------------------------------------------------------


def use_fake_cpu_devices(num_devices: int):
  """Makes JAX create `num_devices` CPU devices; must run before any device is used."""
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', num_devices)
  if jax.device_count() != num_devices:  # backends were created earlier with another count
    raise RuntimeError(
        f'asked for {num_devices} fake CPU devices but JAX already has '
        f'{jax.device_count()}; set them before anything uses a device'
    )


def truncate_layers(config: mlc.ConfigDict, num_layers: int) -> mlc.ConfigDict:
  """A copy of `config` whose model keeps its first `num_layers` layers (same widths).

  The per-layer patterns (`no_rope_layers`, `moe_layers`) are cut to match, so a
  4-layer Scout or Maverick is one block of the real model.
  """
  model = config.model
  if not 0 < num_layers <= model.num_layers:
    raise config_lib.ConfigError(
        f'config.model.num_layers: cannot cut {model.num_layers} ' f'layers to {num_layers}'
    )
  config = mlc.ConfigDict(config.to_dict())
  config.model.num_layers = num_layers
  config.model.no_rope_layers = tuple(model.no_rope_layers[:num_layers])
  config.model.moe_layers = tuple(i for i in model.moe_layers if i < num_layers)
  return config


# Compiling ----------------------------------------------------------------------


def abstract_batch(config: mlc.ConfigDict, batch_sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The global training batch the data pipeline feeds (`data._to_features`), as shapes."""
  shape = (config.train.batch_size, config.data.seq_len)
  dtypes = {
      'inputs': jnp.int32,
      'targets': jnp.int32,
      'segment_ids': jnp.int32,
      'positions': jnp.int32,
      'weights': jnp.float32,
  }
  batch = {k: jax.ShapeDtypeStruct(shape, d, sharding=batch_sharding) for k, d in dtypes.items()}
  cfg = config_lib.model_config(config)
  tiles = image_text.tiles_per_row(config, cfg)
  if tiles:  # image_text.RowMaker.row
    v = cfg.vision
    batch['pixels'] = jax.ShapeDtypeStruct(
        (shape[0], tiles, v.num_channels, v.image_size, v.image_size),
        jnp.float32,
        sharding=batch_sharding,
    )
  return batch


def _with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs of `abstract_tree` carrying the matching shardings."""
  flat_abstract, treedef = jax.tree.flatten(abstract_tree)
  flat_shardings = jax.tree.leaves(shardings)  # nnx Variables flatten to their value
  assert len(flat_abstract) == len(flat_shardings), (len(flat_abstract), len(flat_shardings))
  return jax.tree.unflatten(
      treedef,
      [
          jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
          for a, s in zip(flat_abstract, flat_shardings)
      ],
  )


@dataclasses.dataclass(frozen=True)
class Compiled:
  """A compiled train step and the abstract inputs it was compiled for."""

  setup: trainer.Setup
  state: dict
  batch: dict
  executable: jax.stages.Compiled


def compile_train_step(config: mlc.ConfigDict, mesh: jax.sharding.Mesh) -> Compiled:
  """Lowers and compiles trainer.train_step for `mesh` from shapes alone."""
  config_lib.validate(config, mesh.size)
  with sharding.mesh_context(mesh):
    setup = trainer.make_setup(config, mesh)
    train_fn, _ = trainer.compile_steps(setup)
    state = _with_shardings(setup.abstract_state, setup.state_shardings)
    batch = abstract_batch(config, setup.batch_sharding)
    executable = train_fn.lower(state, batch).compile()
  return Compiled(setup, state, batch, executable)


# Reporting ----------------------------------------------------------------------


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


@dataclasses.dataclass(frozen=True)
class Report:
  """Per-device memory (bytes) and FLOPs of one compiled train step."""

  devices: int
  mesh: Mapping[str, int]
  num_params: int
  params: int  # parameters
  opt_state: int  # optimizer moments (and counters)
  batch: int  # the input batch
  arguments: int  # all inputs, as XLA counts them
  outputs: int
  aliased: int  # outputs written in place of donated inputs
  temporaries: int  # gradients, activations, collectives' buffers
  xla_flops: float  # XLA's count for one device's program
  model_flops: float  # flops.py: 6 x active params + attention, per device per step

  @property
  def total(self) -> int:
    """Peak per-device footprint: inputs, new outputs (donated ones reuse inputs), temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temporaries


def report(compiled: Compiled) -> Report:
  setup, exe = compiled.setup, compiled.executable
  memory = exe.memory_analysis()
  cost = exe.cost_analysis() or {}  # GPU compiles give none
  config = setup.config
  model_flops = config.train.batch_size * flops.train_flops_per_row(
      setup.cfg, config.data.seq_len, image_text.tiles_per_row(config, setup.cfg)
  )
  return Report(
      devices=setup.mesh.size,
      mesh=dict(setup.mesh.shape),
      num_params=model_lib.count_params(compiled.state['params']),
      params=per_device_bytes(compiled.state['params']),
      opt_state=per_device_bytes(compiled.state['opt_state']),
      batch=per_device_bytes(compiled.batch),
      arguments=memory.argument_size_in_bytes,
      outputs=memory.output_size_in_bytes,
      aliased=memory.alias_size_in_bytes,
      temporaries=memory.temp_size_in_bytes,
      xla_flops=float(cost.get('flops', 0.0)),
      model_flops=model_flops / setup.mesh.size,
  )


def verdict(total_bytes: int, memory_gib: float) -> str:
  used = total_bytes / (memory_gib * GiB)
  if used <= FIT_FRACTION:
    return f'fits ({100 * used:.0f}%)'
  if used <= 1.0:
    return f'tight ({100 * used:.0f}%)'
  return f'does not fit ({100 * used:.0f}%)'


def fits(total_bytes: int, accelerator: str) -> bool:
  return total_bytes <= FIT_FRACTION * ACCELERATORS[accelerator] * GiB


def format_report(r: Report, accelerators: Sequence[str] = tuple(ACCELERATORS)) -> str:
  gib = lambda b: f'{b / GiB:9.2f} GiB'
  lines = [
      f'{r.devices} devices, mesh {dict(r.mesh)}; {r.num_params:,} parameters',
      'per device:',
      f'  parameters       {gib(r.params)}',
      f'  optimizer state  {gib(r.opt_state)}',
      f'  batch            {gib(r.batch)}',
      f'  temporaries      {gib(r.temporaries)}  (gradients, activations, gathered weights)',
      f'  total            {gib(r.total)}  (arguments {r.arguments / GiB:.2f} + outputs '
      f'{r.outputs / GiB:.2f} - donated {r.aliased / GiB:.2f} + temporaries)',
      f'FLOPs per step per device: {r.model_flops:.4g} (model: 6 x active parameters + '
      f'attention); XLA counts {r.xla_flops:.4g} (a scanned loop body once, remat included)',
      'fit:',
  ]
  width = max(len(a) for a in accelerators)
  lines += [
      f'  {a:<{width}} {ACCELERATORS[a]:>4} GiB  {verdict(r.total, ACCELERATORS[a])}'
      for a in accelerators
  ]
  return '\n'.join(lines)


def to_dict(r: Report) -> dict:
  return {**dataclasses.asdict(r), 'mesh': dict(r.mesh), 'total': r.total}


def check(config: mlc.ConfigDict, devices=None) -> Report:
  """Compiles the train step of `config` on a mesh of `devices` (default: all) and reports."""
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  return report(compile_train_step(config, mesh))


class OutOfMemory(Exception):
  """The compiler refused the program: it needs more memory per device than there is."""

  def __init__(self, needed_gib: float | None, available_gib: float | None, message: str):
    self.needed_gib, self.available_gib = needed_gib, available_gib
    super().__init__(message)

  def __str__(self):
    if self.needed_gib is None:
      return f'does not fit: {self.args[0]}'
    return (
        f'does not fit: needs {self.needed_gib:.2f} GiB of {self.available_gib:.2f} GiB '
        f'per device (the TPU compiler: {self.args[0]})'
    )


# "... HLO temporaries (32.00G) exceeds available HBM (15.75G)." (libtpu's wording)
_OOM_SIZES = re.compile(r'\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)')


def _gib(value: str, unit: str) -> float:
  return float(value) * 1024.0 ** ('KMGT'.index(unit) + 1) / GiB


def check_fit(config: mlc.ConfigDict, devices) -> Report:
  """`check`, but a compiler that runs out of memory raises OutOfMemory with its figures."""
  try:
    return check(config, devices)
  except Exception as e:  # XLA raises its runtime error type for a refused compile
    text = ' '.join(str(e).split())
    if 'RESOURCE_EXHAUSTED' not in text:
      raise
    reason = text[text.index('RESOURCE_EXHAUSTED') :][:400]
    sizes = _OOM_SIZES.search(text)
    if sizes is None:
      raise OutOfMemory(None, None, reason) from None
    raise OutOfMemory(_gib(*sizes.group(1, 2)), _gib(*sizes.group(3, 4)), reason) from None
