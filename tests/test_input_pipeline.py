"""Host-side data: exact eval, resumable train order, disjoint host slices, TFDS path."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from core.errors import KilnError
from input_pipeline import batching, sources
from tests.tiny import tiny_config


def _indices(split: sources.HostSplit) -> list[int]:
  return [int(ex['index']) for ex in split.examples.as_numpy_iterator()]


@pytest.mark.parametrize('process_count', [1, 3])
def test_eval_counts_every_example_once(process_count):
  dataset_config = tiny_config().dataset
  host_batch = 64 // process_count if process_count == 1 else 20  # Neither divides 359.
  seen, batch_counts = [], set()
  for process_index in range(process_count):
    source = sources.load(dataset_config, process_index, process_count)
    batches = list(batching.eval_batches(source.eval, host_batch))
    batch_counts.add(len(batches))
    for batch in batches:
      assert batch['image'].shape[0] == host_batch
      real = batch['mask'] > 0
      assert np.all(batch['image'][~real] == 0)
      seen += list(batch['index'][real])
  assert len(batch_counts) == 1  # Every host runs the same number of eval steps.
  everything = _indices(sources.load(dataset_config, 0, 1).eval)
  assert len(everything) == 359 and len(seen) == 359
  assert sorted(seen) == sorted(everything)


def test_train_order_resumes_exactly():
  source = sources.load(tiny_config().dataset, 0, 1)
  uninterrupted = batching.train_batches(source.train, 64, seed=7, shuffle_buffer=10_000)
  expected = [next(uninterrupted)['label'] for _ in range(30)]  # Crosses an epoch (22 batches).
  resumed = batching.train_batches(source.train, 64, seed=7, shuffle_buffer=10_000, start_step=19)
  for want in expected[19:]:
    np.testing.assert_array_equal(next(resumed)['label'], want)
  other_seed = batching.train_batches(source.train, 64, seed=8, shuffle_buffer=10_000)
  assert not np.array_equal(next(other_seed)['label'], expected[0])


def test_epochs_are_reshuffled_and_complete():
  source = sources.load(tiny_config().dataset, 0, 1)
  n = source.train.num_examples
  batches = batching.train_batches(source.train, n, seed=0, shuffle_buffer=10_000)
  first, second = next(batches)['index'], next(batches)['index']
  assert sorted(first) == sorted(second) == sorted(_indices(source.train))
  assert list(first) != list(second)


def test_hosts_read_disjoint_rows_of_the_same_global_batches():
  dataset_config = tiny_config().dataset
  single = batching.train_batches(sources.load(dataset_config, 0, 1).train, 64, seed=3,
                                  shuffle_buffer=10_000)
  hosts = [batching.train_batches(sources.load(dataset_config, i, 2).train, 32, seed=3,
                                  shuffle_buffer=10_000) for i in range(2)]
  for _ in range(25):  # Crosses an epoch boundary.
    rows = [next(host)['index'] for host in hosts]
    assert not set(rows[0]) & set(rows[1])
    np.testing.assert_array_equal(np.concatenate(rows), next(single)['index'])


def test_holdout_is_separate_from_training():
  source = sources.load(tiny_config().dataset, 0, 1)
  train, held_out = set(_indices(source.train)), set(_indices(source.eval))
  assert not train & held_out and len(train | held_out) == 1797


def test_mnist_t10k_split_is_deterministic_and_disjoint():
  config = tiny_config().dataset
  config.name = 'mnist_t10k'
  config.holdout_fraction = 0.15
  source = sources.load(config, 0, 1)
  assert (source.train.num_examples, source.eval.num_examples) == (8500, 1500)
  assert source.image_shape == (28, 28, 1) and source.num_classes == 10
  train_idx, eval_idx = sources.holdout_split(10_000, 0.15, config.split_seed)
  assert not set(train_idx) & set(eval_idx)
  np.testing.assert_array_equal(eval_idx, sources.holdout_split(10_000, 0.15, config.split_seed)[1])


def test_missing_mnist_dir_is_a_clear_error(tmp_path):
  config = tiny_config().dataset
  config.name = 'mnist_t10k'
  config.data_dir = str(tmp_path / 'absent')
  with pytest.raises(KilnError, match='not found in .*absent.*data_dir'):
    sources.load(config, 0, 1)


def test_tfds_path_under_mock_data():
  config = tiny_config().dataset
  config.name = 'tfds:mnist'
  with tfds.testing.mock_data(num_examples=50):
    source = sources.load(config, 1, 2)
    assert source.image_shape == (28, 28, 1) and source.num_classes == 10
    num_eval = source.eval.num_examples
    assert num_eval > 0 and num_eval % 8  # The last eval batch must be padded.
    batches = list(batching.eval_batches(source.eval, 8))
    assert len(batches) == -(-num_eval // 8) and sum(b['mask'].sum() for b in batches) == num_eval
    batch = next(batching.train_batches(source.train, 16, seed=0, shuffle_buffer=100))
    assert batch['image'].dtype == np.float32 and batch['image'].max() <= 1.0
    assert batch['label'].dtype == np.int32 and batch['image'].shape == (16, 28, 28, 1)
