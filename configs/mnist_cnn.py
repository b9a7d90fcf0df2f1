"""CNN on the full MNIST: 55,000 training digits, 5,000 held out for validation, and the
official 10,000 test digits reported once at the end (summary.json['test']).

Random 2-pixel shifts (pad and crop, no flips: digits are not mirror-symmetric) and a
cosine decay to zero over a few epochs. With internet, --config.dataset.name=tfds:mnist
trains on TFDS's copy instead (its eval split is then the test split itself).
"""

from configs import vision


def get_config():
  c = vision.get_vision_config()
  c.dataset.name = 'mnist'
  c.dataset.holdout_fraction = 1 / 12  # 5,000 of the 60,000 training digits, as is customary.
  c.augment.crop = 'pad_and_crop'
  c.augment.pad = 2  # Shifts of up to 2 pixels; MNIST digits are centred in their 28x28 frame.
  c.model.features = (32, 64)  # Channels of each conv stage (conv-BN-ReLU x2, then 2x2 max-pool).
  c.model.dense_features = 256  # Width of the hidden dense layer before the classifier.
  c.model.dropout_rate = 0.3  # Dropout before the classifier during training.
  c.batch_size = 128
  c.num_epochs = 6.0
  c.optimizer.learning_rate = 2e-3
  c.schedule.warmup_steps = 100
  c.log_every_steps = 50
  c.eval_every_steps = 430  # About once an epoch (5,000 held-out digits).
  c.checkpoint_every_steps = 500
  return c
