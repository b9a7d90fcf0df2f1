"""SpecAugment on the device, inside the jitted train step of the speech tasks."""

import jax
import jax.numpy as jnp


def spec_augment(key: jax.Array, features: jax.Array, frames: jax.Array, *,
                 freq_masks: int, freq_width: int, time_masks: int, time_width: int,
                 time_width_fraction: float = 1.0) -> jax.Array:
  """SpecAugment's masks (Park et al. 2019, without time warping) on a batch
  [B, T, F] of normalized features, whose mean is 0, so masked values are set to 0.

  Each of `freq_masks` masks zeroes f ~ U[0, freq_width] consecutive mel bins; each of
  `time_masks` zeroes t ~ U[0, min(time_width, time_width_fraction * frames)] consecutive
  frames inside the utterance, so short utterances are never blanked out (the 'p' bound).
  """
  batch, length, bins = features.shape
  keys = jax.random.split(key, 4)

  def masks(key_width, key_start, count, max_width, size, limit):
    width = jax.random.uniform(key_width, (batch, count)) * (max_width + 1)
    width = jnp.minimum(jnp.floor(width), limit[:, None])
    start = jnp.floor(jax.random.uniform(key_start, (batch, count)) *
                      jnp.maximum(limit[:, None] - width + 1, 1.0))
    pos = jnp.arange(size)[None, None, :]
    hit = (pos >= start[..., None]) & (pos < (start + width)[..., None])
    return hit.any(1)  # [B, size]

  keep = jnp.ones_like(features, dtype=bool)
  if freq_masks:
    f_hit = masks(keys[0], keys[1], freq_masks, freq_width, bins, jnp.full((batch,), bins, float))
    keep &= ~f_hit[:, None, :]
  if time_masks:
    limit = jnp.minimum(jnp.floor(time_width_fraction * frames.astype(jnp.float32)), time_width)
    t_hit = masks(keys[2], keys[3], time_masks, time_width, length, limit)
    keep &= ~t_hit[:, :, None]
  return jnp.where(keep, features, 0.0)
