"""config.batch_size='auto' (loop/auto_batch.py): the largest batch whose compiled step fits
the budget, the next legal size does not; the learning rate follows config.optimizer.lr_scaling."""

import math

import pytest

from core.errors import KilnError
from loop import auto_batch
from loop import experiment as experiment_lib
from tests.tiny import tiny_config


def test_learning_rate_scales_linearly_or_by_the_square_root():
  c = tiny_config()
  c.optimizer.learning_rate, c.optimizer.reference_batch_size = 1e-3, 32
  c.optimizer.lr_scaling = 'linear'
  assert auto_batch.scaled_learning_rate(c, 128) == pytest.approx(4e-3)
  c.optimizer.lr_scaling = 'sqrt'
  assert auto_batch.scaled_learning_rate(c, 128) == pytest.approx(2e-3)
  c.optimizer.lr_scaling = 'none'
  assert auto_batch.scaled_learning_rate(c, 128) == 1e-3
  c.optimizer.lr_scaling, c.optimizer.reference_batch_size = 'sqrt', 0
  with pytest.raises(KilnError, match='set config.optimizer.reference_batch_size'):
    auto_batch.scaled_learning_rate(c, 128)


@pytest.mark.slow
def test_auto_picks_the_largest_batch_under_the_budget():
  """A budget between the peaks of two legal sizes: 'auto' picks the smaller, whose compiled
  peak is within it, and the next legal size's is not."""
  c = tiny_config()
  # On the 8 test devices every multiple of 8 is a legal batch (the search's step).
  c.optimizer.reference_batch_size, c.optimizer.lr_scaling = 32, 'sqrt'
  exp = experiment_lib.build_experiment(c)
  state, shardings = exp.create_state()
  host_batch = next(iter(exp.task.train_batches(exp.host_batch, 0)))
  step = exp.train_step(shardings)
  peak = {b: auto_batch.step_peak_bytes(exp, step, state, host_batch, b) for b in (64, 72)}
  assert peak[72] > peak[64]
  c.batch_size = 'auto'
  c.auto_batch.limit_gb = (peak[64] + peak[72]) / 2 / 2**30
  resolved = auto_batch.resolve(c)
  assert resolved.batch_size == 64 and c.batch_size == 'auto'
  assert resolved.optimizer.learning_rate == pytest.approx(1e-2 * math.sqrt(64 / 32))


@pytest.mark.slow  # Compiles the DP-SGD step at several sizes.
def test_auto_searches_with_dp_sgd_padded_batches():
  """DP-SGD's step reads its Poisson batch's mask: the search must compile it with one."""
  c = tiny_config()
  c.privacy.enabled = True
  c.privacy.noise_multiplier, c.privacy.target_epsilon = 1.0, 0.0  # No calibration: fast.
  c.model.norm = 'group'  # DP-SGD refuses BatchNorm.
  c.batch_size = 'auto'
  c.auto_batch.limit_gb = 1.0  # Ample: the search stops at max_batch_size.
  c.auto_batch.max_batch_size = 32
  assert auto_batch.resolve(c).batch_size == 32
