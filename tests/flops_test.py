"""The accelerators' data-sheet peaks, looked up by the device_kind JAX reports."""

import pytest

from llama4_jax import flops
from llama4_jax.tools import aot


@pytest.mark.parametrize(
    'device_kind, peak',
    [
        ('TPU v4', 275e12),
        ('TPU v5', 459e12),  # a v5p
        ('TPU v5 lite', 197e12),  # a v5e
        ('TPU v6 lite', 918e12),  # a v6e
        ('NVIDIA H100 80GB HBM3', 989e12),
        ('NVIDIA A100-SXM4-80GB', 312e12),
        ('NVIDIA L4', 121e12),
        ('NVIDIA L40S', None),  # not an L4
        ('cpu', None),
    ],
)
def test_bf16_peak_by_device_kind(device_kind, peak):
  assert flops.bf16_peak(device_kind) == peak


@pytest.mark.parametrize('name, peak', [('v5p-8', 459e12), ('v5e-8', 197e12), ('v6e-8', 918e12)])
def test_bf16_peak_of_the_device_kinds_libtpu_reports(name, peak):
  devices = aot.tpu_devices(aot.tpu_slice(name))
  assert flops.bf16_peak(devices[0].device_kind) == peak
