"""Shared test set-up: 8 fake CPU devices (set before JAX is imported) and tiny configs."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

from configs import default  # noqa: E402


def tiny_config():
  """The default digits config shrunk to compile and run in seconds on 8 fake devices."""
  c = default.get_config()
  c.model.features = (8, 16)
  c.model.dense_features = 32
  c.batch_size = 32
  c.eval_batch_size = 64  # 359 held-out digits: the last eval batch is padded.
  c.num_train_steps = 40
  c.schedule.warmup_steps = 5
  c.optimizer.learning_rate = 1e-2
  c.log_every_steps = 10
  c.eval_every_steps = 20
  c.checkpoint_every_steps = 20
  return c


@pytest.fixture(scope='session')
def devices():
  assert jax.device_count() == 8, 'tests expect 8 fake CPU devices'
  return jax.devices()
