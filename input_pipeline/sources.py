"""Where examples come from: bundled digits, local MNIST IDX files, or TFDS by name.

Every source hands back, for this host only, a train and an eval `tf.data.Dataset`
of fixed-shape examples, their counts, and what the task needs to size its model;
'mnist' also a test split (the official 10,000 t10k images) reported once at the end.
"""

import contextlib
import dataclasses
import gzip
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from core.errors import KilnError

REPO_ROOT = Path(__file__).resolve().parents[1]
TFDS_PREFIX = 'tfds:'
LOCAL_SOURCES = ('digits', 'mnist', 'mnist_t10k')
# (images, labels) files of each official MNIST split, named as TFDS and yann.lecun.com do.
MNIST_IDX_FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
                   'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}
# Local MNIST source -> (its folder under shared_datasets_dir(), the splits it reads).
MNIST_SOURCES = {'mnist': ('mnist', ('train', 'test')),
                 'mnist_t10k': ('mnist_t10k', ('test',))}


@dataclasses.dataclass(frozen=True)
class HostSplit:
  """One split as this host reads it, in one of two ways.

  Sliced (small in-memory sources): `examples` is the whole split and every host forms
  the same global batches, keeping only its own rows, so a run's batches do not depend
  on the number of processes. Sharded (TFDS): `examples` is this host's share of the
  files and hosts batch independently.
  """
  examples: tf.data.Dataset  # Unshuffled, unbatched, preprocessed examples.
  num_examples: int  # Examples in `examples`.
  max_examples_per_host: int  # Sharded: the largest host's count, so eval steps line up.
  process_index: int = 0
  process_count: int = 1
  sliced: bool = False  # True: take this host's rows of each global batch.


@dataclasses.dataclass(frozen=True)
class Source:
  train: HostSplit
  eval: HostSplit
  num_classes: int
  image_shape: tuple[int, int, int]
  # Reported once at the end of a run, never used to choose anything; None: no test split.
  # Keyword-only so that subclasses may add fields without defaults.
  test: HostSplit | None = dataclasses.field(default=None, kw_only=True)
  # Per-example class features beside the label (a TFDS ClassLabel such as cifar100's
  # coarse_label) -> their class names: what config.fairness.group may name.
  group_features: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict,
                                                                 kw_only=True)


def shared_datasets_dir() -> Path:
  """The shared real datasets: $KILN_DATASETS, else ../shared/datasets beside the repo."""
  return Path(os.environ.get('KILN_DATASETS', REPO_ROOT.parent / 'shared' / 'datasets'))


def check_dataset_name(name: str) -> None:
  if name in LOCAL_SOURCES or (name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX)):
    return
  raise KilnError(
      f"unknown dataset '{name}': set config.dataset.name to one of "
      f"{', '.join(LOCAL_SOURCES)} or 'tfds:<name>' (e.g. tfds:mnist)")


def mnist_idx_dir(data_dir: str, name: str = 'mnist_t10k') -> Path:
  """Resolves and checks the folder holding the IDX files of MNIST source `name`."""
  default, splits = MNIST_SOURCES[name]
  folder = Path(data_dir).expanduser() if data_dir else shared_datasets_dir() / default
  missing = [f for split in splits for f in MNIST_IDX_FILES[split] if not (folder / f).is_file()]
  if missing:
    raise KilnError(
        f"MNIST IDX files {', '.join(missing)} not found in '{folder}': point "
        f"config.dataset.data_dir (or $KILN_DATASETS) at a folder that has them")
  return folder


def load(config, process_index: int, process_count: int) -> Source:
  """Builds this host's view of the dataset named by `config.name` (a dataset config)."""
  check_dataset_name(config.name)
  if config.name.startswith(TFDS_PREFIX):
    return _tfds_source(config, process_index, process_count)
  if config.name == 'digits':
    images, labels = _sklearn_digits()
  elif config.name == 'mnist':
    # Official train split -> train + held out (validation); official t10k -> test.
    folder = mnist_idx_dir(config.data_dir, 'mnist')
    source = _array_source(*_read_mnist_idx(folder, 'train'), config, process_index,
                           process_count)
    images, labels = _read_mnist_idx(folder, 'test')
    test = _sliced_split(images, labels, np.arange(len(labels)), process_index, process_count)
    return dataclasses.replace(source, test=test)
  else:
    images, labels = _read_mnist_idx(mnist_idx_dir(config.data_dir))
  return _array_source(images, labels, config, process_index, process_count)


def _sklearn_digits():
  from sklearn.datasets import load_digits
  digits = load_digits()
  # Pixel values are counts 0..16 of an 8x8 grid.
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  return images, digits.target.astype(np.int32)


def _read_mnist_idx(folder: Path, split: str = 'test'):
  images_file, labels_file = (folder / f for f in MNIST_IDX_FILES[split])
  with gzip.open(images_file) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
  with gzip.open(labels_file) as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)
  if len(images) != len(labels):
    raise KilnError(f"'{folder}' holds {len(images)} images but {len(labels)} labels: "
                    'replace the IDX files with a matching pair')
  # A 256-entry table gives the same values as (images / 255.0).astype(np.float32) without
  # their float64 copy (376 MB for the 60,000 train images, seconds of page faults).
  return (np.arange(256) / 255.0).astype(np.float32)[images], labels.astype(np.int32)


def holdout_split(num_examples: int, holdout_fraction: float, split_seed: int):
  """Fixed train / held-out index sets, independent of the training seed."""
  if not 0.0 < holdout_fraction < 1.0:
    raise KilnError(f'config.dataset.holdout_fraction={holdout_fraction} must lie in (0, 1)')
  order = np.random.default_rng(split_seed).permutation(num_examples)
  num_holdout = max(1, int(round(num_examples * holdout_fraction)))
  return np.sort(order[num_holdout:]), np.sort(order[:num_holdout])


def _sliced_split(images, labels, indices, process_index, process_count) -> HostSplit:
  # 'index' (position in the source) lets eval outputs be traced back to examples.
  examples = tf.data.Dataset.from_tensor_slices(
      {'image': images[indices], 'label': labels[indices], 'index': indices.astype(np.int32)})
  return HostSplit(examples, len(indices), len(indices), process_index, process_count,
                   sliced=True)


def _array_source(images, labels, config, process_index, process_count) -> Source:
  train_idx, eval_idx = holdout_split(len(labels), config.holdout_fraction, config.split_seed)

  def host_split(indices):
    return _sliced_split(images, labels, indices, process_index, process_count)

  return Source(train=host_split(train_idx), eval=host_split(eval_idx),
                num_classes=int(labels.max()) + 1, image_shape=tuple(images.shape[1:]))


def tfds_builder(config):
  """The TFDS builder that config.name ('tfds:<name>') names, or a one-line KilnError."""
  import tensorflow_datasets as tfds
  name = config.name[len(TFDS_PREFIX):]
  try:
    return tfds.builder(name, data_dir=config.tfds_data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise KilnError(f"TFDS has no dataset '{name}': check config.dataset.name "
                    '(tfds.list_builders() lists them)') from e


def check_tfds_split(builder, split: str) -> None:
  if builder.info.splits and split not in builder.info.splits:
    raise KilnError(f"TFDS dataset '{builder.name}' has no split '{split}': set config.dataset."
                    f"train_split / eval_split to one of {', '.join(builder.info.splits.keys())}")


@contextlib.contextmanager
def tfds_prepared(builder):
  """Turns the assertion TFDS raises for data that was never prepared into a KilnError."""
  try:
    yield
  except AssertionError as e:
    raise KilnError(f"TFDS dataset '{builder.name}' is not prepared under "
                    f"'{builder.data_dir}': run tfds.builder('{builder.name}')"
                    '.download_and_prepare() with internet, or set config.dataset.tfds_data_dir'
                    ) from e


def _tfds_source(config, process_index, process_count) -> Source:
  import tensorflow_datasets as tfds
  builder = tfds_builder(config)
  info = builder.info

  def host_split(split):
    check_tfds_split(builder, split)
    per_host = tfds.even_splits(split, n=process_count, drop_remainder=False)
    datasets = [builder.as_dataset(split=s, shuffle_files=False) for s in per_host]
    counts = [_num_examples(info, s, ds) for s, ds in zip(per_host, datasets)]
    examples = datasets[process_index].map(
        lambda example: _tfds_image_example(example, tuple(group_features)),
        num_parallel_calls=tf.data.AUTOTUNE)
    return HostSplit(examples, counts[process_index], max(counts))

  group_features = {name: tuple(feature.names) for name, feature in info.features.items()
                    if name not in ('image', 'label') and feature.shape == ()
                    and isinstance(feature, tfds.features.ClassLabel)}
  with tfds_prepared(builder):
    train, eval_ = host_split(config.train_split), host_split(config.eval_split)
  return Source(train=train, eval=eval_, num_classes=info.features['label'].num_classes,
                image_shape=tuple(info.features['image'].shape), group_features=group_features)


def _num_examples(info, split: str, dataset: tf.data.Dataset) -> int:
  if info.splits:
    return info.splits[split].num_examples
  # No split metadata (e.g. under tfds.testing.mock_data): ask the dataset itself.
  cardinality = int(dataset.cardinality())
  return cardinality if cardinality >= 0 else int(dataset.reduce(0, lambda n, _: n + 1))


def _tfds_image_example(example, group_features: tuple[str, ...] = ()):
  return {'image': tf.cast(example['image'], tf.float32) / 255.0,
          'label': tf.cast(example['label'], tf.int32),
          **{name: tf.cast(example[name], tf.int32) for name in group_features}}
