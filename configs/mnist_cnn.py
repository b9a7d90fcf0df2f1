"""CNN on real MNIST digits: the shared test split (10k), split into train and held-out parts.

A user with internet trains on the full dataset with --config.dataset.name=tfds:mnist.
"""

from configs import vision


def get_config():
  c = vision.get_vision_config()
  c.dataset.name = 'mnist_idx'
  c.dataset.holdout_fraction = 0.15
  c.model.features = (32, 64)  # Channels of each conv stage (conv-BN-ReLU x2, then 2x2 max-pool).
  c.model.dense_features = 256  # Width of the hidden dense layer before the classifier.
  c.model.dropout_rate = 0.3  # Dropout before the classifier during training.
  c.batch_size = 128
  c.num_epochs = 15.0
  c.optimizer.learning_rate = 2e-3
  c.schedule.warmup_steps = 100
  c.log_every_steps = 50
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 500
  return c
