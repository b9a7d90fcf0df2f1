"""A small VGG-style CNN: stages of (conv-norm-ReLU) x2 and max-pooling, then an MLP head.

The norm is BatchNorm, or GroupNorm (`norm='group'`), whose statistics are per example:
DP-SGD's per-example gradients need a model in which no example sees another; or none
(`norm='none'`, biased convs). `downsample='stride'` halves each stage with its first conv's
stride 2 instead of pooling: with `norm='none'` and `kernel_size=4` that is Wong et al.'s
(2020) tiny MNIST model, ~20x cheaper than the default."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from backends import ops
from core.errors import KilnError
from core import fields as F
from models import layers
from models.cost import conv_flops, linear_flops
from models.conv import Conv
from core.logical_axes import constrain


NORMS = ('batch', 'group', 'none')
DOWNSAMPLES = ('max_pool', 'stride')


class ConvBlock(nnx.Module):
  """kxk conv (stride 1 or 2), then BatchNorm, GroupNorm or no norm, ReLU."""

  def __init__(self, in_features: int, out_features: int, *, norm_axis_name: str | None,
               rngs: nnx.Rngs, norm: str = 'batch', norm_groups: int = 8,
               kernel_size: int = 3, stride: int = 1):
    # No conv bias under a norm: the norm's shift that follows makes it redundant.
    self.conv = Conv(in_features, out_features, (kernel_size, kernel_size),
                     strides=(stride, stride), use_bias=norm == 'none', rngs=rngs,
                     kernel_metadata={'logical_axes': (None, None, 'conv_in', 'conv_out')},
                     bias_metadata={'logical_axes': ('conv_out',)})
    channels = {'logical_axes': ('conv_out',)}
    if norm == 'none':
      self.norm = None
    elif norm == 'group':
      if out_features % norm_groups:
        raise KilnError(f'config.model.norm_groups={norm_groups} must divide every stage\'s '
                        f'channels (config.model.features has {out_features})')
      self.norm = nnx.GroupNorm(out_features, num_groups=norm_groups, scale_metadata=channels,
                                bias_metadata=channels, rngs=rngs)
    else:
      self.norm = nnx.BatchNorm(out_features, momentum=0.9, axis_name=norm_axis_name,
                                scale_metadata=channels, bias_metadata=channels, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = self.conv(x)
    if isinstance(self.norm, nnx.BatchNorm):
      x = self.norm(x, use_running_average=not train)
    elif self.norm is not None:
      x = self.norm(x)
    return constrain(jax.nn.relu(x), ('batch', None, None, 'conv_out'))


class CNN(nnx.Module):
  """Image classifier for small inputs (8x8 digits, 28x28 MNIST, 32x32 CIFAR)."""
  # What each key under config.model may hold; checked before the model is built.
  CONFIG_FIELDS = {
      'features': F.Range(1, integer=True, each=True),
      'dense_features': F.POSITIVE_INT,
      'dropout_rate': F.RATE,
      'norm': F.Choices(NORMS),
      'norm_groups': F.POSITIVE_INT,
      'convs_per_stage': F.POSITIVE_INT,
      'kernel_size': F.POSITIVE_INT,
      'downsample': F.Choices(DOWNSAMPLES),
  }


  def __init__(self, *, num_classes: int, input_shape: Sequence[int],
               features: Sequence[int] = (32, 64), dense_features: int = 128,
               dropout_rate: float = 0.2, norm: str = 'batch', norm_groups: int = 8,
               convs_per_stage: int = 2, kernel_size: int = 3, downsample: str = 'max_pool',
               norm_axis_name: str | None = None, rngs: nnx.Rngs):
    """`norm`: 'batch', 'group' (GroupNorm over `norm_groups` channel groups, per example) or
    'none'. `convs_per_stage`: conv blocks per stage (1 makes DP-SGD's per-example gradients
    several times cheaper). `downsample`: 'max_pool' (2x2 after each stage) or 'stride' (each
    stage's first conv has stride 2, 'SAME' padding). `norm_axis_name`: mapped axis BatchNorm
    averages over (pmap)."""
    if downsample not in DOWNSAMPLES:
      raise KilnError(f"config.model.downsample='{downsample}' is unknown: use one of "
                      f"{', '.join(DOWNSAMPLES)}")
    if norm not in NORMS:
      raise KilnError(f"config.model.norm='{norm}' is unknown: use one of {', '.join(NORMS)}")
    self.downsample = downsample
    height, width, channels = input_shape
    stages = []
    for out in features:
      block = dict(norm_axis_name=norm_axis_name, norm=norm, norm_groups=norm_groups,
                   kernel_size=kernel_size, rngs=rngs)
      first_stride = 2 if downsample == 'stride' else 1
      stages.append(nnx.List([ConvBlock(channels, out, stride=first_stride, **block)] + [
          ConvBlock(out, out, **block) for _ in range(convs_per_stage - 1)]))
      channels = out
      # VALID 2x2 pooling floors; a 'SAME' stride-2 conv rounds up.
      height, width = ((height // 2, width // 2) if downsample == 'max_pool'
                       else (-(-height // 2), -(-width // 2)))
    if height < 1 or width < 1:
      raise KilnError(f'input {tuple(input_shape)} is too small for {len(features)} '
                      'pooling stages: use fewer config.model.features')
    self.stages = nnx.List(stages)
    self.hidden = nnx.Linear(height * width * channels, dense_features, rngs=rngs,
                             dot_general=ops.dot_general,
                             kernel_metadata={'logical_axes': ('embed', 'mlp')},
                             bias_metadata={'logical_axes': ('mlp',)})
    self.dropout = nnx.Dropout(dropout_rate)
    self.classifier = nnx.Linear(dense_features, num_classes, rngs=rngs,
                                 dot_general=ops.dot_general,
                                 kernel_metadata={'logical_axes': ('mlp', 'classes')})

  def __call__(self, images: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    x = images
    for stage in self.stages:
      for block in stage:
        x = block(x, train=train)
      if self.downsample == 'max_pool':
        x = layers.max_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = constrain(jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1))), ('batch', 'mlp'))
    x = self.dropout(x, deterministic=not train, rngs=rngs)
    return self.classifier(x).astype(jnp.float32)

  def forward_flops(self, input_shape: Sequence[int]) -> float:
    """One example's forward FLOPs (models.cost conventions), mirroring __call__: conv
    blocks per stage, a 2x2/2 max-pool after each (unless the convs stride), the dense head."""
    if len(input_shape) != 3:
      raise KilnError(f'CNN input_shape {tuple(input_shape)} must be one example\'s (H, W, C)')
    *spatial, channels = input_shape
    total = 0.0
    for stage in self.stages:
      for block in stage:
        if block.conv.in_features != channels:
          raise KilnError(f'input_shape {tuple(input_shape)} has {channels} channels where the '
                          f'CNN expects {block.conv.in_features}: pass the shape it was built for')
        flops, spatial = conv_flops(block.conv, spatial)
        total += flops
        channels = block.conv.out_features
      if self.downsample == 'max_pool':
        spatial = [size // 2 for size in spatial]  # VALID 2x2 windows, stride 2.
    flattened = channels
    for size in spatial:
      flattened *= size
    if flattened != self.hidden.in_features:
      raise KilnError(f'input_shape {tuple(input_shape)} flattens to {flattened} features where '
                      f'the CNN expects {self.hidden.in_features}: pass the shape it was built for')
    return total + linear_flops(self.hidden) + linear_flops(self.classifier)
