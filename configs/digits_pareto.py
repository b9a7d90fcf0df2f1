"""The default digits CNN with a search space that trades accuracy against size: conv and
dense widths over two orders of magnitude of parameters, for a multi-objective search
(tune.py --sampler=nsga2); the learning rate is searched too, since small nets want larger."""

from configs import default


def get_config():
  c = default.get_config()
  c.num_epochs = 5.0  # A sixth of the default run: enough to rank sizes, short enough for a front.
  return c


def get_search_space():
  """What tune.py searches (tune/space.py has the form)."""
  return {
      'params': {
          # Channels of the two conv stages: the bulk of the parameters.
          'model.features': {'type': 'categorical', 'choices': ((4, 8), (8, 16), (16, 32),
                                                                (32, 64))},
          'model.dense_features': {'type': 'int', 'low': 8, 'high': 256, 'log': True},  # Width.
          # Adam's peak rate, log-spread.
          'optimizer.learning_rate': {'type': 'float', 'low': 1e-3, 'high': 3e-2, 'log': True},
      },
      # Held-out accuracy against the parameter count (summary.json's model_stats).
      'objectives': (('accuracy', 'max'), ('model_stats.params', 'min')),
  }
