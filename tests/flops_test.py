"""The accelerators' data-sheet peaks, looked up by the device_kind JAX reports."""

import json
import subprocess
import sys

import pytest

from llama4_jax import flops

import small_run


@pytest.mark.parametrize(
    'device_kind, peak',
    [
        ('TPU v4', 275e12),
        ('TPU v5', 459e12),  # a v5p
        ('TPU v5 lite', 197e12),  # a v5e
        ('TPU v6 lite', 918e12),  # a v6e
        ('NVIDIA H100 80GB HBM3', 989e12),
        ('NVIDIA H100 PCIe', 756e12),
        ('NVIDIA H100 NVL', 835e12),
        ('NVIDIA H100 PCIe 80GB', 756e12),
        ('TPU v4 lite', None),  # a v4i, no v4
        ('NVIDIA GH200 480GB', 989e12),
        ('NVIDIA A100-SXM4-80GB', 312e12),
        ('NVIDIA L4', 121e12),
        ('NVIDIA L40S', None),  # not an L4
        ('cpu', None),
    ],
)
def test_bf16_peak_by_device_kind(device_kind, peak):
  assert flops.bf16_peak(device_kind) == peak


_DEVICE_KINDS = """
import json, os
from llama4_jax.tools import aot
before = dict(os.environ)
kinds = {n: aot.tpu_devices(aot.tpu_slice(n))[0].device_kind for n in ('v5p-8', 'v5e-8', 'v6e-8')}
print(json.dumps({'kinds': kinds, 'environment_kept': dict(os.environ) == before}))
"""


@pytest.mark.slow
def test_bf16_peak_of_the_device_kinds_libtpu_reports():
  # In a process of its own, to load libtpu away from the test worker's JAX.
  result = subprocess.run(
      [sys.executable, '-c', _DEVICE_KINDS], cwd=small_run.REPO, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr[-3000:]
  probe = json.loads(result.stdout.strip().splitlines()[-1])
  peaks = {name: flops.bf16_peak(kind) for name, kind in probe['kinds'].items()}
  assert peaks == {'v5p-8': 459e12, 'v5e-8': 197e12, 'v6e-8': 918e12}, probe['kinds']
  # libtpu's variables (TPU_ACCELERATOR_TYPE, ...) would make the scripts this process starts
  # later take themselves for a TPU pod's workers.
  assert probe['environment_kept']
