"""The XLA flags of the tests' processes. No jax here: conftest.py sets them before jax starts."""

# The tests' models are tiny, so their programs spend far longer in XLA's CPU backend (LLVM)
# than running. Without LLVM's optimisations the small run's train step on 8 devices compiled
# in 14 s instead of 26, its random initialisation in 6.5 s instead of 20 (each random call
# site costs about 0.8 s to optimise), and a step ran in 0.59 s instead of 0.34.
FAST_COMPILE = '--xla_backend_optimization_level=0'


def xla_flags(devices: int) -> str:
  """`devices` fake CPU devices, compiled for compile speed."""
  return f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}'
