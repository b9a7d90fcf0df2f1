"""LSTM and bidirectional LSTM speech encoders.

The LSTM is Hochreiter & Schmidhuber's cell with a forget gate (Gers et al. 2000), gates
ordered (input, forget, cell, output), the forget bias starting at 1 (Jozefowicz et al.
2015). A layer runs as backends.ops.lstm: on the portable path the input projection of
every time step is one matmul outside the recurrence and only the [B, H] x [H, 4H] hidden
matmul runs inside a `lax.scan`; on CPU a compiled kernel does both per step.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from backends import ops
from core.errors import KilnError
from core import fields as F

from models.cost import linear_flops


def stack_frames(features: jax.Array, frames: jax.Array, factor: int):
  """[B, T, F] -> [B, ceil(T/k), k*F]: k consecutive frames side by side (a lower frame
  rate, as in Sak et al. 2015); valid frames become ceil(frames / k)."""
  if factor == 1:
    return features, frames
  batch, length, bins = features.shape
  pad = -length % factor
  features = jnp.pad(features, ((0, 0), (0, pad), (0, 0)))
  return (features.reshape(batch, (length + pad) // factor, factor * bins),
          -(-frames // factor))


def time_mask(frames: jax.Array, length: int) -> jax.Array:
  """[B] valid lengths -> [B, length] bool."""
  return jnp.arange(length)[None, :] < frames[:, None]


class LSTMLayer(nnx.Module):
  """One direction of one layer; padded steps leave the state unchanged and output 0."""

  def __init__(self, in_features: int, hidden_dim: int, *, rngs: nnx.Rngs):
    self.hidden_dim = hidden_dim
    self.input_proj = nnx.Linear(in_features, 4 * hidden_dim, rngs=rngs,
                                 kernel_metadata={'logical_axes': ('embed', 'mlp')},
                                 bias_metadata={'logical_axes': ('mlp',)})
    self.input_proj.bias[...] = self.input_proj.bias[...].at[hidden_dim:2 * hidden_dim].set(1.0)
    self.hidden_proj = nnx.Linear(hidden_dim, 4 * hidden_dim, use_bias=False, rngs=rngs,
                                  kernel_init=nnx.initializers.orthogonal(),
                                  kernel_metadata={'logical_axes': (None, 'mlp')})

  def sequence_flops(self, steps: int) -> float:
    """FLOPs over `steps` time steps: per step the input and hidden projections into the
    4 gates (the input one is hoisted out of the recurrence, but it is the same arithmetic)."""
    return steps * (linear_flops(self.input_proj) + linear_flops(self.hidden_proj))

  def cell(self, carry, gates_x: jax.Array):
    """One step from the projected input [B, 4H]: (h, c) -> (h', c')."""
    h, c = carry
    return ops.lstm_cell(gates_x + h @ self.hidden_proj.kernel[...], c)

  def initial_state(self, batch: int, dtype=jnp.float32):
    zeros = jnp.zeros((batch, self.hidden_dim), dtype)
    return zeros, zeros

  def __call__(self, x: jax.Array, mask: jax.Array, *, reverse: bool = False) -> jax.Array:
    """x [B, T, F], mask [B, T] -> hidden states [B, T, H]. Reversed, the recurrence runs
    from the last frame, and padding at the end is skipped, so it starts at each
    utterance's end."""
    return ops.lstm(x, self.input_proj.kernel[...], mask,
                    self.hidden_proj.kernel[...][None], reverse=(reverse,),
                    bias=self.input_proj.bias[...])


def bidirectional_lstm(forward: LSTMLayer, backward: LSTMLayer, x: jax.Array, mask: jax.Array
                       ) -> jax.Array:
  """Both directions of a layer in one recurrence (backends.ops.lstm): both input
  projections in one matmul, and on the portable path one `lax.scan` whose step s
  advances the forward LSTM at frame s and the backward one at frame T-1-s with one
  batched matmul, so the recurrence has T sequential steps instead of 2T. Same result as
  `concatenate([forward(x, mask), backward(x, mask, reverse=True)], -1)`."""
  layers = (forward.input_proj, backward.input_proj)
  input_kernel = jnp.concatenate([p.kernel[...] for p in layers], -1)  # [F, 8H]
  kernels = jnp.stack([forward.hidden_proj.kernel[...], backward.hidden_proj.kernel[...]])
  return ops.lstm(x, input_kernel, mask, kernels, reverse=(False, True),
                  bias=jnp.concatenate([p.bias[...] for p in layers], -1))


class LSTMEncoder(nnx.Module):
  """Stacked (bi)LSTM over log-mel frames, with an optional output projection.

  `__call__(features [B, T, F], frames [B]) -> (outputs [B, T', D], frames' [B])` where
  T' = ceil(T / frame_stack) and D is num_outputs (or the encoder width if 0).
  """
  # What each key under config.model may hold; checked before the model is built.
  CONFIG_FIELDS = {
      'num_outputs': F.NON_NEGATIVE_INT,  # 0 = no head, or taken from the data.
      'hidden_dim': F.POSITIVE_INT,
      'num_layers': F.POSITIVE_INT,
      'bidirectional': F.FLAG,
      'frame_stack': F.POSITIVE_INT,
      'dropout_rate': F.RATE,
  }

  def __init__(self, *, input_dim: int, num_outputs: int = 0, hidden_dim: int = 256,
               num_layers: int = 2, bidirectional: bool = True, frame_stack: int = 3,
               dropout_rate: float = 0.1, rngs: nnx.Rngs):
    if num_layers < 1 or hidden_dim < 1 or frame_stack < 1:
      raise KilnError(f'config.model: num_layers={num_layers}, hidden_dim={hidden_dim} and '
                      f'frame_stack={frame_stack} must each be >= 1: raise them')
    self.frame_stack, self.bidirectional = frame_stack, bidirectional
    directions = 2 if bidirectional else 1
    width = input_dim * frame_stack
    forward, backward = [], []
    for _ in range(num_layers):
      forward.append(LSTMLayer(width, hidden_dim, rngs=rngs))
      if bidirectional:
        backward.append(LSTMLayer(width, hidden_dim, rngs=rngs))
      width = directions * hidden_dim
    self.forward_layers, self.backward_layers = nnx.List(forward), nnx.List(backward)
    self.output_dim = width
    self.dropout = nnx.Dropout(dropout_rate)
    self.head = nnx.Linear(width, num_outputs, rngs=rngs,
                           kernel_metadata={'logical_axes': ('embed', 'vocab')}
                           ) if num_outputs else None
    if num_outputs:
      self.output_dim = num_outputs

  def output_frames(self, frames):
    return -(-frames // self.frame_stack)

  def __call__(self, features: jax.Array, frames: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None):
    x, frames = stack_frames(features, frames, self.frame_stack)
    mask = time_mask(frames, x.shape[1])
    for i, layer in enumerate(self.forward_layers):
      if i:
        x = self.dropout(x, deterministic=not train, rngs=rngs)
      if self.bidirectional:
        x = bidirectional_lstm(layer, self.backward_layers[i], x, mask)
      else:
        x = layer(x, mask)
    if self.head is not None:
      x = self.head(self.dropout(x, deterministic=not train, rngs=rngs))
    return x.astype(jnp.float32), frames

  def forward_flops(self, input_shape) -> float:
    """One utterance's forward FLOPs for `input_shape` (max_frames, num_mels); padded frames
    count, since the step computes them."""
    frames, _ = input_shape
    steps = self.output_frames(frames)
    layers = [*self.forward_layers, *self.backward_layers]
    head = steps * linear_flops(self.head) if self.head is not None else 0.0
    return sum(layer.sequence_flops(steps) for layer in layers) + head
