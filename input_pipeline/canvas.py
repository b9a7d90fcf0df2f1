"""A detection dataset built from real MNIST digits: canvases of 1-5 scattered digits with
boxes and labels.

The digits are the MNIST test split's (the 'mnist_t10k' files), split by
`sources.holdout_split` exactly as the 'mnist_t10k' classification source splits them:
train canvases paste only train-part digits, eval canvases only held-out digits, so a
detector is scored on handwriting it never saw. Each digit is scaled to a random side in
`digit_size` and pasted at a random position where its square does not overlap any
other digit's square; its box is the tight box around its ink (the 28x28 frame's nonzero
pixels, scaled), so boxes never overlap either. Layouts depend only on
`detection.canvas_seed`, never on the training seed.

Examples: 'image' [S, S, 1] float32 in [0, 1]; 'boxes' [max_objects, 4] float32
(x0, y0, x1, y1) in pixels; 'labels' [max_objects] int32, -1 where there is no object.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from core.errors import KilnError
from input_pipeline import sources
from input_pipeline.sources import HostSplit

# Placement attempts per digit before a crowded canvas gets one digit fewer.
_PLACEMENT_ATTEMPTS = 50


@dataclasses.dataclass(frozen=True)
class Canvases:
  images: np.ndarray  # [N, S, S] uint8.
  boxes: np.ndarray  # [N, max_objects, 4] float32 (x0, y0, x1, y1) pixels; 0 where unused.
  labels: np.ndarray  # [N, max_objects] int32 digit class; -1 where unused.
  digits: np.ndarray  # [N, max_objects] int64 index of the pasted digit; -1 where unused.


@dataclasses.dataclass(frozen=True)
class CanvasSource(sources.Source):
  """An image Source whose examples also carry up to `max_objects` boxes and labels."""
  max_objects: int


def check_config(config) -> None:
  """`config` is config.detection; one-line KilnErrors for layouts that cannot be built."""
  low, high = config.digit_size
  if not 1 <= config.min_objects <= config.max_objects:
    raise KilnError(f'config.detection.min_objects={config.min_objects} and max_objects='
                    f'{config.max_objects} must satisfy 1 <= min <= max')
  if not 8 <= low <= high <= config.canvas_size:
    raise KilnError(f'config.detection.digit_size={tuple(config.digit_size)} must satisfy '
                    f'8 <= low <= high <= canvas_size ({config.canvas_size})')
  if config.max_objects * low * low > config.canvas_size ** 2 // 2:
    raise KilnError(f'{config.max_objects} digits of side >= {low} cannot be spread over a '
                    f'{config.canvas_size}px canvas: lower detection.max_objects or digit_size, '
                    'or raise canvas_size')
  if config.num_train_canvases < 1 or config.num_eval_canvases < 1:
    raise KilnError('config.detection.num_train_canvases and num_eval_canvases must be >= 1')


def _ink_boxes(digits: np.ndarray) -> np.ndarray:
  """[N, 4] (x0, y0, x1, y1) of each 28x28 digit's nonzero pixels, in frame units."""
  ink = digits > 0
  rows, cols = ink.any(axis=2), ink.any(axis=1)
  size = digits.shape[1]
  y0, x0 = rows.argmax(axis=1), cols.argmax(axis=1)
  y1 = size - rows[:, ::-1].argmax(axis=1)
  x1 = size - cols[:, ::-1].argmax(axis=1)
  return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def _layouts(rng: np.random.Generator, count: int, num_digits: int, config):
  """Per canvas, a list of (digit index, side, x, y) whose squares do not overlap."""
  low, high = config.digit_size
  layouts = []
  for _ in range(count):
    placed = []
    for _ in range(rng.integers(config.min_objects, config.max_objects + 1)):
      side = int(rng.integers(low, high + 1))
      for _ in range(_PLACEMENT_ATTEMPTS):
        x, y = rng.integers(0, config.canvas_size - side + 1, size=2)
        if all(x + side <= px or px + ps <= x or y + side <= py or py + ps <= y
               for _, ps, px, py in placed):
          placed.append((int(rng.integers(num_digits)), side, int(x), int(y)))
          break
    layouts.append(placed)
  return layouts


def make_canvases(digits: np.ndarray, labels: np.ndarray, count: int, config,
                  seed: int) -> Canvases:
  """`count` canvases from `digits` [N, 28, 28] float in [0, 1] and their `labels`."""
  check_config(config)
  size, max_objects = config.canvas_size, config.max_objects
  layouts = _layouts(np.random.default_rng(seed), count, len(digits), config)
  frame = digits.shape[1]
  ink = _ink_boxes(digits)
  images = np.zeros((count, size, size), np.float32)
  boxes = np.zeros((count, max_objects, 4), np.float32)
  out_labels = np.full((count, max_objects), -1, np.int32)
  pasted = np.full((count, max_objects), -1, np.int64)
  placements = [(c, k, *p) for c, layout in enumerate(layouts) for k, p in enumerate(layout)]
  # One resize call per digit side rather than one per pasted digit.
  for side in sorted({p[3] for p in placements}):
    group = [p for p in placements if p[3] == side]
    resized = tf.image.resize(digits[[p[2] for p in group]][..., None], (side, side),
                              method='bilinear', antialias=True).numpy()[..., 0]
    for (c, k, digit, _, x, y), patch in zip(group, resized):
      region = images[c, y:y + side, x:x + side]
      np.maximum(region, patch, out=region)
      boxes[c, k] = ink[digit] * (side / frame) + np.array([x, y, x, y], np.float32)
      out_labels[c, k] = labels[digit]
      pasted[c, k] = digit
  images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
  return Canvases(images=images, boxes=boxes, labels=out_labels, digits=pasted)


def _host_split(canvases: Canvases, process_index: int, process_count: int) -> HostSplit:
  examples = tf.data.Dataset.from_tensor_slices({
      'image': canvases.images[..., None], 'boxes': canvases.boxes,
      'labels': canvases.labels, 'index': np.arange(len(canvases.images), dtype=np.int32)})
  examples = examples.map(lambda ex: {**ex, 'image': tf.cast(ex['image'], tf.float32) / 255.0})
  count = len(canvases.images)
  return HostSplit(examples, count, count, process_index, process_count, sliced=True)


def build(config) -> tuple[Canvases, Canvases, int]:
  """(train canvases, eval canvases, number of classes) from the MNIST IDX files that
  config.dataset points at; `digits` hold indices into those files."""
  dataset, detection = config.dataset, config.detection
  if dataset.name != 'mnist_t10k':
    raise KilnError(f"detection canvases are built from MNIST IDX digits: set "
                    f"config.dataset.name='mnist_t10k' (got '{dataset.name}')")
  check_config(detection)
  digits, labels = sources._read_mnist_idx(sources.mnist_idx_dir(dataset.data_dir))
  train_idx, eval_idx = sources.holdout_split(len(labels), dataset.holdout_fraction,
                                              dataset.split_seed)
  # Separate streams per split, so changing one split's size leaves the other unchanged.
  splits = []
  for stream, (part, count) in enumerate(((train_idx, detection.num_train_canvases),
                                          (eval_idx, detection.num_eval_canvases))):
    made = make_canvases(digits[part, ..., 0], labels[part], count, detection,
                         [detection.canvas_seed, stream])
    splits.append(dataclasses.replace(made, digits=np.where(made.digits >= 0,
                                                           part[made.digits], -1)))
  return splits[0], splits[1], int(labels.max()) + 1


def load(config, process_index: int, process_count: int) -> CanvasSource:
  """This host's view of the train and eval canvases (see `build`)."""
  train, eval_, num_classes = build(config)
  detection = config.detection
  return CanvasSource(train=_host_split(train, process_index, process_count),
                      eval=_host_split(eval_, process_index, process_count),
                      num_classes=num_classes,
                      image_shape=(detection.canvas_size, detection.canvas_size, 1),
                      max_objects=detection.max_objects)
