"""An image classifier over log-mel frames: an utterance's features [T, mels] as a one-channel
image [T, mels, 1], behind the speech encoders' interface, so that the image CNN, MLP or ResNet
classifies spoken words through the same task code as the LSTM and the Conformer."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class SpectrogramImage(nnx.Module):
  """`__call__(features [B, T, F], frames [B]) -> (logits [B, 1, C], ones [B])`: the image
  model's logits as one valid frame, which a task that averages frame logits over the valid
  frames passes on unchanged. The padding past each utterance's frames is zeros (the
  features' normalization), so the image model sees silence there."""

  def __init__(self, image_model: nnx.Module):
    self.image_model = image_model

  def __call__(self, features: jax.Array, frames: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None):
    logits = self.image_model(features[..., None], train=train, rngs=rngs)
    return logits[:, None, :], jnp.ones_like(frames)

  def forward_flops(self, input_shape: Sequence[int]) -> float:
    """One utterance's forward FLOPs for `input_shape` (max_frames, num_mels)."""
    return self.image_model.forward_flops((*input_shape, 1))
