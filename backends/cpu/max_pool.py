"""Max-pool rewritten as the same function, for CPU (backends.ops.max_pool's CPU path).

`nnx.max_pool` is a `reduce_window`, and its gradient a `select_and_scatter`
that XLA's CPU backend expands into a variadic reduce-window over four iota index
arrays of the padded input, a large share of a ResNet step (benchmarks/README.md,
"max-pool"). Here the forward is
the max of the window's strided slices and the backward routes each output's
gradient to the first input in window order that equals the max (select_and_scatter's
own tie rule), all elementwise work that XLA fuses into one loop per pass.
"""

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


def _pads(spatial, window, strides, padding) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(spatial, window, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _window_slices(xp: jax.Array, window, strides, out) -> list[jax.Array]:
  slices = []
  for offset in itertools.product(*(range(w) for w in window)):
    start = (0,) + offset + (0,)
    limit = ((xp.shape[0],) + tuple(o + (n - 1) * s + 1 for o, n, s in zip(offset, out, strides))
             + (xp.shape[-1],))
    slices.append(lax.slice(xp, start, limit, (1,) + tuple(strides) + (1,)))
  return slices


def _padded(x: jax.Array, pads) -> jax.Array:
  return lax.pad(x, jnp.array(-jnp.inf, x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads]
                 + [(0, 0, 0)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
  xp = _padded(x, pads)
  out = tuple((n + lo + hi - w) // s + 1
              for n, w, s, (lo, hi) in zip(x.shape[1:-1], window, strides, pads))
  return functools.reduce(jnp.maximum, _window_slices(xp, window, strides, out))


def _max_pool_fwd(x, window, strides, pads):
  y = _max_pool(x, window, strides, pads)
  return y, (x, y)


def _max_pool_bwd(window, strides, pads, residuals, g):
  x, y = residuals
  xp = _padded(x, pads)
  out = y.shape[1:-1]
  free = jnp.ones(y.shape, bool)  # Outputs whose gradient is not yet routed.
  grad = jnp.zeros(xp.shape, g.dtype)
  zero = jnp.zeros((), g.dtype)
  for offset, window_slice in zip(itertools.product(*(range(w) for w in window)),
                                  _window_slices(xp, window, strides, out)):
    hit = free & (window_slice == y)
    free = free & ~hit
    # The slice's transpose: each output's share back at the input position it read.
    placed = [(0, 0, 0)] + [(o, size - o - (n - 1) * s - 1, s - 1) for o, size, n, s in zip(
        offset, xp.shape[1:-1], out, strides)] + [(0, 0, 0)]
    grad = grad + lax.pad(jnp.where(hit, g, zero), zero, placed)
  crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, x.shape[1:-1]))
  return (grad[(slice(None),) + crop + (slice(None),)],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding='VALID') -> jax.Array:
  """`nnx.max_pool` (same arguments, outputs and gradients): the rewrite for floating
  (N, *spatial, C) inputs, nnx.max_pool itself for others. backends.ops calls it on CPU
  only: accelerators run reduce_window and select_and_scatter natively and fast."""
  window = tuple(window_shape)
  strides = tuple(strides) if strides is not None else (1,) * len(window)
  if x.ndim != len(window) + 2 or not jnp.issubdtype(x.dtype, jnp.floating):
    return nnx.max_pool(x, window_shape=window, strides=strides, padding=padding)
  return _max_pool(x, window, strides, _pads(x.shape[1:-1], window, strides, padding))
