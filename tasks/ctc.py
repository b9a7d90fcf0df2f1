"""CTC loss (Graves et al. 2006) on padded batches, through optax.ctc_loss."""

import jax
import jax.numpy as jnp
import optax


def frame_mask(frames: jax.Array, length: int) -> jax.Array:
  """[B] valid lengths -> [B, length] float32, 1 on valid positions."""
  return (jnp.arange(length)[None, :] < frames[:, None]).astype(jnp.float32)


def ctc_loss(logits: jax.Array, frames: jax.Array, labels: jax.Array, label_len: jax.Array):
  """-log p(labels | inputs) per utterance, and whether any alignment exists.

  logits [B, T, V] (blank = 0), frames [B], labels [B, L] (0-padded), label_len [B].
  A labelling needs one frame per label plus one blank between equal neighbours; pairs
  with fewer frames are impossible and get `feasible` False (optax then returns about
  -log_epsilon, which the caller must mask out, not average)."""
  per_utterance = optax.ctc_loss(logits, 1.0 - frame_mask(frames, logits.shape[1]), labels,
                                 1.0 - frame_mask(label_len, labels.shape[1]), blank_id=0)
  pairs = jnp.arange(1, labels.shape[1])[None, :] < label_len[:, None]
  repeats = jnp.sum((labels[:, 1:] == labels[:, :-1]) & pairs, -1)
  feasible = (label_len + repeats <= frames) & (frames > 0)
  return per_utterance, feasible
