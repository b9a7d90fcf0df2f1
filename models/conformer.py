"""Conformer encoder (Gulati et al. 2020, "Conformer: Convolution-augmented Transformer for
Speech Recognition").

Convolutional subsampling (two 3x3 stride-2 convs, 4x fewer frames), then blocks of
  x + 1/2 FFN(x), x + MHSA(x), x + Conv(x), x + 1/2 FFN(x), LayerNorm
(the macaron feed-forward pair around attention and the convolution module). Departures
from the paper, each for a stated reason: attention positions are rotary (relative like
the paper's Transformer-XL encoding, and already in models/transformer.py). The
convolution module's norm is the paper's BatchNorm with `conv_norm='batch'`, its
statistics over valid frames only (padding is masked out of them), or LayerNorm with
`conv_norm='layer'` (ESPnet offers the same), which needs no batch statistics.
Every convolution is models.conv.Conv.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from backends import ops
from core.errors import KilnError
from core import fields as F
from models.conv import Conv
from models.cost import attention_flops, conv_flops, linear_flops
from models.recurrent import time_mask
from models.transformer import Attention

_NORM = {'logical_axes': ('embed',)}


def subsampled_frames(frames: jax.Array) -> jax.Array:
  """Valid frames after two 'SAME' stride-2 convs: ceil(ceil(n / 2) / 2)."""
  return -(-(-(-frames // 2)) // 2)

CONV_NORMS = ('batch', 'layer')  # Norms after the depthwise conv (see the module docstring).


class ConvSubsampling(nnx.Module):
  def __init__(self, input_dim: int, channels: int, model_dim: int, *, rngs: nnx.Rngs):
    self.conv1 = Conv(1, channels, (3, 3), strides=(2, 2), padding='SAME', rngs=rngs,
                      kernel_metadata={'logical_axes': (None, None, 'conv_in', 'conv_out')})
    self.conv2 = Conv(channels, channels, (3, 3), strides=(2, 2), padding='SAME', rngs=rngs,
                      kernel_metadata={'logical_axes': (None, None, 'conv_in', 'conv_out')})
    self.out_bins = -(-(-(-input_dim // 2)) // 2)
    self.proj = nnx.Linear(channels * self.out_bins, model_dim, rngs=rngs,
                           dot_general=ops.dot_general,
                           kernel_metadata={'logical_axes': ('embed', 'mlp')})

  def __call__(self, features: jax.Array, mask: jax.Array) -> jax.Array:
    x = jnp.where(mask[..., None], features, 0.0)[..., None]  # [B, T, F, 1]
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    batch, length = x.shape[:2]
    return self.proj(x.reshape(batch, length, -1))


class FeedForward(nnx.Module):
  def __init__(self, dim: int, hidden: int, dropout_rate: float, *, rngs: nnx.Rngs):
    self.norm = ops.LayerNorm(dim, scale_metadata=_NORM, bias_metadata=_NORM, rngs=rngs)
    self.fc1 = nnx.Linear(dim, hidden, rngs=rngs, dot_general=ops.dot_general,
                          kernel_metadata={'logical_axes': ('embed', 'mlp')})
    self.fc2 = nnx.Linear(hidden, dim, rngs=rngs, dot_general=ops.dot_general,
                          kernel_metadata={'logical_axes': ('mlp', 'embed')})
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x, *, train, rngs):
    h = self.dropout(jax.nn.swish(self.fc1(self.norm(x))), deterministic=not train, rngs=rngs)
    return self.dropout(self.fc2(h), deterministic=not train, rngs=rngs)


class ConvModule(nnx.Module):
  """Pointwise conv + GLU, depthwise conv, norm, swish, pointwise conv."""

  def __init__(self, dim: int, kernel_size: int, dropout_rate: float, *, conv_norm: str,
               norm_axis_name: str | None, rngs: nnx.Rngs):
    self.norm = ops.LayerNorm(dim, scale_metadata=_NORM, bias_metadata=_NORM, rngs=rngs)
    self.pointwise1 = Conv(dim, 2 * dim, (1,), rngs=rngs,
                           kernel_metadata={'logical_axes': (None, 'conv_in', 'conv_out')})
    self.depthwise = Conv(dim, dim, (kernel_size,), feature_group_count=dim, padding='SAME',
                          rngs=rngs, kernel_metadata={'logical_axes': (None, None, 'conv_out')})
    if conv_norm == 'batch':  # Momentum and epsilon as PyTorch's BatchNorm1d defaults.
      self.depth_norm = nnx.BatchNorm(dim, momentum=0.9, epsilon=1e-5, axis_name=norm_axis_name,
                                      scale_metadata=_NORM, bias_metadata=_NORM, rngs=rngs)
    elif conv_norm == 'layer':
      self.depth_norm = ops.LayerNorm(dim, scale_metadata=_NORM, bias_metadata=_NORM, rngs=rngs)
    else:
      raise KilnError(f"conformer conv_norm='{conv_norm}' must be 'batch' or 'layer': set "
                      'config.model.conv_norm (config.model.encoder.conv_norm under RNN-T)')
    self.pointwise2 = Conv(dim, dim, (1,), rngs=rngs,
                           kernel_metadata={'logical_axes': (None, 'conv_in', 'conv_out')})
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x, mask, *, train, rngs):
    h = jax.nn.glu(self.pointwise1(self.norm(x)), axis=-1)
    h = jnp.where(mask[..., None], h, 0.0)  # Padding must not leak into valid frames.
    h = self.depthwise(h)
    if isinstance(self.depth_norm, nnx.BatchNorm):
      h = self.depth_norm(h, use_running_average=not train, mask=mask[..., None])
    else:
      h = self.depth_norm(h)
    h = jax.nn.swish(h)
    return self.dropout(self.pointwise2(h), deterministic=not train, rngs=rngs)


class ConformerBlock(nnx.Module):
  def __init__(self, dim: int, num_heads: int, ff_ratio: int, kernel_size: int,
               dropout_rate: float, *, conv_norm: str, norm_axis_name: str | None,
               rngs: nnx.Rngs):
    self.ff1 = FeedForward(dim, ff_ratio * dim, dropout_rate, rngs=rngs)
    self.attn_norm = ops.LayerNorm(dim, scale_metadata=_NORM, bias_metadata=_NORM, rngs=rngs)
    self.attn = Attention(dim, num_heads, use_bias=True, rotary_positions=True,
                          dtype=jnp.float32, rngs=rngs)
    self.conv = ConvModule(dim, kernel_size, dropout_rate, conv_norm=conv_norm,
                           norm_axis_name=norm_axis_name, rngs=rngs)
    self.ff2 = FeedForward(dim, ff_ratio * dim, dropout_rate, rngs=rngs)
    self.out_norm = ops.LayerNorm(dim, scale_metadata=_NORM, bias_metadata=_NORM, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x, mask, positions, *, train, rngs):
    x = x + 0.5 * self.ff1(x, train=train, rngs=rngs)
    y, _ = self.attn(self.attn_norm(x), positions=positions, causal=False, key_mask=mask)
    x = x + self.dropout(y, deterministic=not train, rngs=rngs)
    x = x + self.conv(x, mask, train=train, rngs=rngs)
    x = x + 0.5 * self.ff2(x, train=train, rngs=rngs)
    return self.out_norm(x)


class ConformerEncoder(nnx.Module):
  """`__call__(features [B, T, F], frames [B]) -> (outputs [B, ceil(T/4), D], frames' [B])`;
  D is num_outputs (a linear head) or model_dim when num_outputs is 0."""
  # What each key under config.model may hold; checked before the model is built.
  CONFIG_FIELDS = {
      'num_outputs': F.NON_NEGATIVE_INT,  # 0 = no head, or taken from the data.
      'model_dim': F.POSITIVE_INT,
      'num_layers': F.POSITIVE_INT,
      'num_heads': F.POSITIVE_INT,
      'ff_ratio': F.POSITIVE_INT,
      'conv_kernel_size': F.POSITIVE_INT,
      'subsample_channels': F.POSITIVE_INT,
      'dropout_rate': F.RATE,
      'conv_norm': F.Choices(CONV_NORMS),
  }

  def __init__(self, *, input_dim: int, num_outputs: int = 0, model_dim: int = 144,
               num_layers: int = 4, num_heads: int = 4, ff_ratio: int = 4,
               conv_kernel_size: int = 15, subsample_channels: int = 64,
               dropout_rate: float = 0.1, conv_norm: str = 'batch',
               norm_axis_name: str | None = None, rngs: nnx.Rngs):
    """`conv_norm`: 'batch' (the paper's, masked to valid frames) or 'layer' after the
    depthwise conv; `norm_axis_name`: the mapped axis BatchNorm averages over (pmap)."""
    self.subsample = ConvSubsampling(input_dim, subsample_channels, model_dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)
    self.blocks = nnx.List([
        ConformerBlock(model_dim, num_heads, ff_ratio, conv_kernel_size, dropout_rate,
                       conv_norm=conv_norm, norm_axis_name=norm_axis_name, rngs=rngs)
        for _ in range(num_layers)])
    self.head = nnx.Linear(model_dim, num_outputs, rngs=rngs,
                           kernel_metadata={'logical_axes': ('embed', 'vocab')}
                           ) if num_outputs else None
    self.output_dim = num_outputs or model_dim

  def __call__(self, features, frames, *, train: bool = False, rngs=None):
    x = self.subsample(features, time_mask(frames, features.shape[1]))
    frames = subsampled_frames(frames)
    mask = time_mask(frames, x.shape[1])
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), mask.shape)
    x = self.dropout(x, deterministic=not train, rngs=rngs)
    for block in self.blocks:
      x = block(x, mask, positions, train=train, rngs=rngs)
    if self.head is not None:
      x = self.head(x)
    return x.astype(jnp.float32), frames

  def output_frames(self, frames):
    return subsampled_frames(frames)

  def forward_flops(self, input_shape) -> float:
    """One utterance's forward FLOPs for `input_shape` (max_frames, num_mels), padded
    frames included: the subsampling convs, then per block and frame the two feed-forwards,
    the attention projections plus scores and weighted sum over all frames
    (bidirectional), and the convolution module (pointwise, depthwise, pointwise)."""
    sub = self.subsample
    total, spatial = conv_flops(sub.conv1, input_shape)
    flops, spatial = conv_flops(sub.conv2, spatial)
    frames = spatial[0]
    total += flops + frames * linear_flops(sub.proj)
    for block in self.blocks:
      dim = block.attn_norm.num_features
      ffn = 2 * (linear_flops(block.ff1.fc1) + linear_flops(block.ff1.fc2))
      total += frames * (ffn + 2.0 * 4 * dim * dim) + attention_flops(frames, frames, dim, False)
      for layer in (block.conv.pointwise1, block.conv.depthwise, block.conv.pointwise2):
        total += conv_flops(layer, (frames,))[0]
    if self.head is not None:
      total += frames * linear_flops(self.head)
    return total
