"""The whole update rule of a run: clipping, then the optimizer with decoupled decay."""

import optax

from optim.factory import build_optimizer
from optim.regularization import clipping, included_mask


def build_transform(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  exclude = config.regularization.exclude
  return optax.chain(
      clipping(config.gradient.clip_global_norm, config.gradient.clip_value),
      build_optimizer(config.optimizer, schedule, config.regularization.weight_decay,
                      lambda params: included_mask(params, exclude)))
