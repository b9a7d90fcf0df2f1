"""The full MNIST source (train / held out / official test) and test-split reporting."""

import os

import numpy as np
import pytest

import train
from core.errors import KilnError
from input_pipeline import sources
from loop.experiment import Experiment, build_experiment
from monitor import run_log
from tests.tiny import tiny_config


def _mnist_config():
  c = tiny_config()
  c.dataset.name = 'mnist'
  c.dataset.holdout_fraction = 1 / 12
  c.eval_batch_size = 512
  return c


def _all(split):
  """Every example of a split in one batch of NumPy arrays."""
  return next(split.examples.batch(split.num_examples).as_numpy_iterator())


def test_mnist_has_train_held_out_and_official_test_splits():
  source = sources.load(_mnist_config().dataset, 0, 1)
  assert (source.train.num_examples, source.eval.num_examples, source.test.num_examples) == (
      55_000, 5_000, 10_000)
  assert source.image_shape == (28, 28, 1) and source.num_classes == 10
  # The held-out slice is the fixed one holdout_split draws; training has the rest.
  train_idx, eval_idx = sources.holdout_split(60_000, 1 / 12, _mnist_config().dataset.split_seed)
  np.testing.assert_array_equal(_all(source.eval)['index'], eval_idx)
  assert not set(train_idx) & set(eval_idx) and len(train_idx) + len(eval_idx) == 60_000
  test = _all(source.test)
  t10k_images, t10k_labels = sources._read_mnist_idx(sources.mnist_idx_dir('', 'mnist_t10k'))
  np.testing.assert_array_equal(test['index'], np.arange(10_000))
  np.testing.assert_array_equal(test['image'], t10k_images)
  np.testing.assert_array_equal(test['label'], t10k_labels)
  assert np.bincount(test['label']).min() == 892  # The published class counts, 892-1,135.


def test_only_mnist_has_a_test_split():
  assert sources.load(tiny_config().dataset, 0, 1).test is None  # Bundled digits.
  config = tiny_config().dataset
  config.name = 'mnist_t10k'
  assert sources.load(config, 0, 1).test is None


@pytest.mark.parametrize('missing', ['train-labels-idx1-ubyte.gz', 't10k-images-idx3-ubyte.gz'])
def test_a_missing_mnist_file_is_one_line(tmp_path, missing):
  for name in os.listdir(sources.mnist_idx_dir('', 'mnist')):
    if name != missing:
      (tmp_path / name).symlink_to(sources.mnist_idx_dir('', 'mnist') / name)
  config = _mnist_config().dataset
  config.data_dir = str(tmp_path)
  with pytest.raises(KilnError) as error:
    sources.load(config, 0, 1)
  message = str(error.value)
  assert '\n' not in message and missing in message and 'config.dataset.data_dir' in message


@pytest.mark.slow  # A CNN compile and 15,000 eval images.
def test_a_run_on_mnist_reports_the_10000_test_images(tmp_path, devices, monkeypatch):
  config = _mnist_config()
  config.num_train_steps = 4
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 4
  totals = {}
  evaluate = Experiment.evaluate

  def recording(self, eval_step, state, split='eval'):
    totals[split] = evaluate(self, eval_step, state, split)
    return totals[split]

  monkeypatch.setattr(Experiment, 'evaluate', recording)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert set(summary['test']) == {'accuracy', 'loss'}
  assert int(totals['test'].accuracy.count) == 10_000  # Every test image once, no padding.
  assert int(totals['eval'].accuracy.count) == 5_000
  assert summary['test']['accuracy'] == pytest.approx(float(totals['test'].accuracy.compute()))
  scalars = run_log.read_scalars(str(tmp_path))
  assert list(scalars['test_accuracy'][1]) == pytest.approx([summary['test']['accuracy']])


def test_evaluate_without_a_test_split_is_none(devices):
  exp = build_experiment(tiny_config())  # Digits: no test split; nothing is compiled.
  assert exp.task.test_batches(exp.host_eval_batch) is None
  assert exp.evaluate(None, None, 'test') is None
