"""Turns config.optimizer / config.schedule into an Optax schedule and transformation.

This file owns those two sections of the config: the tables below map each optimizer and
schedule name to its builder (optim/optimizers.py, optim/schedules.py) and each of its
fields to a range; bad values become a KilnError that names the field and the fix. The
loop's config check (loop/fields.py) reads the same tables, so a range lives in one place.
"""

import dataclasses
import itertools
import numbers
from collections.abc import Callable, Mapping

import optax

from core import fields as F
from core.errors import KilnError
from optim import optimizers, schedules

_BETA = F.RATE  # Moment decays must forget: [0, 1).


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """How one name becomes an Optax transformation."""
  build: Callable[..., optax.GradientTransformation]  # (schedule, **fields, weight_decay, mask)
  section: str  # Sub-dict of config.optimizer holding its hyper-parameters (passed by keyword).
  fields: Mapping[str, F.Constraint]  # Field -> its range or kind.
  check: Callable[[object], None] | None = None  # Rules across fields, on the section.


def _nesterov_needs_momentum(section) -> None:
  if section.nesterov and not section.momentum:
    raise KilnError('config.optimizer.sgd.nesterov=True needs momentum: set '
                    'config.optimizer.sgd.momentum > 0 or nesterov=False')


_ADAM = {'b1': _BETA, 'b2': _BETA, 'eps': F.NON_NEGATIVE}

# adamw reads config.optimizer.adam: the same moments, with its decoupled decay coming from
# config.regularization.weight_decay like every other optimizer's.
OPTIMIZERS: dict[str, Optimizer] = {
    'sgd': Optimizer(optimizers.sgd, 'sgd', {'momentum': _BETA, 'nesterov': F.FLAG},
                     _nesterov_needs_momentum),
    'adagrad': Optimizer(optimizers.adagrad, 'adagrad', {'eps': F.NON_NEGATIVE}),
    'rmsprop': Optimizer(optimizers.rmsprop, 'rmsprop', {
        'decay': _BETA, 'eps': F.NON_NEGATIVE, 'centered': F.FLAG, 'momentum': _BETA}),
    'adam': Optimizer(optimizers.adam, 'adam', _ADAM),
    'adamw': Optimizer(optimizers.adamw, 'adam', _ADAM),
    'lion': Optimizer(optimizers.lion, 'lion', {'b1': F.FRACTION, 'b2': F.FRACTION}),
    'adafactor': Optimizer(optimizers.adafactor, 'adafactor', {
        'decay_rate': F.POSITIVE,
        'eps': F.NON_NEGATIVE,
        'factored': F.FLAG,
        'min_dim_size_to_factor': F.NON_NEGATIVE_INT,
        'clipping_threshold': F.NON_NEGATIVE,
        'multiply_by_parameter_scale': F.FLAG,
        'min_parameter_scale': F.NON_NEGATIVE,
        'use_relative_step': F.FLAG}),
}
SECTIONS = tuple(dict.fromkeys(o.section for o in OPTIMIZERS.values()))  # adam once.
LEARNING_RATE = F.POSITIVE  # config.optimizer.learning_rate.

# config.schedule's fields and their ranges; the builder of each name is in SCHEDULES.
SCHEDULE_FIELDS: dict[str, F.Constraint] = {
    'name': F.Choices(schedules.NAMES + tuple(schedules.ALIASES)),
    'warmup_steps': F.NON_NEGATIVE,
    'warmup_epochs': F.Range(-1),  # <= 0 leaves warmup_steps in charge.
    'end_learning_rate_fraction': F.FRACTION,
    'boundary_steps': F.Range(0, low_open=True, each=True),
    'boundary_epochs': F.Range(0, low_open=True, each=True),
    'decay_factor': F.Range(0, 1, low_open=True),
    'rsqrt_timescale_steps': F.NON_NEGATIVE,
    'wsd_decay_fraction': F.Range(0, 1, low_open=True),
    'wsd_decay_shape': F.Choices(schedules.WSD_SHAPES),
}


def _field(section, prefix: str, key: str, constraint: F.Constraint):
  return constraint.check(f'{prefix}.{key}', section[key])


def _number(field: str, value, low=None, high=None, low_open=False,
            high_open=False) -> float:
  """`value` if it is a finite number in the range, else a KilnError naming `field`."""
  return F.Range(low, high, low_open, high_open).check(field.removeprefix('config.'), value)


def _steps_from(field_steps: str, steps, field_epochs: str, epochs, steps_per_epoch: int) -> int:
  """A length given in epochs (when > 0) or else in steps, as a whole number of steps."""
  if _number(field_epochs, epochs) > 0:
    return round(epochs * steps_per_epoch)
  return round(_number(field_steps, steps, low=0))


@dataclasses.dataclass(frozen=True)
class _Lengths:
  """What every schedule builder is handed: rates and lengths already in steps."""
  peak: float
  warmup: int
  total: int
  end: float
  steps_per_epoch: int


def _exponential(c, n: _Lengths) -> optax.Schedule:
  if n.end <= 0:
    raise KilnError('the exponential schedule decays geometrically to end_learning_rate_fraction '
                    '* peak, which cannot be 0: set config.schedule.end_learning_rate_fraction '
                    '> 0 (e.g. 0.01)')
  return schedules.exponential(n.peak, n.warmup, n.total, n.end)


def _step(c, n: _Lengths) -> optax.Schedule:
  factor = _field(c, 'schedule', 'decay_factor', SCHEDULE_FIELDS['decay_factor'])
  return schedules.step(n.peak, n.warmup, _boundaries(c, n.steps_per_epoch, n.warmup), factor)


def _rsqrt(c, n: _Lengths) -> optax.Schedule:
  timescale = round(_field(c, 'schedule', 'rsqrt_timescale_steps',
                           SCHEDULE_FIELDS['rsqrt_timescale_steps'])) or n.warmup
  if timescale <= 0:
    raise KilnError('the rsqrt schedule needs a timescale: set '
                    'config.schedule.rsqrt_timescale_steps > 0 or a warmup')
  return schedules.rsqrt(n.peak, n.warmup, timescale)


def _wsd(c, n: _Lengths) -> optax.Schedule:
  fraction = _field(c, 'schedule', 'wsd_decay_fraction', SCHEDULE_FIELDS['wsd_decay_fraction'])
  shape = c.wsd_decay_shape
  if shape not in schedules.WSD_SHAPES:
    raise KilnError(f"unknown wsd decay shape '{shape}': set config.schedule.wsd_decay_shape to "
                    f"one of {', '.join(schedules.WSD_SHAPES)}")
  decay_steps = max(round(fraction * n.total), 1)
  if n.total - decay_steps < n.warmup:
    raise KilnError(f'the wsd decay (last {decay_steps} of {n.total} steps) overlaps the '
                    f'{n.warmup}-step warmup: lower config.schedule.wsd_decay_fraction or the '
                    'warmup')
  return schedules.wsd(n.peak, n.warmup, n.total, decay_steps, n.end, shape)


# Schedule name -> builder of (config.schedule, lengths).
SCHEDULE_BUILDERS: dict[str, Callable[..., optax.Schedule]] = {
    'constant': lambda c, n: schedules.constant(n.peak, n.warmup),
    'cosine': lambda c, n: schedules.cosine(n.peak, n.warmup, n.total, n.end),
    'linear': lambda c, n: schedules.linear(n.peak, n.warmup, n.total, n.end),
    'exponential': _exponential,
    'step': _step,
    'rsqrt': _rsqrt,
    'wsd': _wsd,
}
assert set(SCHEDULE_BUILDERS) == set(schedules.NAMES)
SCHEDULES = schedules.NAMES + tuple(schedules.ALIASES)


def build_schedule(schedule_config, learning_rate: float, total_steps: int,
                   steps_per_epoch: int) -> optax.Schedule:
  """The learning rate at each step (from 0) of a run `total_steps` long."""
  name = schedules.ALIASES.get(schedule_config.name, schedule_config.name)
  if name not in schedules.NAMES:
    raise KilnError(f"unknown schedule '{schedule_config.name}': set config.schedule.name to one "
                    f"of {', '.join(SCHEDULES)}")
  peak = LEARNING_RATE.check('optimizer.learning_rate', learning_rate)
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
  end = peak * _field(schedule_config, 'schedule', 'end_learning_rate_fraction',
                      SCHEDULE_FIELDS['end_learning_rate_fraction'])
  return SCHEDULE_BUILDERS[name](schedule_config,
                                 _Lengths(peak, warmup, total_steps, end, steps_per_epoch))


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
  """The optimizer named by config.optimizer.name, stepping with `schedule`, its
  hyper-parameters read from config.optimizer.<its section>.

  `weight_decay` is decoupled (w -= lr_t * weight_decay * w) and applies where
  `weight_decay_mask` (a pytree of bools or a function params -> such a pytree,
  as in Optax; None means everywhere) is True.
  """
  name = optimizer_config.name
  if name not in OPTIMIZERS:
    raise KilnError(f"unknown optimizer '{name}': set config.optimizer.name to one of "
                    f"{', '.join(OPTIMIZERS)}")
  if not F.NON_NEGATIVE.contains(weight_decay):
    raise KilnError(f'weight decay {weight_decay!r} is not a number >= 0: set '
                    'config.regularization.weight_decay to 0 (off) or more')
  spec = OPTIMIZERS[name]
  section = optimizer_config[spec.section]
  prefix = f'optimizer.{spec.section}'
  kwargs = {key: _field(section, prefix, key, constraint)
            for key, constraint in spec.fields.items()}
  if spec.check is not None:
    spec.check(section)
  return spec.build(schedule, **kwargs, weight_decay=weight_decay, mask=weight_decay_mask)
