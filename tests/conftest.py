"""Shared test set-up, before JAX is imported: 8 fake CPU devices, and glibc's own malloc
settings for this process and the scripts it starts (backends.cpu.host_memory's one arena slows
XLA's multi-threaded compiles, which are most of the suite's time: two speech tests 36 s on
glibc's defaults vs 47 s kept; tests/test_host_memory.py covers keeping)."""

import os

os.environ.setdefault('KILN_HOST_MALLOC', 'system')

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.tiny import tiny_config  # noqa: E402,F401  (older imports use this path)


@pytest.fixture(scope='session')
def devices():
  assert jax.device_count() == 8, 'tests expect 8 fake CPU devices'
  return jax.devices()


@pytest.fixture(scope='session')
def multihost_reference(tmp_path_factory, devices):
  """(workdir, summary) of multihost_config run in one process on 8 devices: the reference that
  test_multihost's and test_fault_tolerance's two-process jobs must equal (trained once)."""
  import train
  from tests.tiny import multihost_config
  workdir = str(tmp_path_factory.mktemp('multihost_one_process'))
  return workdir, train.train_and_evaluate(multihost_config(), workdir)


# The files with the longest tests, first. `make test` runs two workers that take a whole file
# at a time in collection order; alphabetically, test_tune.py and test_vision.py came last and
# left one core idle for the suite's last minutes: 19:56 on 2 cores, 19:06 in this order.
_LONGEST_FIRST = ('test_serve.py', 'test_cpu_kernels.py', 'test_fault_tolerance.py',
                  'test_notebooks.py', 'test_tune.py', 'test_multihost.py', 'test_export.py',
                  'test_vision.py', 'test_distillation.py', 'test_serving.py')


def pytest_collection_modifyitems(items):
  rank = {name: place for place, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: the rest as found.
