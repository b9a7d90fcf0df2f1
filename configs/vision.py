"""Image classification: the run-wide base plus host-side augmentation (input_pipeline/augment.py).

Sources: 'digits' (scikit-learn's bundled 8x8 digits), 'mnist' (local full MNIST IDX files:
train, held out, and the official test split), 'mnist_t10k' (the test split's files alone,
split into train and held out) or 'tfds:<name>'.
"""

import ml_collections

from configs import base


def get_vision_config() -> ml_collections.ConfigDict:
  c = base.get_base_config()
  c.task = 'classification'
  c.dataset.name = 'digits'
  c.augment = ml_collections.ConfigDict()
  c.augment.image_size = 0  # Resize/crop images to this square side; 0 keeps the source's size.
  c.augment.crop = 'none'  # Train crop: 'none', 'pad_and_crop' or 'random_resized_crop'.
  c.augment.pad = 4  # pad_and_crop: zero pixels added on each side before the random crop.
  c.augment.crop_scale = (0.08, 1.0)  # random_resized_crop: range of the crop's area fraction.
  c.augment.crop_ratio = (3 / 4, 4 / 3)  # random_resized_crop: range of width / height.
  c.augment.eval_crop_fraction = 0.875  # With image_size: eval resizes to size / this, centre-crops.
  c.augment.flip = False  # Mirror train images left-right with probability 1/2.
  c.augment.mean = ()  # Per-channel mean subtracted from every image (train and eval); () none.
  c.augment.std = ()  # Per-channel std every image is divided by; () none.
  c.augment.mixup_alpha = 0.0  # Mixup's Beta(alpha, alpha) mixing weight; 0 disables mixup.
  c.augment.cutmix_alpha = 0.0  # CutMix's Beta(alpha, alpha) kept area; 0 disables (both on: 50/50).
  return c
