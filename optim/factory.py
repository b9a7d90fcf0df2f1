"""Turns config.optimizer / config.schedule into an Optax schedule and transformation.

This file owns the config: it converts epochs to steps, rejects bad values with
a KilnError that names the field and the fix, and maps each field to one
argument of the builders in optim/schedules.py and optim/optimizers.py.
"""

import itertools
import math
import numbers

import optax

from core.errors import KilnError
from optim import optimizers, schedules

SCHEDULES = schedules.NAMES + tuple(schedules.ALIASES)
OPTIMIZERS = optimizers.NAMES


def _number(field: str, value, low=None, high=None, low_open=False,
            high_open=False) -> float:
  """`value` if it is a finite number in the range, else a KilnError naming `field`."""
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    lo = '' if low is None else f"{'(' if low_open else '['}{low}"
    hi = '' if high is None else f"{high}{')' if high_open else ']'}"
    interval = (f'in {lo}, {hi}' if low is not None and high is not None
                else f"{'>' if low_open else '>='} {low}" if low is not None
                else f"{'<' if high_open else '<='} {high}")
    raise KilnError(f'{field}={value!r} is out of range: set it to a number {interval}')
  return value


def _steps_from(field_steps: str, steps, field_epochs: str, epochs, steps_per_epoch: int) -> int:
  """A length given in epochs (when > 0) or else in steps, as a whole number of steps."""
  if _number(field_epochs, epochs) > 0:
    return round(epochs * steps_per_epoch)
  return round(_number(field_steps, steps, low=0))


def build_schedule(schedule_config, learning_rate: float, total_steps: int,
                   steps_per_epoch: int) -> optax.Schedule:
  """The learning rate at each step (from 0) of a run `total_steps` long."""
  name = schedules.ALIASES.get(schedule_config.name, schedule_config.name)
  if name not in schedules.NAMES:
    raise KilnError(f"unknown schedule '{schedule_config.name}': set config.schedule.name to one "
                    f"of {', '.join(SCHEDULES)}")
  peak = _number('config.optimizer.learning_rate', learning_rate, low=0, low_open=True)
  if not isinstance(total_steps, numbers.Integral) or total_steps < 1:
    raise KilnError(f'the run has {total_steps} training steps: set config.num_train_steps or '
                    'config.num_epochs so that it has at least 1')
  if not isinstance(steps_per_epoch, numbers.Integral) or steps_per_epoch < 1:
    raise KilnError(f'steps_per_epoch={steps_per_epoch} must be a whole number >= 1: lower '
                    'config.batch_size below the number of training examples')
  warmup = _steps_from('config.schedule.warmup_steps', schedule_config.warmup_steps,
                       'config.schedule.warmup_epochs', schedule_config.warmup_epochs,
                       steps_per_epoch)
  # A config's warmup may outlast a shortened run (tests, smoke runs); leave it one decay step.
  warmup = min(warmup, max(total_steps - 1, 0))
  end = peak * _number('config.schedule.end_learning_rate_fraction',
                       schedule_config.end_learning_rate_fraction, low=0, high=1)

  if name == 'constant':
    return schedules.constant(peak, warmup)
  if name == 'cosine':
    return schedules.cosine(peak, warmup, total_steps, end)
  if name == 'linear':
    return schedules.linear(peak, warmup, total_steps, end)
  if name == 'exponential':
    if end <= 0:
      raise KilnError('the exponential schedule decays geometrically to end_learning_rate_fraction '
                      '* peak, which cannot be 0: set config.schedule.end_learning_rate_fraction '
                      '> 0 (e.g. 0.01)')
    return schedules.exponential(peak, warmup, total_steps, end)
  if name == 'step':
    return schedules.step(peak, warmup, _boundaries(schedule_config, steps_per_epoch, warmup),
                          _number('config.schedule.decay_factor', schedule_config.decay_factor,
                                  low=0, high=1, low_open=True))
  if name == 'rsqrt':
    timescale = round(_number('config.schedule.rsqrt_timescale_steps',
                              schedule_config.rsqrt_timescale_steps, low=0))
    timescale = timescale or warmup
    if timescale <= 0:
      raise KilnError('the rsqrt schedule needs a timescale: set '
                      'config.schedule.rsqrt_timescale_steps > 0 or a warmup')
    return schedules.rsqrt(peak, warmup, timescale)
  # wsd
  fraction = _number('config.schedule.wsd_decay_fraction', schedule_config.wsd_decay_fraction,
                     low=0, high=1, low_open=True)
  shape = schedule_config.wsd_decay_shape
  if shape not in schedules.WSD_SHAPES:
    raise KilnError(f"unknown wsd decay shape '{shape}': set config.schedule.wsd_decay_shape to "
                    f"one of {', '.join(schedules.WSD_SHAPES)}")
  decay_steps = max(round(fraction * total_steps), 1)
  if total_steps - decay_steps < warmup:
    raise KilnError(f'the wsd decay (last {decay_steps} of {total_steps} steps) overlaps the '
                    f'{warmup}-step warmup: lower config.schedule.wsd_decay_fraction or the warmup')
  return schedules.wsd(peak, warmup, total_steps, decay_steps, end, shape)


def _boundaries(schedule_config, steps_per_epoch: int, warmup: int) -> tuple[int, ...]:
  """The step schedule's boundaries in steps: from boundary_epochs if set, else boundary_steps."""
  in_epochs = bool(schedule_config.boundary_epochs)
  field = 'config.schedule.boundary_epochs' if in_epochs else 'config.schedule.boundary_steps'
  values = schedule_config.boundary_epochs if in_epochs else schedule_config.boundary_steps
  if not values:
    raise KilnError('the step schedule needs boundaries: set config.schedule.boundary_steps or '
                    'config.schedule.boundary_epochs, e.g. (30, 60)')
  scale = steps_per_epoch if in_epochs else 1
  boundaries = tuple(round(_number(field, v, low=0, low_open=True) * scale) for v in values)
  if any(b <= a for a, b in itertools.pairwise(boundaries)):
    raise KilnError(f'{field}={tuple(values)} gives boundaries {boundaries} in steps that are '
                    'not strictly increasing: list distinct boundaries in increasing order')
  if boundaries[0] <= warmup:
    raise KilnError(f'{field}={tuple(values)} puts a boundary at step {boundaries[0]}, inside the '
                    f'{warmup}-step warmup: move the boundaries after the warmup')
  return boundaries


def build_optimizer(optimizer_config, schedule: optax.Schedule, weight_decay: float = 0.0,
                    weight_decay_mask=None) -> optax.GradientTransformation:
  """The optimizer named by config.optimizer.name, stepping with `schedule`.

  `weight_decay` is decoupled (w -= lr_t * weight_decay * w) and applies where
  `weight_decay_mask` (a pytree of bools or a function params -> such a pytree,
  as in Optax; None means everywhere) is True.
  """
  name = optimizer_config.name
  if name not in optimizers.NAMES:
    raise KilnError(f"unknown optimizer '{name}': set config.optimizer.name to one of "
                    f"{', '.join(OPTIMIZERS)}")
  if (not isinstance(weight_decay, numbers.Real) or isinstance(weight_decay, bool)
      or not math.isfinite(weight_decay) or weight_decay < 0):
    raise KilnError(f'weight decay {weight_decay!r} is not a number >= 0: set '
                    'config.regularization.weight_decay to 0 (off) or more')
  decay = {'weight_decay': weight_decay, 'mask': weight_decay_mask}
  c = optimizer_config
  unit = {'low': 0, 'high': 1, 'high_open': True}

  def field(key, **limits):
    return _number(f'config.optimizer.{key}', c[key], **limits)

  if name == 'sgd':
    momentum = field('momentum', **unit)
    if c.nesterov and not momentum:
      raise KilnError('config.optimizer.nesterov=True needs momentum: set '
                      'config.optimizer.momentum > 0 or nesterov=False')
    return optimizers.sgd(schedule, momentum, bool(c.nesterov), **decay)
  if name == 'adagrad':
    return optimizers.adagrad(schedule, field('eps', low=0), **decay)
  if name == 'rmsprop':
    return optimizers.rmsprop(schedule, field('rmsprop_decay', **unit), field('rmsprop_eps', low=0),
                              bool(c.rmsprop_centered), field('rmsprop_momentum', **unit), **decay)
  if name in ('adam', 'adamw'):
    build = optimizers.adam if name == 'adam' else optimizers.adamw
    return build(schedule, field('b1', **unit), field('b2', **unit), field('eps', low=0), **decay)
  if name == 'lion':
    return optimizers.lion(schedule, field('lion_b1', low=0, high=1),
                           field('lion_b2', low=0, high=1), **decay)
  # adafactor
  return optimizers.adafactor(
      schedule,
      decay_rate=field('adafactor_decay_rate', low=0, low_open=True),
      eps=field('adafactor_eps', low=0),
      factored=bool(c.adafactor_factored),
      min_dim_size_to_factor=round(field('adafactor_min_dim_size_to_factor', low=0)),
      clipping_threshold=field('adafactor_clipping_threshold', low=0),
      multiply_by_parameter_scale=bool(c.adafactor_multiply_by_parameter_scale),
      min_parameter_scale=field('adafactor_min_parameter_scale', low=0),
      use_relative_step=bool(c.adafactor_relative_step),
      **decay)
