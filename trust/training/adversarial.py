"""Adversarial examples inside the jitted steps: FGSM and PGD (Madry et al. 2018) under an
L-inf or L2 budget, with random starts and restarts, for robust-accuracy evaluation; PGD,
FGSM with a random start (Wong et al. 2020, "Fast is better than free") and N-FGSM (de Jorge
et al. 2022: a start of twice the radius and no projection) as training.

An attack sees the task only through three functions the loop hands it: the input as [0, 1]
pixels, the batch with other pixels, and per-example losses of a batch. Everything is
jax.lax control flow over fixed shapes, so attacks compile once and shard with the batch.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from clu import metrics

from core.errors import KilnError

NORMS = ('linf', 'l2')
TRAINING = ('none', 'pgd', 'fgsm_rs', 'n_fgsm')


@dataclasses.dataclass(frozen=True)
class Attack:
  norm: str  # 'linf' or 'l2'.
  epsilon: float  # Radius of the ball around each input, in pixel units.
  step_size: float  # Per step: a signed step (linf) or a normalised gradient step (l2).
  steps: int  # 1 with random_start and step_size 1.25 epsilon is Wong et al.'s FGSM-RS.
  restarts: int = 1  # Independent random starts; each example keeps its worst one.
  random_start: bool = True
  noise: float = 1.0  # Radius of the random start, in epsilons (N-FGSM: 2).
  project: bool = True  # Back into the ball after each step; N-FGSM's one step does not.
  warmup_steps: int = 0  # Training: the radius grows linearly from 0 over these first steps.

  def scale(self, step: jax.Array) -> jax.Array:
    """The fraction of the radius (and of the step and noise) in force at training `step`."""
    if self.warmup_steps <= 0:
      return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, (step.astype(jnp.float32) + 1.0) / self.warmup_steps)


def _per_example_norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1)).reshape(
      -1, *[1] * (x.ndim - 1))


def _project(delta: jax.Array, norm: str, epsilon) -> jax.Array:
  if norm == 'linf':
    return jnp.clip(delta, -epsilon, epsilon)
  return delta * jnp.minimum(1.0, epsilon / jnp.maximum(_per_example_norm(delta), 1e-12))


def _random_start(key: jax.Array, shape, norm: str, radius) -> jax.Array:
  if norm == 'linf':
    return jax.random.uniform(key, shape, minval=-radius, maxval=radius)
  # Uniform in the L2 ball: a Gaussian direction, radius eps * U^(1/d).
  direction_key, radius_key = jax.random.split(key)
  direction = jax.random.normal(direction_key, shape)
  dims = 1
  for size in shape[1:]:
    dims *= size
  radius = radius * jax.random.uniform(radius_key, (shape[0],)) ** (1.0 / dims)
  return direction / jnp.maximum(_per_example_norm(direction), 1e-12) * radius.reshape(
      -1, *[1] * (len(shape) - 1))


def perturb(losses: Callable[[jax.Array], jax.Array], pixels: jax.Array, key: jax.Array,
            attack: Attack, scale: jax.Array | float = 1.0) -> jax.Array:
  """The worst inputs found in the ball around `pixels` (kept in [0, 1]): per example, the
  restart whose final loss `losses(pixels) -> [B]` is largest. `scale` (traced: the training
  ramp) multiplies the radius, the step and the start alike."""
  pixels = jax.lax.stop_gradient(pixels)
  epsilon, step_size = attack.epsilon * scale, attack.step_size * scale
  grad = jax.grad(lambda x: jnp.sum(losses(x)))

  def step(delta, _):
    g = grad(pixels + delta)
    if attack.norm == 'linf':
      delta = delta + step_size * jnp.sign(g)
    else:
      delta = delta + step_size * g / jnp.maximum(_per_example_norm(g), 1e-12)
    if attack.project:
      delta = _project(delta, attack.norm, epsilon)
    return jnp.clip(pixels + delta, 0.0, 1.0) - pixels, None

  def restart(best, index):
    best_inputs, best_losses = best
    restart_key = jax.random.fold_in(key, index)  # Restart i is the same whatever the count.
    delta = (_random_start(restart_key, pixels.shape, attack.norm,
                           attack.noise * epsilon).astype(pixels.dtype)
             if attack.random_start else jnp.zeros_like(pixels))
    delta = jnp.clip(pixels + delta, 0.0, 1.0) - pixels
    delta, _ = jax.lax.scan(step, delta, None, length=attack.steps)
    inputs = jax.lax.stop_gradient(pixels + delta)
    found = losses(inputs)
    better = (found > best_losses).reshape(-1, *[1] * (pixels.ndim - 1))
    return (jnp.where(better, inputs, best_inputs), jnp.maximum(found, best_losses)), None

  start = (pixels, jnp.full((pixels.shape[0],), -jnp.inf, jnp.float32))
  (inputs, _), _ = jax.lax.scan(restart, start, jnp.arange(attack.restarts))
  return inputs


def eval_attack(config) -> Attack | None:
  """config.adversarial's evaluation attack; None when adversarial.eval is off."""
  a = config.adversarial
  if not a.eval:
    return None
  return Attack(norm=a.norm, epsilon=a.epsilon, step_size=a.eval_step_size, steps=a.eval_steps,
                restarts=a.restarts, random_start=a.random_start)


def train_attack(config) -> Attack | None:
  """config.adversarial's training attack (PGD; FGSM-RS: one step of 1.25 epsilon from a
  random start in the ball; N-FGSM: one step of epsilon from a random start in train_noise
  times the ball, never projected back); None when adversarial.train is 'none'."""
  a = config.adversarial
  if a.train == 'none':
    return None
  ramp = dict(warmup_steps=a.epsilon_warmup_steps)
  if a.train == 'fgsm_rs':
    step = a.train_step_size if a.train_step_size > 0 else 1.25 * a.epsilon
    return Attack(a.norm, a.epsilon, step, steps=1, restarts=1, random_start=True, **ramp)
  if a.train == 'n_fgsm':
    step = a.train_step_size if a.train_step_size > 0 else a.epsilon
    return Attack(a.norm, a.epsilon, step, steps=1, restarts=1, random_start=True,
                  noise=a.train_noise, project=False, **ramp)
  if a.train == 'pgd':
    step = a.train_step_size if a.train_step_size > 0 else 2.5 * a.epsilon / a.train_steps
    return Attack(a.norm, a.epsilon, step, steps=a.train_steps, restarts=1,
                  random_start=a.random_start, **ramp)
  raise KilnError(f"config.adversarial.train={a.train!r}: choose one of {', '.join(TRAINING)}")


@functools.cache
def _with_robust_class(clean_class):
  fields = clean_class.__annotations__
  return metrics.Collection.create(**fields, **{f'robust_{k}': v for k, v in fields.items()})


def with_robust(clean, robust):
  """One metrics collection: the clean metrics and, prefixed 'robust_', the same metrics on
  the attacked inputs (so eval, summary.json and TensorBoard carry both)."""
  names = type(clean).__annotations__
  return _with_robust_class(type(clean))(
      _reduction_counter=clean._reduction_counter,  # pylint: disable=protected-access
      **{k: getattr(clean, k) for k in names}, **{f'robust_{k}': getattr(robust, k) for k in names})
