"""A multi-layer perceptron over flattened inputs: the smallest model for optimizer checks."""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from backends import ops
from core.errors import KilnError
from core import fields as F
from core.logical_axes import constrain
from models.cost import linear_flops


class MLP(nnx.Module):
  # What each key under config.model may hold; checked before the model is built.
  CONFIG_FIELDS = {
      'hidden_features': F.Range(1, integer=True, each=True),
      'dropout_rate': F.RATE,
  }

  def __init__(self, *, num_classes: int, input_shape: Sequence[int],
               hidden_features: Sequence[int] = (128,), dropout_rate: float = 0.0,
               rngs: nnx.Rngs):
    sizes = [math.prod(input_shape), *hidden_features]
    self.hidden = nnx.List([
        nnx.Linear(a, b, rngs=rngs, dot_general=ops.dot_general,
                   kernel_metadata={'logical_axes': ('embed', 'mlp')},
                   bias_metadata={'logical_axes': ('mlp',)})
        for a, b in zip(sizes[:-1], sizes[1:])])
    self.dropout = nnx.Dropout(dropout_rate)
    self.classifier = nnx.Linear(sizes[-1], num_classes, rngs=rngs,
                                 dot_general=ops.dot_general,
                                 kernel_metadata={'logical_axes': ('mlp', 'classes')})

  def __call__(self, inputs: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    x = inputs.reshape(inputs.shape[0], -1)
    for layer in self.hidden:
      x = constrain(jax.nn.relu(layer(x)), ('batch', 'mlp'))
      x = self.dropout(x, deterministic=not train, rngs=rngs)
    return self.classifier(x).astype(jnp.float32)

  def forward_flops(self, input_shape: Sequence[int]) -> float:
    """One example's forward FLOPs: its dense layers (models.cost conventions)."""
    layers = [*self.hidden, self.classifier]
    flattened = math.prod(input_shape)
    if flattened != layers[0].in_features:
      raise KilnError(f'input_shape {tuple(input_shape)} flattens to {flattened} features where '
                      f'the MLP expects {layers[0].in_features}: pass the shape it was built for')
    return sum(linear_flops(layer) for layer in layers)
