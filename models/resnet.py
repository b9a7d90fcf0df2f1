"""ResNet v1.5 (He et al. 2016, "Deep Residual Learning"; v1.5 as in torchvision and the
MLPerf reference): basic blocks (ResNet-18/34) and bottleneck blocks (ResNet-50).

v1.5 puts a bottleneck block's stride in its 3x3 conv rather than the first 1x1 conv,
and a shortcut that changes shape is a 1x1 projection conv + BatchNorm. Convs pad
symmetrically by kernel // 2 (as torchvision does), so a stride-2 conv on an even map
sees the same pixels as the published models. Every conv is `models.conv.Conv`.

BatchNorm statistics are global-batch statistics under `jax.jit` (the batch is one
sharded array, XLA inserts the reductions); under `pmap` `norm_axis_name` names the
mapped axis they are averaged over, so either way BatchNorm is synchronised across
data-parallel devices.
"""

import inspect
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from core.errors import KilnError
from core import fields as F
from models import layers
from models.conv import Conv
from models.cost import conv_flops, linear_flops
from core.logical_axes import constrain

BLOCKS = ('basic', 'bottleneck')
STEMS = ('imagenet', 'cifar')
COMPUTE_DTYPES = ('float32', 'bfloat16')  # Names a config may give `compute_dtype`.
_CHANNELS = {'logical_axes': ('conv_out',)}


CLASSIFIER_INITS = {
    'lecun': nnx.initializers.lecun_normal(),
    'torch': nnx.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
    'zeros': nnx.initializers.zeros_init(),
}


def conv(in_features: int, out_features: int, kernel: int, stride: int, *, dtype, rngs):
  # No bias: the BatchNorm shift that follows makes it redundant. He (fan-out) init as in
  # the reference implementations.
  pad = kernel // 2
  return Conv(in_features, out_features, (kernel, kernel), strides=(stride, stride),
              padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype, rngs=rngs,
              kernel_init=nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
              kernel_metadata={'logical_axes': (None, None, 'conv_in', 'conv_out')})


def batch_norm(features: int, *, zero_scale: bool = False, norm_axis_name, dtype, rngs):
  # Momentum 0.9 and epsilon 1e-5 are the reference values (PyTorch's 0.1 update rate).
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, axis_name=norm_axis_name,
                       dtype=dtype, rngs=rngs,
                       scale_init=nnx.initializers.zeros_init() if zero_scale
                       else nnx.initializers.ones_init(),
                       scale_metadata=_CHANNELS, bias_metadata=_CHANNELS)


def compute_dtype(dtype):
  """None (the parameters' float32) or a dtype; a config gives a name ('bfloat16')."""
  if dtype is None:
    return None
  try:
    return jnp.dtype(dtype)
  except TypeError as e:
    raise KilnError(f"model.dtype='{dtype}' is not a dtype: use 'float32' or 'bfloat16'") from e


def relu(x: jax.Array) -> jax.Array:
  return constrain(jax.nn.relu(x), ('batch', None, None, 'conv_out'))


class Block(nnx.Module):
  """A residual block: `convs[i]` followed by `norms[i]` (ReLU between), plus a shortcut
  that is the identity or, when the shape changes, a 1x1 projection conv + BatchNorm.

  basic: 3x3 (stride) -> 3x3, out = features. bottleneck: 1x1 -> 3x3 (stride) -> 1x1,
  out = 4 x features.
  """

  def __init__(self, in_features: int, features: int, stride: int, *, block: str,
               zero_init_last_bn: bool, norm_axis_name, dtype, rngs: nnx.Rngs):
    if block == 'basic':
      out = features
      shapes = [(in_features, features, 3, stride), (features, features, 3, 1)]
    else:
      out = 4 * features
      shapes = [(in_features, features, 1, 1), (features, features, 3, stride),
                (features, out, 1, 1)]
    self.convs = nnx.List([conv(i, o, k, s, dtype=dtype, rngs=rngs) for i, o, k, s in shapes])
    # A zero last scale starts every block as the identity (Goyal et al. 2017), which
    # helps large-batch training.
    self.norms = nnx.List([
        batch_norm(o, zero_scale=zero_init_last_bn and n == len(shapes) - 1,
                   norm_axis_name=norm_axis_name, dtype=dtype, rngs=rngs)
        for n, (_, o, _, _) in enumerate(shapes)])
    project = stride != 1 or in_features != out
    self.projection = nnx.data(
        conv(in_features, out, 1, stride, dtype=dtype, rngs=rngs) if project else None)
    self.projection_norm = nnx.data(
        batch_norm(out, norm_axis_name=norm_axis_name, dtype=dtype, rngs=rngs) if project else None)
    self.out_features = out

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    shortcut = x
    if self.projection is not None:
      shortcut = self.projection_norm(self.projection(x), use_running_average=not train)
    for n, (layer, norm) in enumerate(zip(self.convs, self.norms)):
      x = norm(layer(x), use_running_average=not train)
      if n < len(self.convs) - 1:
        x = relu(x)
    return relu(x + shortcut)

  def forward_flops(self, spatial: Sequence[int]) -> tuple[float, tuple[int, ...]]:
    """One example's FLOPs through the convs and projection shortcut on a `spatial`
    (H, W) map, and the output map's spatial shape."""
    total, block_input = 0.0, spatial
    for layer in self.convs:
      flops, spatial = conv_flops(layer, spatial)
      total += flops
    if self.projection is not None:
      total += conv_flops(self.projection, block_input)[0]
    return total, spatial


def residual_blocks_flops(blocks, spatial) -> tuple[float, tuple[int, ...]]:
  """`Block`s in sequence: their FLOPs per example and the last one's spatial shape."""
  total = 0.0
  for block in blocks:
    flops, spatial = block.forward_flops(spatial)
    total += flops
  return total, spatial


class ResNet(nnx.Module):
  """ResNet v1.5 image classifier.

  `stage_sizes`: blocks per stage; stage i has width * 2**i channels (x4 out for
  bottlenecks) and stride 2 in its first block except stage 0. `stem`: 'imagenet' is
  a 7x7/2 conv + BN + ReLU + 3x3/2 max-pool (for 224x224 inputs); 'cifar' a 3x3/1 conv
  + BN + ReLU (for 28x28-32x32 inputs, which the ImageNet stem would shrink 4x first).
  `zero_init_last_bn`: start each block's last BatchNorm scale at zero.
  `classifier_init`: the classifier kernel's init: 'lecun' (Flax's default, variance
  1 / fan_in), 'torch' (PyTorch's nn.Linear default, uniform in +-1 / sqrt(fan_in): a third of
  the variance) or 'zeros' (big_vision's head: first logits all zero, first loss ln C). The
  smaller starts matter where the last feature map is 1 x 1 (8 x 8 inputs, cifar stem): the
  pooling then averages nothing away and LeCun logits start ~25% above ln C.
  `norm_axis_name`:
  mapped axis BatchNorm averages over (pmap). `dtype`: compute dtype (parameters stay
  float32); logits are always float32.
  """
  # What each key under config.model may hold; checked before the model is built.
  CONFIG_FIELDS = {
      'stage_sizes': F.Range(1, integer=True, each=True),
      'block': F.Choices(BLOCKS),
      'width': F.POSITIVE_INT,
      'stem': F.Choices(STEMS),
      'zero_init_last_bn': F.FLAG,
      'classifier_init': F.Choices(tuple(CLASSIFIER_INITS)),
      'dtype': F.Choices(COMPUTE_DTYPES),
  }

  def __init__(self, *, num_classes: int, input_shape: Sequence[int],
               stage_sizes: Sequence[int] = (2, 2, 2, 2), block: str = 'basic', width: int = 64,
               stem: str = 'imagenet', zero_init_last_bn: bool = False,
               classifier_init: str = 'lecun', norm_axis_name: str | None = None,
               dtype=None, rngs: nnx.Rngs):
    if block not in BLOCKS:
      raise KilnError(f"model.block='{block}' is not a ResNet block: use one of {BLOCKS}")
    if classifier_init not in CLASSIFIER_INITS:
      raise KilnError(f"model.classifier_init='{classifier_init}' is not an init: use one of "
                      f"{tuple(CLASSIFIER_INITS)}")
    if stem not in STEMS:
      raise KilnError(f"model.stem='{stem}' is not a ResNet stem: use one of {STEMS}")
    if not stage_sizes or min(stage_sizes) < 1 or width < 1:
      raise KilnError(f'model.stage_sizes={tuple(stage_sizes)} and model.width={width} must be '
                      'non-empty positive block counts and a positive width')
    dtype = compute_dtype(dtype)
    if len(input_shape) != 3:
      raise KilnError(f'ResNet input_shape {tuple(input_shape)} must be one image\'s (H, W, C)')
    self.stem = stem
    self.stem_conv = conv(input_shape[-1], width, 7 if stem == 'imagenet' else 3,
                          2 if stem == 'imagenet' else 1, dtype=dtype, rngs=rngs)
    self.stem_norm = batch_norm(width, norm_axis_name=norm_axis_name, dtype=dtype, rngs=rngs)
    blocks, channels = [], width
    for i, size in enumerate(stage_sizes):
      for j in range(size):
        stride = 2 if i > 0 and j == 0 else 1
        blocks.append(Block(channels, width * 2**i, stride, block=block,
                            zero_init_last_bn=zero_init_last_bn, norm_axis_name=norm_axis_name,
                            dtype=dtype, rngs=rngs))
        channels = blocks[-1].out_features
    self.blocks = nnx.List(blocks)
    self.classifier = nnx.Linear(channels, num_classes, dtype=dtype, rngs=rngs,
                                 kernel_init=CLASSIFIER_INITS[classifier_init],
                                 kernel_metadata={'logical_axes': ('embed', 'classes')})

  def features(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """The last stage's feature map [B, H/s, W/s, C] (s = 8 cifar stem, 32 imagenet)."""
    x = relu(self.stem_norm(self.stem_conv(images), use_running_average=not train))
    if self.stem == 'imagenet':
      x = layers.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(x, train=train)
    return x

  def __call__(self, images: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    del rngs  # No dropout in ResNets.
    x = self.features(images, train=train).mean(axis=(1, 2))
    return self.classifier(x).astype(jnp.float32)

  def features_flops(self, input_shape: Sequence[int]) -> tuple[float, tuple[int, ...]]:
    """Mirrors `features`: forward FLOPs per example up to the last stage and that map's
    spatial shape. Convs only; the max-pool and residual adds are elementwise."""
    if len(input_shape) != 3 or input_shape[-1] != self.stem_conv.in_features:
      raise KilnError(f'input_shape {tuple(input_shape)} is not the (H, W, '
                      f'{self.stem_conv.in_features}) image the ResNet was built for')
    total, spatial = conv_flops(self.stem_conv, input_shape[:2])
    if self.stem == 'imagenet':  # 3x3/2 max-pool padded by 1.
      spatial = tuple((size + 2 - 3) // 2 + 1 for size in spatial)
    flops, spatial = residual_blocks_flops(self.blocks, spatial)
    return total + flops, spatial

  def forward_flops(self, input_shape: Sequence[int]) -> float:
    """One example's forward FLOPs (models.cost conventions)."""
    return self.features_flops(input_shape)[0] + linear_flops(self.classifier)


def _variant(name: str, stage_sizes: tuple[int, ...], block: str) -> type[ResNet]:
  """A ResNet subclass with the published depth as its default. `create_model` reads a
  model's constructor signature, so the subclass states its own."""

  def __init__(self, **kwargs):
    ResNet.__init__(self, **{'stage_sizes': stage_sizes, 'block': block, **kwargs})

  defaults = {'stage_sizes': stage_sizes, 'block': block}
  signature = inspect.signature(ResNet.__init__)
  __init__.__signature__ = signature.replace(parameters=[
      p.replace(default=defaults[p.name]) if p.name in defaults else p
      for p in signature.parameters.values()])
  doc = f'{name}: {block} blocks, {stage_sizes} per stage (see ResNet).'
  return type(name, (ResNet,), {'__init__': __init__, '__doc__': doc,
                                '__module__': __name__, '__qualname__': name})


ResNet18 = _variant('ResNet18', (2, 2, 2, 2), 'basic')
ResNet34 = _variant('ResNet34', (3, 4, 6, 3), 'basic')
ResNet50 = _variant('ResNet50', (3, 4, 6, 3), 'bottleneck')


def resnet18(**kwargs) -> ResNet:
  return ResNet18(**kwargs)


def resnet34(**kwargs) -> ResNet:
  return ResNet34(**kwargs)


def resnet50(**kwargs) -> ResNet:
  return ResNet50(**kwargs)
