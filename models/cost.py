"""Layer-level FLOP arithmetic that each model family's `forward_flops` is built from.

Models count their own cost (so adding a model touches only its module and its
registration); this module holds the per-layer pieces they share and lives in models/
because monitor/, which turns the count into TFLOP/s and MFU, may not be imported here.

Each matmul or convolution is 2 FLOPs per multiply-add (2*m*n*k). Elementwise work
(activations, bias adds, BatchNorm, dropout), pooling and the loss are ignored: they are a
few FLOPs per activation against hundreds per output of a conv or dense layer.
"""

from collections.abc import Sequence

import jax
from flax import nnx

from core.errors import KilnError


def linear_flops(layer: nnx.Linear) -> float:
  """One example's forward FLOPs through a dense layer (bias adds ignored). A layer that
  stands in for one (e.g. compress.low_rank's factored pair) counts itself."""
  own = getattr(layer, 'linear_flops', None)
  if callable(own):
    return float(own())
  return 2.0 * layer.in_features * layer.out_features


def attention_flops(length: int, keys: int, width: int, causal: bool) -> float:
  """Scores and the weighted sum of `length` queries over `keys` keys, `width` = heads *
  head_dim: 2 * keys * width each, halved when causal because half the score matrix is
  masked (XLA computes the masked half anyway, so its count runs a little higher)."""
  return length * 2.0 * 2 * keys * width * (0.5 if causal else 1.0)


def per_dim(value, rank: int) -> tuple[int, ...]:
  """A conv's per-dim setting (None, an int, or one per spatial dim) as a tuple."""
  if value is None:
    return (1,) * rank
  if isinstance(value, int):
    return (value,) * rank
  return tuple(value)


def _paddings(padding, sizes, kernel_sizes, strides) -> tuple[list[tuple[int, int]], bool]:
  """Per spatial dim (low, high) padding as nnx.Conv applies it, and whether the padded
  values are copies of the input (circular/reflect) rather than zeros."""
  rank = len(sizes)
  if isinstance(padding, str):
    mode = padding.upper()
    if mode in ('CIRCULAR', 'REFLECT'):
      return [((k - 1) // 2, k // 2) for k in kernel_sizes], True
    if mode == 'CAUSAL':
      return [(k - 1, 0) for k in kernel_sizes], False
    return list(jax.lax.padtype_to_pads(sizes, kernel_sizes, strides, mode)), False
  if isinstance(padding, int):
    return [(padding, padding)] * rank, False
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding], False


def _taps_on_input(size: int, kernel: int, dilation: int, stride: int, low: int, high: int,
                   padded_is_input: bool) -> tuple[int, int]:
  """(output positions, kernel taps summed over them that land on input rather than zero
  padding) along one spatial dim."""
  span = (kernel - 1) * dilation + 1
  outputs = (size + low + high - span) // stride + 1
  if padded_is_input:
    return outputs, outputs * kernel
  taps = sum(1 for o in range(outputs) for k in range(kernel)
             if 0 <= o * stride - low + k * dilation < size)
  return outputs, taps


def conv_flops(conv: nnx.Conv, spatial_shape: Sequence[int]) -> tuple[float, tuple[int, ...]]:
  """One example's forward FLOPs through `conv` on an input of `spatial_shape` (no channel
  dim), and the output's spatial shape.

  Only multiply-adds whose input is real data count, not those against zero padding:
  that is the model's arithmetic (and XLA's convention). On small images the
  difference is large: 'SAME' 3x3 padding is 16% of an 8x8 map's taps, 31% of a 4x4's.
  A module that stands in for a conv (e.g. compress.low_rank's factored pair) counts itself.
  """
  own = getattr(conv, 'conv_flops', None)
  if callable(own):
    return own(spatial_shape)
  kernel_sizes = tuple(conv.kernel_size)
  rank = len(kernel_sizes)
  if len(spatial_shape) != rank:
    raise KilnError(f'input spatial shape {tuple(spatial_shape)} has {len(spatial_shape)} dims '
                    f'but the conv kernel {kernel_sizes} has {rank}: pass (H, W, ...) without '
                    'batch and channel dims')
  if any(d != 1 for d in per_dim(conv.input_dilation, rank)):
    raise KilnError('conv FLOPs with input_dilation > 1 (transposed convs) are not counted '
                    'yet: extend models.cost.conv_flops before using them')
  strides = per_dim(conv.strides, rank)
  dilations = per_dim(conv.kernel_dilation, rank)
  spans = [(k - 1) * d + 1 for k, d in zip(kernel_sizes, dilations)]
  pads, padded_is_input = _paddings(conv.padding, tuple(spatial_shape), spans, strides)
  out_shape, taps = [], 1
  for size, k, d, s, (low, high) in zip(spatial_shape, kernel_sizes, dilations, strides, pads):
    outputs, dim_taps = _taps_on_input(size, k, d, s, low, high, padded_is_input)
    out_shape.append(outputs)
    taps *= dim_taps
  in_per_group = conv.in_features // conv.feature_group_count
  return 2.0 * taps * in_per_group * conv.out_features, tuple(out_shape)
