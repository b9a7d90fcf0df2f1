"""Shared test set-up, before JAX is imported: 8 fake CPU devices, and host memory kept for
reuse as train.py keeps it (core.host_memory)."""

import os

from core import host_memory

host_memory.configure()

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
