"""A small VGG-style CNN: stages of (conv-BN-ReLU) x2 and max-pooling, then an MLP head."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers
from models.conv import Conv
from core.logical_axes import constrain


class ConvBlock(nnx.Module):
  """3x3 conv, BatchNorm, ReLU."""

  def __init__(self, in_features: int, out_features: int, *, norm_axis_name: str | None,
               rngs: nnx.Rngs):
    # No conv bias: the BatchNorm shift that follows makes it redundant.
    self.conv = Conv(in_features, out_features, (3, 3), use_bias=False, rngs=rngs,
                         kernel_metadata={'logical_axes': (None, None, 'conv_in', 'conv_out')})
    channels = {'logical_axes': ('conv_out',)}
    self.norm = nnx.BatchNorm(out_features, momentum=0.9, axis_name=norm_axis_name,
                              scale_metadata=channels, bias_metadata=channels, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = self.norm(self.conv(x), use_running_average=not train)
    return constrain(jax.nn.relu(x), ('batch', None, None, 'conv_out'))


class CNN(nnx.Module):
  """Image classifier for small inputs (8x8 digits, 28x28 MNIST, 32x32 CIFAR)."""

  def __init__(self, *, num_classes: int, input_shape: Sequence[int],
               features: Sequence[int] = (32, 64), dense_features: int = 128,
               dropout_rate: float = 0.2, norm_axis_name: str | None = None, rngs: nnx.Rngs):
    """`norm_axis_name`: mapped axis over which BatchNorm averages statistics (pmap)."""
    height, width, channels = input_shape
    stages = []
    for out in features:
      stages.append(nnx.List([ConvBlock(channels, out, norm_axis_name=norm_axis_name, rngs=rngs),
                              ConvBlock(out, out, norm_axis_name=norm_axis_name, rngs=rngs)]))
      channels = out
      height, width = height // 2, width // 2
    if height < 1 or width < 1:
      raise ValueError(f'input {tuple(input_shape)} is too small for {len(features)} '
                       'pooling stages: use fewer model.features')
    self.stages = nnx.List(stages)
    self.hidden = nnx.Linear(height * width * channels, dense_features, rngs=rngs,
                             kernel_metadata={'logical_axes': ('embed', 'mlp')},
                             bias_metadata={'logical_axes': ('mlp',)})
    self.dropout = nnx.Dropout(dropout_rate)
    self.classifier = nnx.Linear(dense_features, num_classes, rngs=rngs,
                                 kernel_metadata={'logical_axes': ('mlp', 'classes')})

  def __call__(self, images: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    x = images
    for stage in self.stages:
      for block in stage:
        x = block(x, train=train)
      x = layers.max_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = constrain(jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1))), ('batch', 'mlp'))
    x = self.dropout(x, deterministic=not train, rngs=rngs)
    return self.classifier(x).astype(jnp.float32)
