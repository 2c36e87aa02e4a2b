"""The ahead-of-time fit check on Scout and Maverick at full width and reduced depth."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from llama4_jax import cli, config_lib, flops, sharding
from llama4_jax.tools import aot

import small_run
import xla_env

# Its module fixtures are expensive: one test worker runs the whole file (pyproject.toml).
pytestmark = pytest.mark.xdist_group(__name__)

V, D, F = 202048, 5120, 8192  # the presets' vocabulary, width and expert width
SEQ_LEN, BATCH = 256, 8


def preset_config(name: str, num_layers: int):
  args = ['prog', f'--config={small_run.REPO}/configs/{name}.py']
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, lock_config=True, sys_argv=args)
  values(args)
  config = aot.truncate_layers(values.config, num_layers)
  config.train.batch_size, config.data.seq_len = BATCH, SEQ_LEN
  return config


def attention_params() -> int:
  return D * 40 * 128 * 2 + D * 8 * 128 * 2 + 2 * D  # q, o; k, v; the two norms


def start_maverick_script(output) -> subprocess.Popen:
  """Two Maverick layers (dense, then 128-expert MoE) on 16 devices: experts over 8, FSDP over 2.

  The script gets the fast-compile flag, not the tests' 8 devices: it makes its 16 itself.
  """
  return subprocess.Popen(
      [
          sys.executable,
          'scripts/aot_check.py',
          '--config=configs/maverick.py',
          '--devices=16',
          '--config.mesh.expert=8',  # the preset's mesh is fsdp x tensor 4
          '--config.mesh.tensor=1',
          '--num_layers=2',
          f'--config.train.batch_size={2 * BATCH}',
          f'--config.data.seq_len={SEQ_LEN}',
          '--accelerator=tpu-v5e',
          f'--output={output}',
      ],
      cwd=small_run.REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=dict(os.environ, XLA_FLAGS=xla_env.FAST_COMPILE),
  )


@pytest.fixture(scope='module')
def checks(devices, tmp_path_factory):
  """Scout compiled here while the script compiles Maverick (the two compiles share the cores).

  Scout: one layer (attention + 16-expert MoE) on the 8 test devices, FSDP over all of them.
  """
  output = tmp_path_factory.mktemp('aot') / 'maverick.json'
  script = start_maverick_script(output)
  config = preset_config('scout', num_layers=1)
  before = {id(x) for x in jax.live_arrays()}
  compiled = aot.compile_train_step(config, sharding.make_mesh(dict(config.mesh)))
  new_arrays = [x for x in jax.live_arrays() if id(x) not in before]
  stdout, stderr = script.communicate(timeout=600)
  return {
      'scout': (compiled, aot.report(compiled), new_arrays),
      'maverick': (script.returncode, stdout, stderr, output),
  }


@pytest.fixture
def scout(checks):
  return checks['scout']


@pytest.mark.slow
def test_compiling_allocates_no_array(scout):
  _, _, new_arrays = scout
  assert sum(x.nbytes for x in new_arrays) == 0


@pytest.mark.slow
def test_scout_layer_has_the_real_widths(scout):
  _, report, _ = scout
  moe = D * 16 + 3 * 16 * D * F + 3 * D * F  # router, routed experts, shared expert
  assert report.num_params == 2 * V * D + D + attention_params() + moe


@pytest.mark.slow
def test_scout_state_is_split_over_the_8_devices(scout):
  _, report, _ = scout
  assert report.devices == 8 and report.mesh['fsdp'] == 8
  # FSDP splits every weight along `embed`; only the norm scales are replicated.
  norms = 3 * D
  assert report.params == 4 * ((report.num_params - norms) // 8 + norms)
  assert report.opt_state == pytest.approx(2 * report.params, rel=1e-5)  # Adam's mu and nu
  assert report.batch == 5 * 4 * BATCH * SEQ_LEN // 8
  # XLA's own count of the step's inputs is the sharded state: nothing was replicated by
  # accident, and the donated state is written in place.
  assert report.arguments == pytest.approx(
      report.params + report.opt_state + report.batch, rel=1e-5
  )
  assert report.aliased == pytest.approx(report.params + report.opt_state, rel=1e-5)
  assert report.temporaries > report.params  # at least the float32 gradients
  assert report.total == report.arguments + report.outputs - report.aliased + report.temporaries


@pytest.mark.slow
def test_scout_flops(scout):
  compiled, report, _ = scout
  tokens = BATCH * SEQ_LEN
  assert report.model_flops == pytest.approx(
      flops.train_flops_per_token(compiled.setup.cfg, SEQ_LEN) * tokens / 8
  )
  # One layer: no scanned loop whose body XLA would count once. Full remat recomputes the
  # layer's forward; the blocked expert matmul pads each expert's rows.
  assert 0.8 < report.xla_flops / report.model_flops < 2.0


@pytest.mark.slow
def test_scout_report_names_the_fit(scout):
  _, report, _ = scout
  text = aot.format_report(report)
  assert f'{report.num_params:,} parameters' in text
  for name in aot.ACCELERATORS:
    assert f'  {name}' in text
  line = next(row for row in text.splitlines() if row.strip().startswith('b200'))
  assert line.endswith(aot.verdict(report.total, 180))


def test_verdicts():
  gib = aot.GiB
  assert aot.verdict(40 * gib, 80) == 'fits (50%)'
  assert aot.verdict(76 * gib, 80) == 'tight (95%)'
  assert aot.verdict(88 * gib, 80) == 'does not fit (110%)'
  assert aot.fits(72 * gib, 'h100') and not aot.fits(73 * gib, 'h100')


def test_truncate_layers_keeps_the_layer_pattern():
  config = preset_config('maverick', num_layers=4)
  assert (
      config.model.num_layers,
      tuple(config.model.moe_layers),
      tuple(config.model.no_rope_layers),
  ) == (4, (1, 3), (1, 1, 1, 0))
  with pytest.raises(config_lib.ConfigError, match='num_layers'):
    aot.truncate_layers(config, 5)


@pytest.mark.slow
def test_script_on_maverick_with_16_simulated_devices(checks):
  returncode, stdout, stderr, output = checks['maverick']
  report = json.load(open(output))
  assert report['devices'] == 16 and report['mesh']['expert'] == 8 and report['mesh']['fsdp'] == 2
  routed = 3 * 128 * D * F
  dense = 3 * D * 16384
  shared_and_router = 3 * D * F + D * 128
  assert report['num_params'] == (
      2 * V * D + D + 2 * attention_params() + dense + routed + shared_and_router
  )
  # Routed experts are split 16 ways (expert x fsdp), other weights 2 ways (fsdp), and the
  # norm scales of the 2 layers and the output are replicated.
  norms = 5 * D
  assert report['params'] == 4 * (
      routed // 16 + (report['num_params'] - routed - norms) // 2 + norms
  )
  assert report['opt_state'] == pytest.approx(2 * report['params'], rel=1e-5)
  # Far over a 16 GiB TPU v5e: the script says so and exits 1.
  assert returncode == 1, stderr[-2000:]
  assert 'tpu-v5e' in stdout and 'does not fit' in stdout


# The real TPU compiler (libtpu's topology API; no TPU needed) ------------------------------


@pytest.mark.parametrize(
    'name, topology, chips, megacore, wrap',
    [
        ('v5p-256', 'v5:4x4x8', 128, True, (True, True, True)),  # MaxText's Scout/Maverick slice
        ('v5p-8', 'v5:2x2x1', 4, True, (False, False, False)),
        ('v4-128', 'v4:4x4x4', 64, True, (True, True, True)),
        ('v5e-256', 'v5e:16x16', 256, False, (True, True, False)),
        ('v5e-128', 'v5e:8x16', 128, False, (False, True, False)),
        ('v6e-256', 'v6e:16x16', 256, False, (True, True, False)),
    ],
)
def test_tpu_slice_names(name, topology, chips, megacore, wrap):
  target = aot.tpu_slice(name)
  assert (target.topology, target.chips, target.wrap) == (topology, chips, wrap)
  assert (target.chip_config == 'megacore') == megacore


@pytest.mark.parametrize('name', ['v5p-100', 'v7x-64', 'h100', 'v5p-'])
def test_unknown_tpu_slices_are_named(name):
  with pytest.raises(ValueError, match=f'--topology={name}'):
    aot.tpu_slice(name)


def test_out_of_memory_report_has_the_compilers_figures():
  message = (
      'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
      'temporaries (32.00G) exceeds available HBM (15.75G).'
  )
  sizes = aot._OOM_SIZES.search(message)
  error = aot.OutOfMemory(aot._gib(*sizes.group(1, 2)), aot._gib(*sizes.group(3, 4)), message)
  assert str(error).startswith('does not fit: needs 32.00 GiB of 15.75 GiB per device')


def test_hbm_total_is_read_from_the_compilers_memory_usage_report(tmp_path):
  """The 'default' memory space is HBM; the host buffer (color 5) is not counted."""
  (tmp_path / 'module_0000.jit_train_step.cl_1.after_optimizations-memory-usage-report.txt').write_text(
      'Memory Space: default (color=0)\n'
      'Total bytes: 81301792704 (75.72GiB)\n'
      '  cumulative_size;       size;       offset; used_by_n_values; shapes_list\n\n'
      'Memory Space: cmem (color=5)\n'
      'Total bytes: 16106127360 (15.00GiB)\n'
  )  # fmt: skip
  assert aot.hbm_report_bytes(str(tmp_path)) == 81301792704
  # Maverick at MaxText's layout: libtpu's temporaries counted the 15 GiB host buffer too.
  fields = dict(
      devices=128, mesh={'fsdp': 32, 'tensor': 4}, num_params=10, params=1, opt_state=2, batch=0,
      arguments=37_580_963_840, outputs=37_580_963_840, aliased=37_580_963_840,
      temporaries=59_960_000_000, xla_flops=None, model_flops=1e9,
  )  # fmt: skip
  report = aot.Report(**fields, hbm=81301792704)
  assert report.footprint == 81301792704 < report.total
  assert aot.verdict(report.footprint, 95) == 'fits (80%)'
  assert aot.verdict(report.total, 95) == 'tight (96%)'
  assert aot.Report(**fields).footprint == aot.Report(**fields).total  # no HBM report: total
  with pytest.raises(RuntimeError, match='one memory-usage report'):
    aot.hbm_report_bytes(str(tmp_path / 'nothing'))


def run_topology_check(tmp_path, topology, *overrides):
  """scripts/aot_check.py --topology (TPUs or GPUs) on 2 layers of the small test model."""
  small = [f for f in small_run.flag_list() if not f.startswith('--config=')]
  return subprocess.run(
      [sys.executable, 'scripts/aot_check.py', '--config=configs/tiny.py', *small,
       f'--topology={topology}', '--num_layers=2', f'--output={tmp_path}/report.json',
       *overrides],
      cwd=small_run.REPO, capture_output=True, text=True,
  )  # fmt: skip


_LIMIT_PROBE = """
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from llama4_jax.tools import aot
mesh = jax.sharding.Mesh(np.array(aot.tpu_devices(aot.tpu_slice('v5e-4'))[:1]), ('x',))
x = jax.ShapeDtypeStruct((2**28,), jnp.float32, sharding=NamedSharding(mesh, P()))  # 1 GiB
# 2 GiB of outputs (elementwise: compiles in a second, where a sort took minutes)
step = jax.jit(lambda x: (x * 2, x[::-1] + 1)).lower(x)
m = step.compile(aot.tpu_compiler_options(16 * aot.GiB)).memory_analysis()
try:  # room for the outputs, not for the arguments as well
  step.compile(aot.tpu_compiler_options(int(2.5 * aot.GiB)))
  needed = None
except Exception as e:
  needed = aot._gib(*aot._OOM_SIZES.search(str(e)).group(1, 2))
sizes = (m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes)
print(json.dumps({'footprint': sum(sizes) / aot.GiB, 'arguments': sizes[0] / aot.GiB,
                  'needed': needed}))
"""


@pytest.mark.slow
def test_the_tpu_compilers_limit_covers_the_arguments():
  """`xla_tpu_max_hbm_size_mib` is the chip's HBM for the whole program, and a refused
  program's "HLO temporaries (X)" is its whole footprint: arguments, outputs and temporaries.
  So the fit check gives the compiler the budget itself and reports X as the need."""
  result = subprocess.run(
      [sys.executable, '-c', _LIMIT_PROBE], cwd=small_run.REPO, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr[-3000:]
  probe = json.loads(result.stdout.strip().splitlines()[-1])
  assert probe['arguments'] == 1.0 and probe['footprint'] > 2.0
  assert probe['needed'] == pytest.approx(probe['footprint'], rel=0.01)


_ROWS_PROBE = """
import importlib.util, json
from llama4_jax import sharding
from llama4_jax.tools import aot
target = aot.compile_target('v5p-256')
spec = importlib.util.spec_from_file_location('maverick', 'configs/maverick.py')
preset = importlib.util.module_from_spec(spec)
spec.loader.exec_module(preset)
config = preset.get_config()
mesh = sharding.make_mesh(dict(config.mesh), target.devices)
rows = config.train.batch_size
slices = sharding.batch_sharding(mesh, 1).devices_indices_map((rows,))
processes = sorted({d.process_index for d in target.devices})
fed = {p: sharding.process_batch_rows(mesh, rows, p).tolist() for p in processes}
held = {p: sorted({r for d, (s,) in slices.items() if d.process_index == p
                   for r in range(*s.indices(rows))}) for p in processes}
print(json.dumps({'mesh': dict(mesh.shape), 'rows': rows, 'fed': fed, 'held': held}))
"""


@pytest.mark.slow
def test_each_process_feeds_the_rows_its_devices_hold_where_tensor_spans_hosts():
  """Maverick's layout on a v5p-256: 32 hosts of 4 chips, the tensor axis of 4 across hosts.
  A process's devices hold rows far apart, as its tensor peers' do; a block of B / 32 rows
  per process (the old layout) fed peers different rows of the same shards."""
  result = subprocess.run(
      [sys.executable, '-c', _ROWS_PROBE], cwd=small_run.REPO, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr[-3000:]
  probe = json.loads(result.stdout.strip().splitlines()[-1])
  fed, held, rows = probe['fed'], probe['held'], probe['rows']
  assert probe['mesh']['tensor'] == 4 and len(fed) == 32
  assert fed == held  # each process feeds exactly the rows its devices hold, in order
  assert sorted({r for indices in fed.values() for r in indices}) == list(range(rows))
  block = rows // len(fed)
  assert any(
      indices != list(range(int(p) * block, (int(p) + 1) * block)) for p, indices in fed.items()
  )
  # Tensor peers on other hosts feed the same rows.
  assert len({tuple(indices) for indices in fed.values()}) < len(fed)


_KERNEL_PROBE = """
import sys
sys.path.insert(0, 'tests')
from llama4_jax import sharding
from llama4_jax.tools import aot
import small_run
target = aot.compile_target('v5p-8')
config = aot.truncate_layers(small_run.config(), 2)
mesh = sharding.make_mesh(dict(config.mesh), target.devices)
compiled = aot.compile_train_step(config, mesh, None, target.fit_options['budget_bytes'])
print(compiled.executable.as_text().count('tpu_custom_call'))
"""


@pytest.mark.slow
def test_a_tpu_compile_takes_the_tpu_kernels():
  """Compiled for a TPU from a CPU process, the MoE layer runs the megablox kernel (Mosaic
  custom calls in the program): kernel choices follow the devices compiled for."""
  result = subprocess.run(
      [sys.executable, '-c', _KERNEL_PROBE], cwd=small_run.REPO, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert int(result.stdout.split()[-1]) > 0


@pytest.mark.slow
def test_small_config_compiles_for_a_tpu_slice(tmp_path):
  result = run_topology_check(tmp_path, 'v5p-8')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'v5p-8 (v5:2x2x1, 4 chips), the TPU compiler' in result.stdout
  # Off a Cloud TPU VM, the TPU runtime's start-up asks for its slice and workers.
  assert 'could not determine' not in result.stderr, result.stderr[-3000:]
  assert 'INVALID_ARGUMENT' not in result.stderr, result.stderr[-3000:]
  report = json.loads((tmp_path / 'report.json').read_text())
  assert report['devices'] == 4 and report['mesh']['fsdp'] == 4 and report['fits'] is True
  assert report['temporaries'] > 0 and report['xla_flops'] > 0
  # The fit is judged by the compiler's own HBM total, which holds at least the arguments.
  assert report['arguments'] <= report['hbm'] == report['footprint']
  assert "the TPU compiler's own total" in result.stdout
  assert f'tpu-v5p   95 GiB  {aot.verdict(report["hbm"], 95)}' in result.stdout


@pytest.mark.slow
def test_two_slices_put_the_slices_on_the_data_axis(tmp_path):
  """Multi-slice: the data axis crosses the slices (the data-centre network carries only its
  gradient reduction); a mesh whose data axis cannot is refused naming mesh.data."""
  result = run_topology_check(tmp_path, 'v5e-4', '--num_slices=2', '--config.mesh.data=2')
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / 'report.json').read_text())
  assert report['devices'] == 8 and report['mesh']['data'] == 2 and report['mesh']['fsdp'] == 4
  refused = run_topology_check(tmp_path, 'v5e-4', '--num_slices=2')
  assert refused.returncode != 0
  assert 'set config.mesh.data to a multiple of 2' in refused.stderr, refused.stderr[-3000:]


@pytest.mark.slow
def test_a_program_too_big_for_the_chip_is_a_report_not_a_traceback(tmp_path):
  """Float32 logits of 512 x 1024 tokens over 65,536 ids: 32 GiB for each 16 GiB chip."""
  result = run_topology_check(
      tmp_path,
      'v5e-4',
      '--config.train.batch_size=512',
      '--config.data.seq_len=1024',
      '--config.model.vocab_size=65536',
  )
  assert result.returncode == 1, result.stdout + result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  line = result.stdout.strip().splitlines()[-1]
  assert line.startswith(
      'v5e-4 (v5e:2x2, 4 chips), the TPU compiler planning for 80% of 16 GiB: does not fit: needs '
  )
  report = json.loads((tmp_path / 'report.json').read_text())
  assert report['fits'] is False and report['needed_gib'] > report['available_gib']
  assert abs(report['available_gib'] - 0.8 * 16) < 0.01  # the compiler planned for 80%


# The real CUDA compiler (the CUDA plugin's topology API and ptxas; no GPU needed) -----------


@pytest.mark.parametrize(
    'name, hosts, gpus_per_host, topology, accelerator',
    [
        ('h100-32x8', 32, 8, '1x32x8', 'h100'),  # 256 H100s
        ('h100-8', 1, 8, '1x1x8', 'h100'),  # one host
        ('H200-2x4', 2, 4, '1x2x4', 'h200'),
    ],
)
def test_gpu_cluster_names(name, hosts, gpus_per_host, topology, accelerator):
  target = aot.topology(name)
  assert isinstance(target, aot.GpuCluster)
  assert (target.hosts, target.gpus_per_host, target.topology) == (hosts, gpus_per_host, topology)
  assert (target.gpus, target.accelerator) == (hosts * gpus_per_host, accelerator)


@pytest.mark.parametrize('name', ['h100-16', 'h100-2x16', 'h100-0x8', 'h100-x8', 'h100-', 'a100-8'])
def test_unknown_gpu_clusters_are_named(name):
  with pytest.raises(ValueError, match=f'--topology={name}'):
    aot.topology(name)


def test_gpu_devices_are_the_described_gpus():
  """XLA reads the GPU specs of gpu_specs/; the memory is the compiler's own figure."""
  h100, h200 = aot.gpu_cluster('h100-2x8'), aot.gpu_cluster('h200-8')
  assert (h100.memory_bytes, h200.memory_bytes) == (84942979072, 141 * aot.GiB)
  devices = aot.gpu_devices(h100)
  assert len(devices) == 16 and {d.process_index for d in devices} == {0, 1}
  assert {d.device_kind for d in devices} == {'NVIDIA H100 80GB HBM3'}
  assert aot.gpu_devices(h200)[0].device_kind == 'NVIDIA H200 141GB HBM3e'


def test_a_long_sort_compiles_for_a_gpu_without_one():
  """XLA would ask CUB, through the CUDA runtime and a GPU, for a long sort's scratch size (the
  MoE's dispatch at 8 sequences per GPU); `cuda_compiler_options` sorts with XLA's own kernel."""
  options = aot.cuda_compiler_options()
  assert os.path.isfile(os.path.join(options['xla_gpu_cuda_data_dir'], 'bin', 'ptxas'))
  (gpu,) = aot.gpu_devices(aot.gpu_cluster('h100-1'))
  keys = jax.ShapeDtypeStruct((65536,), jnp.int32, sharding=jax.sharding.SingleDeviceSharding(gpu))
  lowered = jax.jit(jnp.argsort).lower(keys)
  with pytest.raises(Exception, match='CUDA Runtime error'):
    lowered.compile({'xla_gpu_cuda_data_dir': options['xla_gpu_cuda_data_dir']})
  compiled = lowered.compile(options)
  assert compiled.memory_analysis().output_size_in_bytes == 4 * 65536
  assert compiled.cost_analysis() is None  # hence Report.xla_flops None


def test_a_report_without_xla_flops_says_so():
  report = aot.Report(
      devices=8, mesh={'fsdp': 8}, num_params=10, params=40, opt_state=80, batch=8, arguments=128,
      outputs=120, aliased=120, temporaries=1000, xla_flops=None, model_flops=1e9,
  )  # fmt: skip
  assert 'XLA counts n/a' in aot.format_report(report, ['h100'])
  assert aot.to_dict(report)['xla_flops'] is None


def test_a_gpu_program_too_big_is_out_of_memory(monkeypatch):
  """The CUDA compiler compiles a program too big for the GPU: check_fit compares its footprint."""
  gib = aot.GiB
  report = aot.Report(
      devices=8, mesh={'fsdp': 8}, num_params=10, params=gib, opt_state=2 * gib, batch=0,
      arguments=3 * gib, outputs=3 * gib, aliased=3 * gib, temporaries=90 * gib, xla_flops=None,
      model_flops=1e9,
  )  # fmt: skip
  monkeypatch.setattr(aot, 'check', lambda config, devices, compiler_options, budget: report)
  memory = aot.gpu_cluster('h100-8').memory_bytes
  with pytest.raises(aot.OutOfMemory) as error:
    aot.check_fit(None, None, memory_bytes=memory)
  assert error.value.report is report
  assert str(error.value).startswith(
      'does not fit: needs 93.00 GiB of 79.11 GiB per device (the CUDA compiler: memory '
      'analysis: arguments 3.00 + outputs 3.00 - donated 3.00 + temporaries 90.00 GiB)'
  )
  assert aot.check_fit(None, None, memory_bytes=94 * gib) is report


@pytest.mark.parametrize(
    'installed, devices, platforms',
    [
        ({'libtpu', 'cuda'}, set(), 'cpu'),  # the fit check's compilers on a CPU machine
        ({'libtpu', 'cuda'}, {'/dev/nvidia0'}, 'cuda,cpu'),
        ({'libtpu', 'cuda'}, {'/dev/accel0'}, 'tpu,cpu'),
        ({'cuda'}, set(), 'cpu'),
        ({'cuda'}, {'/dev/nvidia0'}, None),  # JAX's own choice
        (set(), set(), None),
    ],
)
def test_scripts_leave_out_backends_without_devices(monkeypatch, installed, devices, platforms):
  """An installed compiler whose devices are absent would print its backend's start-up errors."""
  chosen = []
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.setattr(
      cli, '_installed', lambda module: ('cuda' if 'cuda' in module else module) in installed
  )
  monkeypatch.setattr(
      cli.glob, 'glob', lambda pattern: [d for d in devices if d.startswith(pattern[:9])]
  )
  monkeypatch.setattr(cli.jax.config, 'update', lambda name, value: chosen.append((name, value)))
  cli._skip_absent_accelerators()
  assert chosen == ([('jax_platforms', platforms)] if platforms else [])


@pytest.mark.slow
def test_small_config_compiles_for_gpus(tmp_path):
  result = run_topology_check(tmp_path, 'h100-2x4')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'h100-2x4 (2 hosts of 4 GPUs), the CUDA compiler' in result.stdout
  assert 'XLA counts n/a' in result.stdout and 'h100   80 GiB  fits' in result.stdout
  assert not any(w in result.stderr.lower() for w in ('cuda', 'cudnn', 'traceback'))  # no GPU
  report = json.loads((tmp_path / 'report.json').read_text())
  assert report['devices'] == 8 and report['mesh']['fsdp'] == 8
  assert report['temporaries'] > 0 and report['xla_flops'] is None


@pytest.mark.slow
def test_a_program_too_big_for_the_gpu_is_a_report_not_a_traceback(tmp_path):
  """As on the v5e-4, on one H100: 259 GiB of temporaries, which the CUDA compiler compiles."""
  result = run_topology_check(
      tmp_path,
      'h100-1',
      '--config.train.batch_size=512',
      '--config.data.seq_len=1024',
      '--config.model.vocab_size=65536',
  )
  assert result.returncode == 1, result.stdout + result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  line = result.stdout.strip().splitlines()[-1]
  assert line.startswith('h100-1 (1 host of 1 GPU), the CUDA compiler: does not fit: needs ')
  assert line.split('needs ')[1].split(' of ')[1].startswith('79.11 GiB per device')
  report = json.loads((tmp_path / 'report.json').read_text())
  assert report['fits'] is False and report['needed_gib'] > 100
  assert report['available_gib'] == pytest.approx(84942979072 / aot.GiB)
  assert report['report']['total'] == pytest.approx(report['needed_gib'] * aot.GiB)


def test_a_refusal_within_the_fit_says_how_to_plan_for_it():
  """Refused under the 80% plan, a program needing 85% of the chip would still fit (90%)."""
  assert 'within the 90% a fit allows' in aot.refusal_note(13.6, 16, 0.8)
  assert aot.refusal_note(15.0, 16, 0.8) == ''  # beyond 90%: it does not fit
  assert aot.refusal_note(13.6, 16, 0.9) == ''  # the plan was the fit's
  assert aot.refusal_note(None, 16, 0.8) == ''
