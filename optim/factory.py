"""Turns config.optimizer / config.schedule into an Optax transformation."""

import optax

from core.errors import KilnError

SCHEDULES = ('constant', 'warmup_cosine')
OPTIMIZERS = ('sgd', 'adam')


def build_schedule(schedule_config, learning_rate: float, total_steps: int,
                   steps_per_epoch: int) -> optax.Schedule:
  name = schedule_config.name
  if name == 'constant':
    return optax.constant_schedule(learning_rate)
  if name == 'warmup_cosine':
    warmup = min(schedule_config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=learning_rate * schedule_config.end_learning_rate_fraction)
  raise KilnError(f"unknown schedule '{name}': set config.schedule.name to one of "
                  f"{', '.join(SCHEDULES)}")


def build_optimizer(optimizer_config, schedule: optax.Schedule, weight_decay: float = 0.0,
                    weight_decay_mask=None) -> optax.GradientTransformation:
  name = optimizer_config.name
  if name == 'sgd':
    return optax.sgd(schedule, momentum=optimizer_config.momentum or None,
                     nesterov=optimizer_config.nesterov)
  if name == 'adam':
    return optax.adam(schedule, b1=optimizer_config.b1, b2=optimizer_config.b2,
                      eps=optimizer_config.eps)
  raise KilnError(f"unknown optimizer '{name}': set config.optimizer.name to one of "
                  f"{', '.join(OPTIMIZERS)}")
