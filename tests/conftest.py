"""Shared test set-up: 8 fake CPU devices, set before JAX is imported."""

import os

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
