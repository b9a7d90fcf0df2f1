"""Every schedule against its closed form, lengths given in steps and in epochs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base, default
from core.errors import KilnError
from optim import SCHEDULES, build_schedule

PEAK, TOTAL, SPE, WARMUP = 0.5, 100, 10, 10  # Peak rate, steps, steps per epoch, warmup steps.
END_FRACTION = 0.1


def _config(name, **fields):
  c = base.get_base_config().schedule
  c.name, c.warmup_steps, c.end_learning_rate_fraction = name, WARMUP, END_FRACTION
  c.update(fields)
  return c


def _in_epochs(c):
  """The same schedule with its lengths in epochs (SPE steps each)."""
  c = c.copy_and_resolve_references()
  c.warmup_epochs, c.warmup_steps = c.warmup_steps / SPE, 12345  # warmup_steps must be ignored.
  if c.boundary_steps:
    c.boundary_epochs, c.boundary_steps = tuple(b / SPE for b in c.boundary_steps), (7,)
  return c


# ---- Closed forms: s is the step (from 0), w the warmup, T the total, p the peak, e the end ----

def _warm(s, then):
  return PEAK * s / WARMUP if s < WARMUP else then(s)


END = PEAK * END_FRACTION


def _progress(s, start=WARMUP, length=TOTAL - WARMUP):
  return min(max(s - start, 0), length) / length


CLOSED_FORMS = {
    'constant': lambda s: _warm(s, lambda s: PEAK),
    'cosine': lambda s: _warm(s, lambda s: END + (PEAK - END) * 0.5 * (
        1 + math.cos(math.pi * _progress(s)))),
    'linear': lambda s: _warm(s, lambda s: PEAK + (END - PEAK) * _progress(s)),
    'exponential': lambda s: _warm(s, lambda s: PEAK * END_FRACTION ** _progress(s)),
    'step': lambda s: _warm(s, lambda s: PEAK * 0.3 ** sum(s >= b for b in (30, 55, 80))),
    'rsqrt': lambda s: _warm(s, lambda s: PEAK * math.sqrt(WARMUP / s)),  # Vaswani et al.
    'rsqrt_timescale': lambda s: _warm(s, lambda s: PEAK / math.sqrt(1 + (s - WARMUP) / 40)),
    'wsd': lambda s: _warm(s, lambda s: PEAK + (END - PEAK) * _progress(s, 75, 25)),
    'wsd_cosine': lambda s: _warm(s, lambda s: END + (PEAK - END) * 0.5 * (
        1 + math.cos(math.pi * _progress(s, 75, 25)))),
    'wsd_1-sqrt': lambda s: _warm(s, lambda s: END + (PEAK - END) * (
        1 - math.sqrt(_progress(s, 75, 25)))),
}

CONFIGS = {
    'constant': _config('constant'),
    'cosine': _config('cosine'),
    'linear': _config('linear'),
    'exponential': _config('exponential'),
    'step': _config('step', boundary_steps=(30, 55, 80), decay_factor=0.3),
    'rsqrt': _config('rsqrt'),
    'rsqrt_timescale': _config('rsqrt', rsqrt_timescale_steps=40),
    'wsd': _config('wsd', wsd_decay_fraction=0.25),
    'wsd_cosine': _config('wsd', wsd_decay_fraction=0.25, wsd_decay_shape='cosine'),
    'wsd_1-sqrt': _config('wsd', wsd_decay_fraction=0.25, wsd_decay_shape='1-sqrt'),
}

# Start, warmup edges, step boundaries and the wsd decay start with their neighbours, the
# last step, the end of decay and past it, and a spread in between.
STEPS = sorted({0, 1, WARMUP - 1, WARMUP, WARMUP + 1, 29, 30, 31, 54, 55, 56, 74, 75, 76, 79, 80,
                81, TOTAL - 1, TOTAL, TOTAL + 7} | set(range(0, TOTAL + 1, 7)))


def test_every_schedule_name_is_covered():
  assert {c.name for c in CONFIGS.values()} == set(SCHEDULES) - {'warmup_cosine'}


@pytest.mark.parametrize('units', ['steps', 'epochs'])
@pytest.mark.parametrize('key', CLOSED_FORMS)
def test_matches_closed_form(key, units):
  config = CONFIGS[key] if units == 'steps' else _in_epochs(CONFIGS[key])
  schedule = build_schedule(config, PEAK, TOTAL, SPE)
  got = np.array([float(schedule(s)) for s in STEPS])
  want = np.array([CLOSED_FORMS[key](s) for s in STEPS])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # Optax calls schedules with a traced int32 step count inside jit.
  jitted = jax.jit(schedule)
  np.testing.assert_allclose([float(jitted(jnp.int32(s))) for s in STEPS], want, rtol=1e-5,
                             atol=1e-7)


def test_warmup_cosine_is_the_cosine_it_always_was():
  """The default config keeps the values of optax.warmup_cosine_decay_schedule, bit for bit."""
  for name in ('warmup_cosine', 'cosine'):
    config = default.get_config().schedule
    config.name = name
    ours = build_schedule(config, 3e-3, 900, 22)
    theirs = optax.warmup_cosine_decay_schedule(0.0, 3e-3, config.warmup_steps, 900, 0.0)
    for s in range(0, 1000, 3):
      assert float(ours(s)) == float(theirs(s)), s


def test_warmup_longer_than_the_run_is_cut_to_leave_one_decay_step():
  schedule = build_schedule(_config('cosine', end_learning_rate_fraction=0.0), PEAK, 3, 1)
  np.testing.assert_allclose([float(schedule(s)) for s in range(4)],
                             [0.0, PEAK / 2, PEAK, 0.0], atol=1e-7)


def test_fractional_epochs_round_to_steps():
  c = _config('step', boundary_epochs=(2.5, 4.0), decay_factor=0.5, warmup_epochs=0.5)
  schedule = build_schedule(c, PEAK, TOTAL, SPE)  # Warmup 5 steps, boundaries at 25 and 40.
  assert float(schedule(4)) == pytest.approx(PEAK * 4 / 5)
  assert [float(schedule(s)) for s in (5, 24, 25, 39, 40)] == pytest.approx(
      [PEAK, PEAK, PEAK / 2, PEAK / 2, PEAK / 4])


def test_warmup_epochs_zero_or_minus_one_use_warmup_steps():
  for epochs in (0.0, -1.0):
    schedule = build_schedule(_config('constant', warmup_epochs=epochs), PEAK, TOTAL, SPE)
    assert float(schedule(WARMUP // 2)) == pytest.approx(PEAK / 2)


@pytest.mark.parametrize('fields,message', [
    ({'name': 'cosinus'},
     "unknown schedule 'cosinus': set config.schedule.name to one of constant, cosine"),
    ({'warmup_steps': -5},
     'config.schedule.warmup_steps=-5 is out of range: set it to a number >= 0'),
    ({'end_learning_rate_fraction': 1.5},
     'config.schedule.end_learning_rate_fraction=1.5 is out of range: set it to a number'),
    ({'name': 'exponential', 'end_learning_rate_fraction': 0.0},
     'set config.schedule.end_learning_rate_fraction > 0'),
    ({'name': 'step'}, 'the step schedule needs boundaries: set config.schedule.boundary_steps'),
    ({'name': 'step', 'boundary_steps': (50, 40)}, 'not strictly increasing'),
    ({'name': 'step', 'boundary_epochs': (3.0, 3.02)},
     'gives boundaries (30, 30) in steps that are not strictly increasing'),
    ({'name': 'step', 'boundary_steps': (5, 40)}, 'inside the 10-step warmup: move the boundaries'),
    ({'name': 'step', 'boundary_steps': (30,), 'decay_factor': 0.0},
     'config.schedule.decay_factor=0.0 is out of range: set it to a number in (0, 1]'),
    ({'name': 'rsqrt', 'warmup_steps': 0},
     'the rsqrt schedule needs a timescale: set config.schedule.rsqrt_timescale_steps > 0'),
    ({'name': 'wsd', 'wsd_decay_fraction': 0.0},
     'config.schedule.wsd_decay_fraction=0.0 is out of range: set it to a number in (0, 1]'),
    ({'name': 'wsd', 'wsd_decay_fraction': 0.95},
     'overlaps the 10-step warmup: lower config.schedule.wsd_decay_fraction'),
    ({'name': 'wsd', 'wsd_decay_shape': 'square'},
     "unknown wsd decay shape 'square': set config.schedule.wsd_decay_shape to one of"),
])
def test_bad_values_raise_one_line_errors(fields, message):
  config = _config('constant')
  config.update(fields)
  with pytest.raises(KilnError) as error:
    build_schedule(config, PEAK, TOTAL, SPE)
  assert message in str(error.value)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('learning_rate,total,message', [
    (0.0, TOTAL, 'config.optimizer.learning_rate=0.0 is out of range: set it to a number > 0'),
    (-1.0, TOTAL, 'config.optimizer.learning_rate=-1.0 is out of range'),
    (PEAK, 0, 'the run has 0 training steps: set config.num_train_steps or config.num_epochs'),
])
def test_bad_rate_or_length_raise(learning_rate, total, message):
  with pytest.raises(KilnError, match=None) as error:
    build_schedule(_config('cosine'), learning_rate, total, SPE)
  assert message in str(error.value)
