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


def get_search_space():
  """What tune.py searches (tune/space.py has the form): the four knobs that move this CNN most."""
  return {
      'params': {
          # Adam's peak rate: good values span decades, so sampled on a log scale.
          'optimizer.learning_rate': {'type': 'float', 'low': 1e-4, 'high': 3e-2, 'log': True,
                                      'grid': (3e-4, 3e-3, 3e-2)},
          # Decoupled decay, also log-spread; tiny values mean "off" in effect.
          'regularization.weight_decay': {'type': 'float', 'low': 1e-6, 'high': 1e-1,
                                          'log': True, 'grid': (1e-5, 1e-2)},
          'model.dropout_rate': {'type': 'float', 'low': 0.0, 'high': 0.5,  # Before the classifier.
                                 'grid': (0.0, 0.3)},
          'model.dense_features': {'type': 'int', 'low': 16, 'high': 256, 'log': True,  # Width.
                                   'grid': (32, 128)},
      },
      'objectives': (('accuracy', 'max'),),  # Held-out accuracy at the end of the run.
  }
