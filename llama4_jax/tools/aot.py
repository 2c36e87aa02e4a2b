"""Ahead-of-time fit check: compile the real train step for a mesh of devices it need not have.

The train step of `trainer.compile_steps` (same function, shardings and
donation) is lowered with ShapeDtypeStruct inputs that carry the run's
shardings, so no parameter is ever allocated, and compiled for a mesh of

  * a real TPU slice (`tpu_devices('v5p-256')`): the devices of a topology
    description from libtpu (requirements-compile.txt), compiled by the TPU
    compiler itself, which is what decides whether a program fits: a program
    that does not fit fails to compile, and the report says by how much;
  * real NVIDIA GPUs (`gpu_devices('h100-32x8')`): the devices of a topology
    description from the CUDA plugin (jax-cuda12-plugin, requirements-compile.txt)
    for XLA's description of the GPU (gpu_specs/), compiled by the CUDA compiler
    (XLA's GPU compiler and ptxas) with the options of `cuda_compiler_options`.
    It compiles a program too big for the GPU anyway, so `check_fit` compares
    the program's footprint with the GPU's memory; or
  * fake CPU devices (`use_fake_cpu_devices`), on any machine: parameter,
    optimizer-state and batch bytes are exact for any backend, but the
    temporaries are what the CPU compiler schedules, only an estimate of a
    TPU or GPU compile, which fuses and schedules differently.

`compiled.memory_analysis()` gives per-device argument, output and temporary
sizes, and `compiled.cost_analysis()` the FLOPs (the CUDA compiler gives none).
The TPU compiler's own memory-usage report, dumped with the program, gives what
it allocates in HBM: the fit is judged by that (`hbm_report_bytes`).
XLA's FLOP count covers a scanned loop body once, so the model FLOPs of `flops.py`
are reported next to it.
"""

import contextlib
import dataclasses
import glob
import importlib.resources
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

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

# What the TPU compiler is told to plan for by default: given the whole chip it spends the spare
# memory on speed, so its footprint would say little about what a program needs. At 80% the
# production layouts compile at 74% (Scout, MaxText's layout) and 80% (Maverick) of a v5p in HBM,
# within FIT_FRACTION. (The "overshoots" of this plan measured before were JAX's memory
# analysis counting offloaded activations' host memory: `hbm_report_bytes`.)
TPU_PLAN_FRACTION = 0.8


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
        f'{sorted(TPU_GENERATIONS)}) nor NVIDIA GPUs like h100-32x8 ({sorted(GPU_MODELS)})'
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


@contextlib.contextmanager
def _tpu_runtime_environment(target: TpuSlice):
  """The environment libtpu needs to describe `target` off a TPU VM, and the process's own
  back afterwards: with the variables set here and by libtpu's loading left behind
  (TPU_ACCELERATOR_TYPE, ...), the scripts this process starts later would take themselves
  for a TPU pod's workers."""
  saved = dict(os.environ)
  # libtpu's lockfile keeps two processes off one machine's TPUs. The fit check opens none, it
  # only compiles, so several may run at once (a test suite on two workers, a sweep of layouts);
  # without this the second fails with "ABORTED: ... libtpu multi-process lockfile".
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  # Off a Cloud TPU VM, the TPU runtime cannot read its slice and workers from the metadata
  # server; without these it logs "could not determine TPU accelerator type" and an
  # INVALID_ARGUMENT error for the workers' hostnames. This process compiles for the slice alone.
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', target.name)
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  try:
    yield
  finally:
    for key in set(os.environ) - set(saved):
      del os.environ[key]
    os.environ.update({k: v for k, v in saved.items() if os.environ.get(k) != v})


def tpu_devices(target: TpuSlice, num_slices: int = 1) -> list:
  """The devices of `num_slices` such slices, from libtpu's topology description."""
  try:
    from jax.experimental import topologies

    with _tpu_runtime_environment(target):
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


# NVIDIA GPUs ----------------------------------------------------------------------

# GPU: (XLA's GpuTargetConfigProto for it, in gpu_specs/; its key in ACCELERATORS). The files are
# openxla/xla's (xla/backends/gpu/target_config/specs), less the fields jaxlib's XLA does not know.
GPU_MODELS = {
    'h100': ('h100_sxm.txtpb', 'h100'),
    'h200': ('h200.txtpb', 'h200'),
}
GPUS_PER_HOST = (1, 2, 4, 8)  # an HGX board holds 8, NVLinked


@dataclasses.dataclass(frozen=True)
class GpuCluster:
  """NVIDIA GPUs the CUDA compiler can target without one: what `get_topology_desc` needs."""

  name: str  # e.g. h100-32x8
  model: str  # its key in GPU_MODELS
  hosts: int
  gpus_per_host: int

  @property
  def gpus(self) -> int:
    return self.hosts * self.gpus_per_host

  @property
  def topology(self) -> str:
    """The CUDA plugin's topology: partitions x hosts x GPUs per host."""
    return f'1x{self.hosts}x{self.gpus_per_host}'

  @property
  def accelerator(self) -> str:
    return GPU_MODELS[self.model][1]

  def target_config(self) -> str:
    """XLA's GpuTargetConfigProto for the GPU, as text."""
    spec = importlib.resources.files(__package__) / 'gpu_specs' / GPU_MODELS[self.model][0]
    return spec.read_text()

  @property
  def memory_bytes(self) -> int:
    """The GPU's memory as XLA's description of it has it (the compiler's own figure)."""
    return int(re.search(r'device_memory_size: (\d+)', self.target_config()).group(1))


def gpu_cluster(name: str) -> GpuCluster:
  """The GPUs called `name`: h100-HxG or h200-HxG, H hosts of G GPUs (h100-G: one host)."""
  model, _, size = name.lower().partition('-')
  shape = re.fullmatch(r'(?:(\d+)x)?(\d+)', size)
  if model not in GPU_MODELS or shape is None:
    raise ValueError(
        f'--topology={name}: not NVIDIA GPUs like h100-32x8 (hosts x GPUs per host) or h100-8 '
        f'(one host); GPUs {sorted(GPU_MODELS)}'
    )
  hosts, per_host = int(shape.group(1) or 1), int(shape.group(2))
  if hosts < 1 or per_host not in GPUS_PER_HOST:
    raise ValueError(
        f'--topology={name}: not {hosts} x {per_host}; give at least one host of 1, 2, 4 or 8 '
        f'GPUs (e.g. {model}-2x8 for 16 GPUs)'
    )
  return GpuCluster(name.lower(), model, hosts, per_host)


def topology(name: str) -> TpuSlice | GpuCluster:
  """The TPU slice (v5p-256) or the NVIDIA GPUs (h100-32x8) called `name`."""
  if name.lower().partition('-')[0] in GPU_MODELS:
    return gpu_cluster(name)
  return tpu_slice(name)


def gpu_devices(target: GpuCluster) -> list:
  """The GPUs of `target`, from the CUDA plugin's topology description (no GPU needed)."""
  try:
    from jax.experimental import topologies

    description = topologies.get_topology_desc(
        platform='cuda',
        topology_name='',
        topology=target.topology,
        target_config=target.target_config(),
    )
  except Exception as e:  # no CUDA plugin, or one whose XLA cannot read the description
    raise RuntimeError(
        f'cannot describe {target.name} ({target.topology}): {" ".join(str(e).split())[:300]}; '
        f'the CUDA compiler comes with jax-cuda12-plugin: pip install -r requirements-compile.txt'
    ) from e
  return list(description.devices)


def cuda_compiler_options() -> dict[str, Any]:
  """XLA options to compile for NVIDIA GPUs on a machine without one.

  xla_gpu_cuda_data_dir: the CUDA toolkit directory of the nvidia-cuda-nvcc-cu12 wheel
  (requirements-compile.txt), whose `bin/ptxas` turns XLA's PTX into GPU code, rather than
  whichever ptxas is on PATH.

  xla_gpu_enable_cub_radix_sort=False: XLA sorts more than about 22,000 elements (the MoE's
  dispatch at 8 sequences per GPU) with CUB's radix sort, and asks CUB at compile time how much
  scratch memory it needs; CUB asks the CUDA runtime about the GPU, so without one the compile
  stops with "INTERNAL: CUDA Runtime error: ... Error loading CUDA libraries" (or "invalid device
  ordinal" where the CUDA runtime library is installed). XLA's own sort kernel needs no device
  at compile time; the temporaries then lack CUB's scratch buffer, about the size of the keys and
  values sorted (half a MiB per MoE layer for Scout at 8 sequences of 8,192 tokens per GPU).
  """
  try:
    import nvidia.cuda_nvcc as nvcc  # the nvidia-cuda-nvcc-cu12 wheel
  except ImportError:
    nvcc = None
  for path in getattr(nvcc, '__path__', []):
    if os.path.isfile(os.path.join(path, 'bin', 'ptxas')):
      return {'xla_gpu_cuda_data_dir': path, 'xla_gpu_enable_cub_radix_sort': False}
  raise RuntimeError(
      'no ptxas for the CUDA compiler: it comes with nvidia-cuda-nvcc-cu12: '
      'pip install -r requirements-compile.txt'
  )


# Fake devices -----------------------------------------------------------------


def tpu_memory_budget(target: TpuSlice, budget: float = TPU_PLAN_FRACTION) -> int:
  """Bytes per chip the TPU compiler may plan for: `budget` of its memory (ACCELERATORS).

  Given the whole chip, the TPU compiler spends spare memory on speed (prefetching,
  overlapping collectives, less rematerialisation), so a program's footprint says little
  about what it needs. Given 80% of it (TPU_PLAN_FRACTION), it plans to leave 20%; what the
  compiled program holds in HBM (`Report.footprint`) against 90% of the chip is the verdict.
  """
  return int(budget * ACCELERATORS[target.accelerator] * GiB)


def tpu_compiler_options(budget_bytes: int) -> dict[str, Any]:
  """The memory the TPU compiler plans a program for: the HBM it may assume the chip has.

  It is the whole footprint's limit, arguments (parameters, optimizer state, batch) included:
  a refused program's "memory required for HLO temporaries (X)" is arguments + outputs +
  temporaries (`aot_test.test_the_tpu_compilers_limit_covers_the_arguments`).
  """
  return {'xla_tpu_max_hbm_size_mib': max(1, budget_bytes // 2**20)}


@dataclasses.dataclass(frozen=True)
class Target:
  """Devices to compile for, with what the compile and the fit check need."""

  devices: list | None  # None: all (fake CPU) devices
  description: str  # for the report's first line
  accelerator: str | None  # its key in ACCELERATORS
  fit_options: dict  # check_fit's compiler_options and memory_bytes


def compile_target(name: str, num_slices: int = 1, budget: float = TPU_PLAN_FRACTION) -> Target:
  """The devices of a TPU slice or GPU cluster called `name`, for that platform's compiler.

  Call before anything touches a device: it makes the CPU JAX's only backend (the compiler
  is needed, not the devices).
  """
  target = topology(name)
  if isinstance(target, GpuCluster) and num_slices > 1:
    raise ValueError(
        f'--num_slices={num_slices}: slices are TPU slices; give more GPUs as more '
        f'hosts, e.g. --topology={target.model}-64x8'
    )
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_enable_compilation_cache', False)  # no TPU/GPU client to load entries
  if isinstance(target, GpuCluster):
    count = lambda n, thing: f'{n} {thing}' + ('s' if n > 1 else '')
    return Target(
        gpu_devices(target),
        f'{target.name} ({count(target.hosts, "host")} of '
        f'{count(target.gpus_per_host, "GPU")}), the CUDA compiler',
        target.accelerator,
        dict(compiler_options=cuda_compiler_options(), memory_bytes=target.memory_bytes),
    )
  slices = f'{num_slices} x ' if num_slices > 1 else ''
  return Target(
      tpu_devices(target, num_slices),
      f'{slices}{target.name} ({target.topology}, {target.chips} chips), the TPU compiler '
      f'planning for {budget:.0%} of {ACCELERATORS[target.accelerator]} GiB',
      target.accelerator,
      dict(budget_bytes=tpu_memory_budget(target, budget)),
  )


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
  hbm_bytes: int = 0  # the TPU compiler's own HBM total (`hbm_report_bytes`); 0: none given


# "Memory Space: default (color=0)\nTotal bytes: 81301792704 (75.72GiB)" (libtpu's wording)
_HBM_TOTAL = re.compile(r'^Memory Space: default \(color=0\)\nTotal bytes: (\d+)', re.MULTILINE)


def hbm_report_bytes(dump_dir: str) -> int:
  """What the TPU compiler allocates in HBM, from the memory-usage report it dumps to `dump_dir`.

  The device's memory space ('default'): arguments, outputs and temporaries as the compiler
  packed them, without what lives in the host's memory. The memory analysis cannot say this:
  libtpu's `temp_size_in_bytes` was seen to include the host buffer of offloaded activations
  in a full model (Maverick: 40.72 GiB of HBM temporaries and a 15.00 GiB host buffer, counted
  as 55.84) and not in small programs (docs/fit_check.md).
  """
  reports = glob.glob(os.path.join(dump_dir, '*jit_train_step*memory-usage-report.txt'))
  if len(reports) != 1:  # the directory is the compile's temporary one: name what was found
    raise RuntimeError(
        f'expected one memory-usage report of the train step from the TPU compiler, found '
        f'{len(reports)} (libtpu writes it with xla_dump_to; requirements-compile.txt pins it)'
    )
  with open(reports[0]) as f:
    found = _HBM_TOTAL.search(f.read())
  if found is None:
    raise RuntimeError(
        f"the TPU compiler's memory-usage report {os.path.basename(reports[0])} has no total "
        'for memory space default (HBM)'
    )
  return int(found.group(1))


def compile_train_step(
    config: mlc.ConfigDict,
    mesh: jax.sharding.Mesh,
    compiler_options: Mapping[str, Any] | None = None,
    budget_bytes: int | None = None,
) -> Compiled:
  """Lowers and compiles trainer.train_step for `mesh` from shapes alone.

  `compiler_options`: XLA options for this compile (`cuda_compiler_options` for GPUs).
  `budget_bytes`: for the TPU compiler, the memory per chip it may plan for.
  """
  config_lib.validate(config, mesh.size)
  with sharding.mesh_context(mesh):
    setup = trainer.make_setup(config, mesh)
    train_fn, _ = trainer.compile_steps(setup)
    state = _with_shardings(setup.abstract_state, setup.state_shardings)
    batch = abstract_batch(config, setup.batch_sharding)
    lowered = train_fn.lower(state, batch)
    options = dict(compiler_options or {})
    if not budget_bytes:
      return Compiled(setup, state, batch, lowered.compile(options or None))
    # The TPU compiler: its memory-usage report, dumped with the compiled program, is read.
    with tempfile.TemporaryDirectory() as dump_dir:
      options.update(tpu_compiler_options(budget_bytes), xla_dump_to=dump_dir)
      executable = lowered.compile(options)
      return Compiled(setup, state, batch, executable, hbm_report_bytes(dump_dir))


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
  xla_flops: float | None  # XLA's count for one device's program; None: none given (GPU)
  model_flops: float  # flops.py: 6 x active params + attention, per device per step
  host_temporaries: int = 0  # in the host's memory, not the device's (offloaded activations)
  hbm: int = 0  # the TPU compiler's own HBM total (`hbm_report_bytes`); 0 where none is given

  @property
  def total(self) -> int:
    """The memory analysis's footprint: inputs, new outputs (donated ones reuse inputs),
    temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temporaries

  @property
  def footprint(self) -> int:
    """What the device holds, the fit's measure: the TPU compiler's HBM total where it gives
    one (its temporaries can include host memory), else `total`."""
    return self.hbm or self.total


def report(compiled: Compiled) -> Report:
  setup, exe = compiled.setup, compiled.executable
  memory = exe.memory_analysis()
  cost = exe.cost_analysis() or {}  # the CUDA compiler gives none
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
      xla_flops=float(cost['flops']) if 'flops' in cost else None,
      model_flops=model_flops / setup.mesh.size,
      host_temporaries=getattr(memory, 'host_temp_size_in_bytes', 0),
      hbm=compiled.hbm_bytes,
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
  if r.xla_flops is None:
    xla_flops = 'n/a (this compiler gives no cost analysis)'
  else:
    xla_flops = f'{r.xla_flops:.4g} (a scanned loop body once, remat included)'
  lines = [
      f'{r.devices} devices, mesh {dict(r.mesh)}; {r.num_params:,} parameters',
      'per device:',
      f'  parameters       {gib(r.params)}',
      f'  optimizer state  {gib(r.opt_state)}',
      f'  batch            {gib(r.batch)}',
      f'  temporaries      {gib(r.temporaries)}  (gradients, activations, gathered weights)',
      f'  total            {gib(r.total)}  (arguments {r.arguments / GiB:.2f} + outputs '
      f'{r.outputs / GiB:.2f} - donated {r.aliased / GiB:.2f} + temporaries)',
      *(
          [f'  host memory      {gib(r.host_temporaries)}  (offloaded activations; not HBM)']
          if r.host_temporaries
          else []
      ),
      *(
          [f"  HBM              {gib(r.hbm)}  (the TPU compiler's own total: the fit's measure)"]
          if r.hbm
          else []
      ),
      f'FLOPs per step per device: {r.model_flops:.4g} (model: 6 x active parameters + '
      f'attention); XLA counts {xla_flops}',
      'fit:',
  ]
  width = max(len(a) for a in accelerators)
  lines += [
      f'  {a:<{width}} {ACCELERATORS[a]:>4} GiB  {verdict(r.footprint, ACCELERATORS[a])}'
      for a in accelerators
  ]
  return '\n'.join(lines)


def to_dict(r: Report) -> dict:
  return {
      **dataclasses.asdict(r),
      'mesh': dict(r.mesh),
      'total': r.total,
      'footprint': r.footprint,
  }


def check(
    config: mlc.ConfigDict,
    devices=None,
    compiler_options: Mapping[str, Any] | None = None,
    budget_bytes: int | None = None,
) -> Report:
  """Compiles the train step of `config` on a mesh of `devices` (default: all) and reports."""
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  return report(compile_train_step(config, mesh, compiler_options, budget_bytes))


class OutOfMemory(Exception):
  """The program needs more memory per device than there is.

  The TPU compiler refuses such a program (`report` None); the CUDA compiler compiles it, and
  `check_fit` finds it too big from its memory analysis (`report`).
  """

  def __init__(
      self,
      needed_gib: float | None,
      available_gib: float | None,
      message: str,
      compiler: str = 'the TPU compiler',
      report: Report | None = None,
  ):
    self.needed_gib, self.available_gib = needed_gib, available_gib
    self.compiler, self.report = compiler, report
    super().__init__(message)

  def __str__(self):
    if self.needed_gib is None:
      return f'does not fit: {self.args[0]}'
    return (
        f'does not fit: needs {self.needed_gib:.2f} GiB of {self.available_gib:.2f} GiB '
        f'per device ({self.compiler}: {self.args[0]})'
    )


def refusal_note(needed_gib: float | None, chip_gib: float, plan_fraction: float) -> str:
  """What a refusal by the TPU compiler, planning for `plan_fraction` of the chip, means for
  the fit: a program that needs more than the plan but at most FIT_FRACTION of the chip is
  refused, yet would fit; planning for FIT_FRACTION (`--memory_budget`) tells."""
  if needed_gib is None or plan_fraction >= FIT_FRACTION or needed_gib > FIT_FRACTION * chip_gib:
    return ''
  return (
      f'  ({needed_gib / chip_gib:.0%} of the chip: within the {FIT_FRACTION:.0%} a fit allows; '
      f'--memory_budget={FIT_FRACTION} lets the compiler plan for it)'
  )


# "... HLO temporaries (32.00G) exceeds available HBM (15.75G)." (libtpu's wording)
_OOM_SIZES = re.compile(r'\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)')


def _gib(value: str, unit: str) -> float:
  return float(value) * 1024.0 ** ('KMGT'.index(unit) + 1) / GiB


def check_fit(
    config: mlc.ConfigDict,
    devices,
    compiler_options: Mapping[str, Any] | None = None,
    memory_bytes: int | None = None,
    budget_bytes: int | None = None,
) -> Report:
  """`check`, but a program too big for the devices raises OutOfMemory with the figures.

  A compiler that runs out of memory (the TPU compiler, planning for `budget_bytes` per chip if
  given) says by how much. One that compiles the program anyway (the CUDA compiler) is checked
  here: given the device's `memory_bytes`, a program whose footprint (`Report.total`:
  arguments + outputs - donated + temporaries) is larger raises OutOfMemory with both figures.
  """
  try:
    r = check(config, devices, compiler_options, budget_bytes)
  except Exception as e:  # XLA raises its runtime error type for a refused compile
    text = ' '.join(str(e).split())
    if 'RESOURCE_EXHAUSTED' not in text:
      raise
    reason = text[text.index('RESOURCE_EXHAUSTED') :][:400]
    sizes = _OOM_SIZES.search(text)
    if sizes is None:
      raise OutOfMemory(None, None, reason) from None
    needed, available = _gib(*sizes.group(1, 2)), _gib(*sizes.group(3, 4))
    raise OutOfMemory(needed, available, reason) from None
  if memory_bytes is not None and r.total > memory_bytes:
    reason = (
        f'memory analysis: arguments {r.arguments / GiB:.2f} + outputs {r.outputs / GiB:.2f} - '
        f'donated {r.aliased / GiB:.2f} + temporaries {r.temporaries / GiB:.2f} GiB'
    )
    raise OutOfMemory(r.total / GiB, memory_bytes / GiB, reason, 'the CUDA compiler', r)
  return r
