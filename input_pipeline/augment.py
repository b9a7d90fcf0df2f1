"""Host-side image augmentation for classification: crops, flips, normalisation, mixup, cutmix.

Two stages. `prepare_source` maps each example deterministically in tf.data: images of
any size become `image_size` squares (for ImageNet: eval resizes the shorter side to
image_size / eval_crop_fraction and takes the centre crop, the standard protocol), and
eval images are normalised. `augment_batches` then applies the random parts to whole
host batches in NumPy, drawing from a generator seeded by (seed, step), so a run resumed
at step s augments its batches exactly as the uninterrupted run did; the batch stream's
prefetch thread runs it alongside the device step.

Batch-level NumPy beats a per-example tf.data map here: the crops are one gather (or one
`tf.image.crop_and_resize` call) per batch instead of one op per image, and the
(seed, step) seeding needs no stateless-op plumbing inside the dataset (README, Vision,
has the measured rates).
"""

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf

from core.errors import KilnError
from input_pipeline.sources import Source

CROPS = ('none', 'pad_and_crop', 'random_resized_crop')
# Spreads augmentation draws away from other seeded streams that use (seed, step).
_SALT = 0x5EED_A06


def check_config(config) -> None:
  """One-line KilnErrors for augmentation settings that cannot work."""
  if config.crop not in CROPS:
    raise KilnError(f"config.augment.crop='{config.crop}' is not a crop: use one of {CROPS}")
  if config.image_size < 0 or config.pad < 0:
    raise KilnError(f'config.augment.image_size={config.image_size} and pad={config.pad} must '
                    'be >= 0')
  low, high = config.crop_scale
  if not 0 < low <= high <= 1:
    raise KilnError(f'config.augment.crop_scale={tuple(config.crop_scale)} must satisfy '
                    '0 < low <= high <= 1 (area fractions)')
  low, high = config.crop_ratio
  if not 0 < low <= high:
    raise KilnError(f'config.augment.crop_ratio={tuple(config.crop_ratio)} must satisfy '
                    '0 < low <= high (width / height)')
  if not 0 < config.eval_crop_fraction <= 1:
    raise KilnError(f'config.augment.eval_crop_fraction={config.eval_crop_fraction} must lie '
                    'in (0, 1]')
  if len(config.mean) != len(config.std) or any(s <= 0 for s in config.std):
    raise KilnError(f'config.augment.mean={tuple(config.mean)} and std={tuple(config.std)} '
                    'must have one entry per channel (or both be empty), std > 0')
  if config.mixup_alpha < 0 or config.cutmix_alpha < 0:
    raise KilnError(f'config.augment.mixup_alpha={config.mixup_alpha} and cutmix_alpha='
                    f'{config.cutmix_alpha} must be >= 0 (0 disables)')


def normalize(images, mean: Sequence[float], std: Sequence[float]):
  """(images - mean) / std per channel; works on NumPy arrays and TF tensors alike."""
  if not len(mean):
    return images
  return (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def resize_shorter_and_center_crop(image: tf.Tensor, shorter: int, crop: int) -> tf.Tensor:
  """Aspect-preserving resize of one image so its shorter side is `shorter`, then the
  central `crop` x `crop` square."""
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  scale = shorter / tf.minimum(height, width)
  size = tf.cast(tf.math.ceil(tf.stack([height * scale, width * scale])), tf.int32)
  size = tf.maximum(size, shorter)
  image = tf.image.resize(image, size, method='bilinear', antialias=True)
  top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
  # Offsets from tensors leave the slice's shape unknown; eval padding needs it static.
  return tf.ensure_shape(image[top:top + crop, left:left + crop], (crop, crop, image.shape[-1]))


def prepare_source(source: Source, config) -> Source:
  """The source with fixed-size images (when `config.image_size` > 0) and normalised
  eval images. Train images stay unnormalised: `augment_batches` crops them first.

  Train images become the central square of side image_size / eval_crop_fraction, out
  of which `random_resized_crop` samples; crops are thus drawn from the central square
  rather than the whole (non-square) image, which keeps batching to fixed shapes.
  """
  check_config(config)
  channels = source.image_shape[-1]
  if config.mean and len(config.mean) != channels:
    raise KilnError(f'config.augment.mean has {len(config.mean)} entries but the images have '
                    f'{channels} channels: give one per channel')
  size = config.image_size
  if not size:
    if None in source.image_shape:
      raise KilnError(f'images have varying sizes {source.image_shape}: set '
                      'config.augment.image_size (e.g. 224) to resize them')
    size = source.image_shape[0]
    if source.image_shape[0] != source.image_shape[1] and config.crop == 'random_resized_crop':
      raise KilnError('random_resized_crop needs square inputs: set config.augment.image_size')
  base = int(round(size / config.eval_crop_fraction))
  train_side = base if config.crop == 'random_resized_crop' else size

  def train_map(example):
    if config.image_size:
      example = {**example, 'image': resize_shorter_and_center_crop(example['image'], base,
                                                                    train_side)}
    return example

  def eval_map(example):
    image = example['image']
    if config.image_size:
      image = resize_shorter_and_center_crop(image, base, size)
    return {**example, 'image': normalize(image, config.mean, config.std)}

  def mapped(split, fn):
    examples = split.examples.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    return dataclasses.replace(split, examples=examples)

  if not config.image_size and not config.mean:
    return source
  return dataclasses.replace(source, train=mapped(source.train, train_map),
                             eval=mapped(source.eval, eval_map),
                             test=source.test and mapped(source.test, eval_map),
                             image_shape=(size, size, channels))


def batch_rng(seed: int, step: int) -> np.random.Generator:
  return np.random.default_rng([_SALT, seed, step])


def pad_and_crop(images: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
  """Zero-pads each image by `pad` on every side and crops a random window of the original
  size back out (the CIFAR augmentation of He et al. 2016)."""
  if pad == 0:
    return images
  batch, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  top = rng.integers(0, 2 * pad + 1, batch)
  left = rng.integers(0, 2 * pad + 1, batch)
  rows = top[:, None] + np.arange(height)
  cols = left[:, None] + np.arange(width)
  return padded[np.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]


def sample_crop_boxes(rng: np.random.Generator, batch: int, height: int, width: int,
                      scale: Sequence[float], ratio: Sequence[float], attempts: int = 10
                      ) -> np.ndarray:
  """Random-resized-crop windows as [top, left, crop_height, crop_width] per image.

  torchvision's RandomResizedCrop.get_params (Szegedy et al. 2015's Inception crop):
  up to `attempts` draws of an area fraction in `scale` and a log-uniform aspect ratio
  in `ratio`; the first window that fits wins, else the central crop with the ratio
  clamped into range.
  """
  area = height * width
  log_ratio = np.log(ratio)
  boxes = np.zeros((batch, 4), np.int64)
  for b in range(batch):
    for _ in range(attempts):
      target = area * rng.uniform(*scale)
      aspect = math.exp(rng.uniform(*log_ratio))
      w = int(round(math.sqrt(target * aspect)))
      h = int(round(math.sqrt(target / aspect)))
      if 0 < w <= width and 0 < h <= height:
        boxes[b] = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
        break
    else:
      in_ratio = width / height
      if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
      elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
      else:
        w, h = width, height
      boxes[b] = (height - h) // 2, (width - w) // 2, h, w
  return boxes


def random_resized_crop(images: np.ndarray, size: int, rng: np.random.Generator,
                        scale: Sequence[float], ratio: Sequence[float]) -> np.ndarray:
  """Crops each image to a sampled window and resizes it (bilinear) to `size` x `size`."""
  batch, height, width, _ = images.shape
  top, left, h, w = sample_crop_boxes(rng, batch, height, width, scale, ratio).T
  # crop_and_resize's normalised coordinates put 0 and 1 on the first and last pixel centres.
  boxes = np.stack([top / (height - 1), left / (width - 1), (top + h - 1) / (height - 1),
                    (left + w - 1) / (width - 1)], axis=1).astype(np.float32)
  return tf.image.crop_and_resize(images, boxes, np.arange(batch, dtype=np.int32),
                                  (size, size), method='bilinear').numpy()


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors each image left-right with probability 1/2."""
  flip = rng.random(len(images)) < 0.5
  return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


def mixup(images: np.ndarray, labels: np.ndarray, alpha: float, rng: np.random.Generator):
  """Zhang et al. 2018: lam ~ Beta(alpha, alpha) per batch; each image becomes
  lam * itself + (1 - lam) * a partner from a permutation of the batch. Returns the
  images, the partners' labels and lam per example (the loss is lam * CE(label) +
  (1 - lam) * CE(partner's label))."""
  lam = rng.beta(alpha, alpha)
  perm = rng.permutation(len(images))
  mixed = lam * images + (1.0 - lam) * images[perm]
  return mixed.astype(images.dtype), labels[perm], np.full(len(images), lam, np.float32)


def cutmix(images: np.ndarray, labels: np.ndarray, alpha: float, rng: np.random.Generator):
  """Yun et al. 2019: lam ~ Beta(alpha, alpha); a box of area (1 - lam) of the image,
  centred uniformly and clipped to the image, is pasted from a permutation of the batch;
  lam is then recomputed from the clipped box's real area. Returns like `mixup`."""
  batch, height, width, _ = images.shape
  lam = rng.beta(alpha, alpha)
  perm = rng.permutation(batch)
  cut = math.sqrt(1.0 - lam)
  cut_h, cut_w = int(height * cut), int(width * cut)
  cy, cx = rng.integers(0, height), rng.integers(0, width)
  y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
  x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
  mixed = images.copy()
  mixed[:, y0:y1, x0:x1] = images[perm, y0:y1, x0:x1]
  lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
  return mixed, labels[perm], np.full(batch, lam, np.float32)


def augment_batch(batch: dict, config, rng: np.random.Generator) -> dict:
  """One host batch of raw [0, 1] training images -> augmented, normalised images (and,
  with mixup/cutmix, 'mix_label' and 'mix_weight')."""
  images = batch['image']
  if config.crop == 'pad_and_crop':
    images = pad_and_crop(images, config.pad, rng)
  elif config.crop == 'random_resized_crop':
    size = config.image_size or images.shape[1]
    images = random_resized_crop(images, size, rng, config.crop_scale, config.crop_ratio)
  if config.flip:
    images = random_flip(images, rng)
  images = normalize(images, config.mean, config.std).astype(np.float32)
  out = {**batch, 'image': images}
  use_mixup, use_cutmix = config.mixup_alpha > 0, config.cutmix_alpha > 0
  if use_mixup or use_cutmix:
    # With both on, each batch uses one of them with equal odds (as timm does).
    if use_cutmix and (not use_mixup or rng.random() < 0.5):
      images, mix_label, weight = cutmix(images, batch['label'], config.cutmix_alpha, rng)
    else:
      images, mix_label, weight = mixup(images, batch['label'], config.mixup_alpha, rng)
    out.update(image=images, mix_label=mix_label, mix_weight=weight)
  return out


def is_active(config) -> bool:
  """Whether `augment_batch` changes anything."""
  return bool(config.crop != 'none' or config.flip or len(config.mean)
              or config.mixup_alpha > 0 or config.cutmix_alpha > 0)


def augment_batches(batches: Iterator[dict], config, seed: int, start_step: int
                    ) -> Iterator[dict]:
  """Applies `augment_batch` to a resumable batch stream that starts at `start_step`."""
  check_config(config)
  if not is_active(config):
    yield from batches
    return
  for step, batch in enumerate(batches, start=start_step):
    yield augment_batch(batch, config, batch_rng(seed, step))
