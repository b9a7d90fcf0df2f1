"""DP-SGD (Abadi et al. 2016) with its privacy budget from Google's dp-accounting.

Each step samples every training example independently with probability q (Poisson
sampling, so the accountant's amplification by sampling holds), pads the sample to a fixed
shape with `mask` 0, clips each example's gradient to L2 norm `clip_norm`, sums them, adds
Gaussian noise of standard deviation `noise_multiplier * clip_norm` once, and divides by the
expected batch size q N. The budget is the (epsilon, delta) of `steps` compositions of the
Poisson-subsampled Gaussian mechanism, by PLD (default, tighter) or RDP.
"""

import dataclasses
import math

import dp_accounting
import jax
import jax.numpy as jnp
from flax import nnx, struct
from scipy import stats

from core.errors import KilnError

ACCOUNTANTS = ('pld', 'rdp')
_NOISE_STREAM = 0x6E6F6973  # Folded into the step key: the noise never reuses dropout's bits.


def dp_event(sampling_rate: float, noise_multiplier: float, steps: int):
  """`steps` rounds of the Poisson-subsampled Gaussian mechanism."""
  return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)


def _accountant(name: str):
  if name == 'pld':
    return dp_accounting.pld.PLDAccountant()
  if name == 'rdp':
    return dp_accounting.rdp.RdpAccountant()
  raise KilnError(f"config.privacy.accountant={name!r}: choose one of {', '.join(ACCOUNTANTS)}")


def epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float,
            accountant: str = 'pld') -> float:
  """The epsilon spent after `steps` DP-SGD steps at `delta` (0 before the first step)."""
  if steps == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  ledger = _accountant(accountant)
  ledger.compose(dp_event(sampling_rate, noise_multiplier, steps))
  return float(ledger.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, sampling_rate: float, steps: int, delta: float,
                    accountant: str = 'pld') -> float:
  """The smallest noise multiplier whose run of `steps` spends at most `target_epsilon`."""
  def calibrate(name, bracket, tol):
    return dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(name), lambda sigma: dp_event(sampling_rate, sigma, steps),
        target_epsilon, delta, bracket, tol=tol)
  # RDP first (cheap at any sigma): it over-estimates epsilon, so its sigma bounds PLD's from
  # above; PLD's grids explode at tiny sigma, so its search starts at half that. Brent stops
  # within `tol` of the optimum on either side; epsilon falls as sigma grows, so adding `tol`
  # keeps the budget.
  multiplier = calibrate('rdp', dp_accounting.LowerEndpointAndGuess(1e-2, 1.0), 1e-3) + 1e-3
  if accountant == 'pld':
    multiplier = calibrate('pld', dp_accounting.ExplicitBracketInterval(multiplier / 2,
                                                                        multiplier), 1e-3) + 1e-3
  return float(multiplier)


def padded_batch_size(expected: float, num_examples: int, steps: int, overflow: float,
                      multiple: int) -> int:
  """The fixed batch shape Poisson samples are padded to: a multiple of `multiple` that a
  sample exceeds in any of `steps` steps with probability at most `overflow`."""
  per_step = overflow / max(steps, 1)
  size = int(stats.binom.isf(per_step, num_examples, expected / num_examples)) + 1
  return max(multiple, -(-size // multiple) * multiple)


def _rows(mask: jax.Array, x: jax.Array) -> jax.Array:
  return mask.reshape(-1, *[1] * (x.ndim - 1)).astype(x.dtype)


def masked_metrics(stacked, mask: jax.Array):
  """A task's metrics from a vmapped batch of one-example calls (leaves [B, ...]), merged
  over the rows with mask 1 (CLU's averages are sums, so zeroing a row removes it)."""
  return jax.tree.map(lambda x: x * _rows(mask, x), stacked).reduce()


def masked_mean(stacked, mask: jax.Array):
  """Per-example model-state updates (leaves [B, ...]) -> their mean over real rows; integer
  leaves (counters) take the first row's. Models that mix examples (BatchNorm) are refused
  under DP-SGD, so the state holds only per-example statistics (e.g. fake-quant ranges)."""
  def mean(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x[0]
    return jnp.sum(x * _rows(mask, x), axis=0) / jnp.maximum(jnp.sum(mask), 1.0).astype(x.dtype)
  return jax.tree.map(mean, stacked)


@struct.dataclass
class PrivateGrads:
  """What DP-SGD sums over a step's examples before the noise (a pytree: scan carries it)."""
  grad_sum: dict  # sum_i mask_i clip(g_i), like params.
  clipped: jax.Array  # Sampled examples whose gradient norm exceeded clip_norm.
  sampled: jax.Array  # Examples with mask 1.
  loss_sum: jax.Array  # Their losses, summed (the guard's and the log's mean loss).
  metrics: object = None  # The task's metrics over the sampled examples.
  model_state: dict | None = None

  @classmethod
  def zeros(cls, params, model_state) -> 'PrivateGrads':
    zero = jnp.zeros((), jnp.float32)
    return cls(jax.tree.map(jnp.zeros_like, params), zero, zero, zero, model_state=model_state)

  def add(self, other: 'PrivateGrads') -> 'PrivateGrads':
    """Sums plus `other` (a micro-batch's), whose model state is the newer; metrics kept."""
    return self.replace(grad_sum=jax.tree.map(jnp.add, self.grad_sum, other.grad_sum),
                        clipped=self.clipped + other.clipped, sampled=self.sampled + other.sampled,
                        loss_sum=self.loss_sum + other.loss_sum, model_state=other.model_state)

  def psum(self, axis_name: str) -> 'PrivateGrads':
    """Sums over a mapped device axis (pmap); the metrics are merged by the step itself."""
    summed = jax.lax.psum((self.grad_sum, self.clipped, self.sampled, self.loss_sum), axis_name)
    return self.replace(**dict(zip(('grad_sum', 'clipped', 'sampled', 'loss_sum'), summed)))

  def scalars(self) -> dict:
    return {'dp_clipped_fraction': self.clipped / jnp.maximum(self.sampled, 1.0),
            'dp_sample_size': self.sampled}


@dataclasses.dataclass(frozen=True)
class Privacy:
  """One run's DP-SGD: what the train step does and what the accountant is told."""
  clip_norm: float
  noise_multiplier: float
  sampling_rate: float  # q: each example's chance to be in a step's batch.
  expected_batch_size: float  # q N: the divisor of the noised sum.
  padded_batch_size: int  # Global rows of every train batch (sample + mask-0 padding).
  num_examples: int
  delta: float
  accountant: str

  # --- in the train step ---
  def clipped_sum(self, grads, mask: jax.Array):
    """sum_i mask_i * g_i * min(1, C / ||g_i||) over per-example gradients `grads` (leaves
    [B, ...]), with how many sampled examples were clipped and how many were sampled."""
    squares = sum(jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
                  for g in jax.tree.leaves(grads))
    norms = jnp.sqrt(squares)
    scale = mask * jnp.minimum(1.0, self.clip_norm / jnp.maximum(norms, 1e-12))
    clipped = jax.tree.map(lambda g: jnp.tensordot(scale.astype(g.dtype), g, axes=1), grads)
    return (clipped, jnp.sum(mask * (norms > self.clip_norm)).astype(jnp.float32),
            jnp.sum(mask).astype(jnp.float32))

  def noised_mean(self, grad_sum, key: jax.Array):
    """(sum + N(0, (sigma C)^2 I)) / (q N): the noise is drawn once, from a key every device
    shares, in each leaf's own (sharded) layout."""
    leaves, treedef = jax.tree.flatten(grad_sum)
    keys = jax.random.split(jax.random.fold_in(key, _NOISE_STREAM), len(leaves))
    std = self.noise_multiplier * self.clip_norm
    noised = [g + std * jax.random.normal(k, g.shape, g.dtype) for g, k in zip(leaves, keys)]
    return jax.tree.map(lambda g: g / self.expected_batch_size,
                        jax.tree.unflatten(treedef, noised))

  # --- the budget ---
  def epsilon(self, steps: int) -> float:
    return epsilon(self.sampling_rate, self.noise_multiplier, steps, self.delta, self.accountant)

  def report(self, steps: int) -> dict:
    """summary.json['privacy']."""
    return {'epsilon': self.epsilon(steps), 'delta': self.delta,
            'noise_multiplier': self.noise_multiplier, 'sampling_rate': self.sampling_rate,
            'steps': int(steps), 'accountant': self.accountant, 'clip_norm': self.clip_norm,
            'expected_batch_size': self.expected_batch_size,
            'padded_batch_size': self.padded_batch_size}


def check_compatible(config, model: nnx.Module) -> None:
  """Refuses, in one line, what would let one example's gradient depend on another's."""
  for path, module in nnx.iter_graph(model):
    if isinstance(module, nnx.BatchNorm):
      where = '/'.join(str(p) for p in path)
      raise KilnError(f'config.privacy.enabled: {where} is a BatchNorm, whose batch statistics mix '
                      "examples: use GroupNorm (config.model.norm='group') or a LayerNorm model")
  augment = config.get('augment')
  if augment is not None and (augment.mixup_alpha > 0 or augment.cutmix_alpha > 0):
    raise KilnError('config.privacy.enabled: mixup/CutMix blend examples, so no gradient is one '
                    "example's: set config.augment.mixup_alpha=0 and cutmix_alpha=0")


def from_config(privacy_config, batch_size: int, num_examples: int, num_steps: int,
                multiple: int) -> Privacy | None:
  """None when config.privacy.enabled is False. `batch_size` (config.batch_size) is the
  expected sample size; `multiple`: what a global batch must divide into (mesh shards x
  processes x accumulation steps)."""
  if not privacy_config.enabled:
    return None
  if batch_size >= num_examples:
    raise KilnError(f'config.batch_size={batch_size} is the expected Poisson sample and must be '
                    f'below the {num_examples} training examples under config.privacy')
  if privacy_config.delta >= 1.0 / num_examples:
    raise KilnError(f'config.privacy.delta={privacy_config.delta} allows leaking a whole example '
                    f'of {num_examples}: set it below 1/{num_examples} (e.g. 1e-5)')
  q = batch_size / num_examples
  sigma = privacy_config.noise_multiplier
  if privacy_config.target_epsilon > 0:
    sigma = calibrate_noise(privacy_config.target_epsilon, q, num_steps, privacy_config.delta,
                            privacy_config.accountant)
  padded = privacy_config.max_batch_size
  if padded < 0:  # A sample is cut to the padded shape with probability <= delta over the run.
    padded = padded_batch_size(batch_size, num_examples, num_steps, privacy_config.delta,
                               multiple)
  elif padded < batch_size or padded % multiple:
    raise KilnError(f'config.privacy.max_batch_size={padded} must be a multiple of {multiple} '
                    f'of at least config.batch_size={batch_size} (-1 chooses it)')
  return Privacy(clip_norm=privacy_config.clip_norm, noise_multiplier=float(sigma),
                 sampling_rate=q, expected_batch_size=float(batch_size),
                 padded_batch_size=int(padded), num_examples=num_examples,
                 delta=privacy_config.delta, accountant=privacy_config.accountant)
