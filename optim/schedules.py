"""Learning-rate schedules in closed form, all lengths already in steps.

Every schedule is a linear warmup from 0 to `peak` over `warmup` steps followed
by a decay rule that starts from `peak`. Steps count from 0 (Optax passes the
number of updates applied so far), so step `warmup` is the first at the peak
and the decaying schedules reach their end value at step `total`.

The config-facing checks and unit conversions live in optim/factory.py; these
functions trust their arguments.
"""

import jax.numpy as jnp
import optax

NAMES = ('constant', 'cosine', 'linear', 'exponential', 'step', 'rsqrt', 'wsd')
ALIASES = {'warmup_cosine': 'cosine'}  # Older configs name cosine-with-warmup this way.
WSD_SHAPES = ('linear', 'cosine', '1-sqrt')


def with_warmup(peak: float, warmup: int, after: optax.Schedule) -> optax.Schedule:
  """Linear 0 -> peak over `warmup` steps, then `after` (called with steps since the warmup)."""
  if warmup <= 0:
    return after
  # The same join as optax.warmup_cosine_decay_schedule, so 'warmup_cosine' keeps its values.
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def constant(peak: float, warmup: int) -> optax.Schedule:
  return with_warmup(peak, warmup, optax.constant_schedule(peak))


def cosine(peak: float, warmup: int, total: int, end: float) -> optax.Schedule:
  """Half a cosine from peak (end of warmup) to `end` (step `total`)."""
  decay_steps = max(total, warmup + 1) - warmup
  alpha = 0.0 if peak == 0.0 else end / peak
  return with_warmup(peak, warmup, optax.cosine_decay_schedule(peak, decay_steps, alpha=alpha))


def linear(peak: float, warmup: int, total: int, end: float) -> optax.Schedule:
  return with_warmup(peak, warmup, optax.linear_schedule(peak, end, max(total - warmup, 1)))


def exponential(peak: float, warmup: int, total: int, end: float) -> optax.Schedule:
  """peak * (end / peak) ** (s / decay_steps): a geometric decay that lands on `end` at `total`."""
  decay_steps = max(total - warmup, 1)
  return with_warmup(peak, warmup, optax.exponential_decay(
      peak, transition_steps=decay_steps, decay_rate=end / peak, end_value=end))


def step(peak: float, warmup: int, boundaries: tuple[int, ...], factor: float) -> optax.Schedule:
  """peak * factor ** (number of boundaries <= step); boundaries are absolute steps > warmup."""
  after = optax.piecewise_constant_schedule(
      peak, {boundary - warmup: factor for boundary in boundaries})
  return with_warmup(peak, warmup, after)


def rsqrt(peak: float, warmup: int, timescale: int) -> optax.Schedule:
  """peak * sqrt(timescale / (timescale + s)), s = steps since warmup.

  With timescale == warmup this is Vaswani et al. (2017)'s peak * sqrt(warmup / step).
  """
  # join_schedules also evaluates this branch during warmup (s < 0); clamp so it stays finite.
  return with_warmup(peak, warmup,
                     lambda s: peak * jnp.sqrt(timescale / (timescale + jnp.maximum(s, 0))))


def wsd(peak: float, warmup: int, total: int, decay_steps: int, end: float,
        shape: str) -> optax.Schedule:
  """Warmup, plateau at peak, then decay to `end` over the last `decay_steps` steps.

  Shapes over the decay phase (p from 0 to 1): 'linear' peak + (end - peak) p;
  'cosine' end + (peak - end)(1 + cos(pi p)) / 2; '1-sqrt' end + (peak - end)(1 - sqrt(p)),
  the shape Haegele et al. (2024) found best for WSD.
  """
  if shape == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif shape == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=0.0 if peak == 0 else end / peak)
  else:
    def decay(s):
      return end + (peak - end) * (1.0 - jnp.sqrt(jnp.clip(s / decay_steps, 0.0, 1.0)))
  plateau_steps = total - decay_steps - warmup
  after = optax.join_schedules([optax.constant_schedule(peak), decay], [plateau_steps])
  return with_warmup(peak, warmup, after)
