"""Penalties and masks over parameter paths: L1/L2 terms, decay exclusion, clipping, EMA."""

import re

import jax
import jax.numpy as jnp
import optax

from core.errors import KilnError
from core.paths import path_string


def included_mask(params, exclude_regex: str):
  """True for parameters that penalties and weight decay apply to."""
  try:
    pattern = re.compile(exclude_regex) if exclude_regex else None
  except re.error as e:
    raise KilnError(f"config.regularization.exclude='{exclude_regex}' is not a valid regex "
                    f'({e}): fix the pattern') from e
  return jax.tree_util.tree_map_with_path(
      lambda path, _: pattern is None or not pattern.search(path_string(path)), params)


def penalty(params, mask, l1: float, l2: float) -> jax.Array:
  """l1 * sum|w| + l2 * sum w^2 over included parameters (its gradient: l1*sign(w) + 2*l2*w)."""
  total = jnp.zeros((), jnp.float32)
  for w, included in zip(jax.tree.leaves(params), jax.tree.leaves(mask)):
    if included:
      if l1:
        total += l1 * jnp.abs(w).sum()
      if l2:
        total += l2 * jnp.square(w).sum()
  return total


def clipping(clip_global_norm: float, clip_value: float) -> optax.GradientTransformation:
  """Per-value clipping first, then global-norm clipping; 0 disables either."""
  if clip_global_norm < 0 or clip_value < 0:
    raise KilnError('config.gradient.clip_global_norm and clip_value must be >= 0 (0 disables)')
  parts = []
  if clip_value:
    parts.append(optax.clip(clip_value))
  if clip_global_norm:
    parts.append(optax.clip_by_global_norm(clip_global_norm))
  return optax.chain(*parts) if parts else optax.identity()


def ema_update(ema_params, params, decay: float):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
