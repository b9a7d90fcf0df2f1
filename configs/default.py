"""The embedded default: a small CNN on scikit-learn's bundled 8x8 handwritten digits.

Runs offline in well under a minute on 2 CPU cores; `make train` uses it.
"""

from configs import vision


def get_config():
  c = vision.get_vision_config()
  c.dataset.name = 'digits'
  c.model.features = (32, 64)  # Channels of each conv stage (conv-BN-ReLU x2, then 2x2 max-pool).
  c.model.dense_features = 128  # Width of the hidden dense layer before the classifier.
  c.model.dropout_rate = 0.2  # Dropout before the classifier during training.
  c.batch_size = 64
  c.num_epochs = 30.0
  c.optimizer.learning_rate = 3e-3
  c.schedule.warmup_steps = 40
  c.log_every_steps = 25
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 200
  return c
