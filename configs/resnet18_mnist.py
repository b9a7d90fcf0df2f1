"""ResNet-18 on the full MNIST: 55,000 training digits, 5,000 held out for validation, and
the official 10,000 test digits reported once at the end (summary.json['test']).

The 'cifar' stem (3x3/1 conv, no max-pool) keeps 28x28 digits at full resolution into
stage 1; width 16 (a quarter of the published 64) keeps a step cheap enough for 2 CPU
cores. Random 2-pixel shifts (pad and crop, no flips) and a cosine decay over a few
epochs. With internet, --config.dataset.name=tfds:mnist trains on TFDS's copy instead
(its eval split is then the test split itself).
"""

from configs import vision


def get_config():
  c = vision.get_vision_config()
  c.dataset.name = 'mnist'
  c.dataset.holdout_fraction = 1 / 12  # configs/mnist_cnn.py's split (5,000 of 60,000).
  c.augment.crop = 'pad_and_crop'
  c.augment.pad = 2  # Shifts of up to 2 pixels; MNIST digits are centred in their 28x28 frame.
  c.model.name = 'resnet18'
  c.model.stem = 'cifar'  # 3x3/1 stem conv, no max-pool: 28x28 inputs stay 28x28.
  c.model.width = 16  # Stage widths 16-128 instead of 64-512, for CPU speed.
  c.model.zero_init_last_bn = True  # Each block starts as the identity.
  c.batch_size = 128
  c.num_epochs = 8.0
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 0.1
  c.optimizer.sgd.nesterov = True
  c.regularization.weight_decay = 5e-4
  c.schedule.warmup_steps = 50
  c.log_every_steps = 50
  c.eval_every_steps = 430  # About once an epoch (5,000 held-out digits).
  c.checkpoint_every_steps = 500
  return c
