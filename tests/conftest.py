"""Test set-up: 8 fake CPU devices (before jax is imported) and shared fixtures."""

import os

from xla_env import xla_flags

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + xla_flags(8)).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


def pytest_configure(config):
  """xdist sends a group's tests to one worker by the "@group" it appends to their ids; pytest
  9.2 ignores that with xdist 3.8 (pytest-xdist#1386), so each grouped module's costly fixtures
  were built on both workers: minutes more for the suite, and nothing failing."""
  if config.getoption('dist', 'no') == 'loadgroup' and pytest.version_tuple[:2] >= (9, 2):
    raise pytest.UsageError(
        f"pytest {pytest.__version__} loses --dist loadgroup's groups (pytest-xdist#1386): "
        'install requirements-dev.txt (pytest 9.1.1)'
    )


@pytest.fixture(scope='session')
def devices():
  assert len(jax.devices()) == 8, 'tests expect 8 fake CPU devices'
  return jax.devices()


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  """`gs://` paths in an empty in-memory object store, through epath's fsspec backend.

  As gcsfs does, opening a file to append ('a') truncates it: object stores cannot append.
  The test runs in `tmp_path`, which must stay empty: a workdir path handled as a local one
  would land in `./gs:/...` there. Returns the store's file system.
  """
  import importlib

  import fsspec
  from etils.epath import backend
  from fsspec.implementations.memory import MemoryFileSystem

  class FakeGCS(MemoryFileSystem):
    protocol = ('gs', 'gcs')
    root_marker = ''
    cachable = False
    store = {}
    pseudo_dirs = ['']

    @classmethod
    def _strip_protocol(cls, path):
      return fsspec.utils.stringify_path(path).removeprefix('gs://').strip('/')

    def _open(self, path, mode='rb', **kwargs):
      return super()._open(path, mode.replace('a', 'w'), **kwargs)

  registry = importlib.import_module('fsspec.registry')._registry  # `fsspec.registry` is a view
  for name in FakeGCS.protocol:
    monkeypatch.setitem(registry, name, FakeGCS)  # undone after the test
  backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the file systems
  monkeypatch.chdir(tmp_path)
  yield FakeGCS()
  backend.fsspec_backend._get_filesystem.cache_clear()
  assert not list(tmp_path.iterdir()), 'a gs:// path was written as a local one'
