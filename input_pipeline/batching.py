"""Per-host batches: a resumable shuffled train stream and an exact, padded eval pass."""

import itertools
from typing import Iterator

import numpy as np
from absl import logging
import tensorflow as tf

from input_pipeline.sources import HostSplit

# Multiplier that spreads consecutive epoch numbers over unrelated shuffle seeds.
_EPOCH_SEED_STRIDE = 1_000_003
_POISSON_STREAM = 0x706F6973  # Keeps Poisson draws apart from any other use of the seed.


def _rows_per_batch(split: HostSplit, host_batch_size: int) -> int:
  return host_batch_size * (split.process_count if split.sliced else 1)


def _this_host_rows(split: HostSplit, ds: tf.data.Dataset, host_batch_size: int):
  if not split.sliced or split.process_count == 1:
    return ds
  start = split.process_index * host_batch_size
  return ds.map(lambda batch: tf.nest.map_structure(
      lambda x: x[start:start + host_batch_size], batch))


def train_batches(split: HostSplit, host_batch_size: int, seed: int, shuffle_buffer: int,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless full batches; the order depends only on (seed, epoch), so a run resumed at
  `start_step` sees exactly the batches an uninterrupted run would have seen."""
  rows = _rows_per_batch(split, host_batch_size)
  first_epoch, offset = divmod(start_step * rows, split.num_examples)
  buffer = min(shuffle_buffer, split.num_examples)

  def one_epoch(epoch):
    epoch_seed = tf.constant(seed, tf.int64) * _EPOCH_SEED_STRIDE + epoch
    return split.examples.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)

  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(one_epoch)
  ds = ds.skip(offset).batch(rows, drop_remainder=True)
  return _this_host_rows(split, ds, host_batch_size).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def num_eval_batches(split: HostSplit, host_batch_size: int) -> int:
  return -(-split.max_examples_per_host // _rows_per_batch(split, host_batch_size))


def eval_batches(split: HostSplit, host_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Every example of the split exactly once over all hosts, with `mask` 1; padding
  examples carry mask 0. All hosts yield the same number of batches, so that collective
  eval steps line up across processes.
  """
  rows = _rows_per_batch(split, host_batch_size)
  with_mask = split.examples.map(lambda ex: {**ex, 'mask': tf.constant(1.0, tf.float32)})
  padding = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype),
                                  with_mask.element_spec)
  total = num_eval_batches(split, host_batch_size) * rows
  ds = with_mask.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
  ds = ds.take(total).batch(rows, drop_remainder=True)
  return _this_host_rows(split, ds, host_batch_size).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def _in_memory(split: HostSplit) -> dict[str, np.ndarray]:
  """The whole split as arrays (Poisson sampling needs random access to every example)."""
  return split.examples.batch(max(split.num_examples, 1)).get_single_element()


def poisson_batches(split: HostSplit, host_batch_size: int, sampling_rate: float, seed: int,
                    start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches in which every example is present with probability `sampling_rate`,
  independently (DP-SGD's Poisson sampling), padded to a fixed `host_batch_size` rows with
  `mask` 0 so that no step recompiles. A sample larger than the padded shape (rare by
  choice of the shape) loses its surplus, with a warning. Step `s` draws from (seed, s)
  alone, so a resumed run sees the very same samples."""
  arrays = {k: np.asarray(v) for k, v in _in_memory(split).items()}
  rows = _rows_per_batch(split, host_batch_size)
  # Sliced: every host draws the same global sample and keeps its rows; sharded: each host
  # samples its own examples.
  stream = 0 if split.sliced else split.process_index
  first_row = split.process_index * host_batch_size if split.sliced else 0
  for step in itertools.count(start_step):
    rng = np.random.default_rng([seed, step, stream, _POISSON_STREAM])
    chosen = np.flatnonzero(rng.random(split.num_examples) < sampling_rate)
    if len(chosen) > rows:
      logging.warning('Poisson sample of %d examples at step %d exceeds the padded batch of %d: '
                      'the surplus is dropped', len(chosen), step, rows)
      chosen = chosen[:rows]
    rng.shuffle(chosen)
    batch = {}
    for key, values in arrays.items():
      padded = np.zeros((rows, *values.shape[1:]), values.dtype)
      padded[:len(chosen)] = values[chosen]
      batch[key] = padded[first_row:first_row + host_batch_size]
    mask = np.zeros(rows, np.float32)
    mask[:len(chosen)] = 1.0
    batch['mask'] = mask[first_row:first_row + host_batch_size]
    yield batch
