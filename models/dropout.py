"""Dropout whose random bits cost half of `nnx.Dropout`'s.

`nnx.Dropout` draws one 32-bit threefry word per element; here each word decides two
elements through its two 16-bit halves, so the masks cost about half the random bits
(benchmarks/README.md, "dropout"). The keep probability is quantised to a multiple of 2^-16
(0.8 -> 0.799997) and the kept values are scaled by the inverse of that quantised
probability, so the layer stays exactly unbiased. The bits are threefry's, so masks do
not depend on how the array is sharded (with `jax_threefry_partitionable`).

The words come from backends.ops.random_bits: jax.random.bits, or on CPU (with
config.backend.cpu_kernels 'auto' or 'cpu') the compiled Philox kernel, AVX-512 where the
CPU has it, far cheaper than XLA:CPU's Threefry loop.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from backends import ops
from core.errors import KilnError

_LEVELS = 1 << 16


class Dropout(nnx.Module):
  """Inverted dropout: zeroes each element with probability `rate`, scales the rest."""

  def __init__(self, rate: float):
    if not 0.0 <= rate < 1.0:
      raise KilnError(f'config.model.dropout_rate={rate} is out of range: set it to a number in '
                      '[0, 1)')
    self.rate = rate

  def __call__(self, x: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if rngs is None:
      raise ValueError('training-mode dropout needs rngs with a dropout stream: pass rngs=')
    threshold = round((1.0 - self.rate) * _LEVELS)
    keep = random_halves(rngs.dropout(), x.shape, ops.random_bits) < threshold
    return jnp.where(keep, x * (_LEVELS / threshold), jnp.zeros_like(x))


def random_halves(key: jax.Array, shape: tuple[int, ...], bits=None) -> jax.Array:
  """Uniform integers in [0, 2^16) of `shape`, two per 32-bit random word; `bits(key,
  shape)` draws the words (default jax.random.bits)."""
  bits = bits or (lambda key, shape: jax.random.bits(key, shape, jnp.uint32))
  if shape and shape[-1] % 2 == 0:
    words = bits(key, (*shape[:-1], shape[-1] // 2))
    return jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)
  size = 1
  for dim in shape:
    size *= dim
  words = bits(key, ((size + 1) // 2,))
  return jnp.concatenate([words & 0xFFFF, words >> 16])[:size].reshape(shape)
