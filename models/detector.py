"""A YOLO-style single-stage detector: a small residual CNN backbone and a grid head that
predicts, for every anchor of every cell, objectness, a box and class scores.

Backbone: a 3x3/2 stem conv + BN + ReLU, then stages of ResNet basic blocks
(models.resnet.Block), the first block of each stage with stride 2; the output grid is
the input downsampled by 2**(1 + len(stage_sizes)). Head: a 3x3 conv + BN + ReLU, then
a 1x1 conv to anchors x (4 box + 1 objectness + classes) values per cell.

Boxes are parametrised as in YOLOv5 (Jocher et al.), bounded so that early training
cannot blow up: centre = (cell + 2 sigmoid(t_xy) - 0.5) * stride, size = anchor *
(2 sigmoid(t_wh))**2. The model returns raw values; `decode_boxes` turns them into
(x0, y0, x1, y1) pixels. Losses, assignment and NMS live in tasks/detection.py.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from core.errors import KilnError
from core import fields as F
from models.conv import Conv
from models.cost import conv_flops
from models.resnet import (COMPUTE_DTYPES, Block, batch_norm, compute_dtype, conv, relu,
                           residual_blocks_flops)

# Prior probability of an object at an anchor when training starts (RetinaNet's 0.01):
# the head starts out predicting background, which keeps the first steps' loss sane.
_OBJECTNESS_PRIOR = 0.01


class YOLO(nnx.Module):
  """`anchors`: (width, height) pixels per anchor; each cell predicts one box per anchor.
  `stage_sizes` / `widths`: residual blocks and channels per backbone stage.
  `stem_width`: channels of the stride-2 stem conv. `head_width`: channels of the 3x3
  head conv. `norm_axis_name`: mapped axis BatchNorm averages over (pmap)."""
  # What each key under config.model may hold; checked before the model is built.
  CONFIG_FIELDS = {
      'anchors': F.Range(0, low_open=True, each=True),  # (w, h) pixel pairs.
      'stem_width': F.POSITIVE_INT,
      'widths': F.Range(1, integer=True, each=True),
      'stage_sizes': F.Range(1, integer=True, each=True),
      'head_width': F.POSITIVE_INT,
      'dtype': F.Choices(COMPUTE_DTYPES),
  }

  def __init__(self, *, num_classes: int, input_shape: Sequence[int],
               anchors: Sequence[Sequence[float]] = ((14.0, 20.0), (26.0, 30.0)),
               stem_width: int = 16, widths: Sequence[int] = (32, 64),
               stage_sizes: Sequence[int] = (1, 2), head_width: int = 64,
               norm_axis_name: str | None = None, dtype=None, rngs: nnx.Rngs):
    if len(widths) != len(stage_sizes) or not widths or min(stage_sizes) < 1:
      raise KilnError(f'model.widths={tuple(widths)} and model.stage_sizes='
                      f'{tuple(stage_sizes)} must be equally long, non-empty, blocks >= 1')
    if not anchors or any(len(a) != 2 or min(a) <= 0 for a in anchors):
      raise KilnError(f'model.anchors={tuple(map(tuple, anchors))} must be positive '
                      '(width, height) pairs')
    if len(input_shape) != 3:
      raise KilnError(f'YOLO input_shape {tuple(input_shape)} must be one image\'s (H, W, C)')
    dtype = compute_dtype(dtype)
    self.stride = 2 ** (1 + len(widths))
    if input_shape[0] % self.stride or input_shape[1] % self.stride:
      raise KilnError(f'input {tuple(input_shape[:2])} is not a multiple of the detector '
                      f'stride {self.stride}: resize the canvases or use fewer stages')
    self.anchors = tuple((float(w), float(h)) for w, h in anchors)
    self.num_classes = num_classes
    self.grid_shape = (input_shape[0] // self.stride, input_shape[1] // self.stride)
    norm = dict(norm_axis_name=norm_axis_name, dtype=dtype, rngs=rngs)
    self.stem_conv = conv(input_shape[-1], stem_width, 3, 2, dtype=dtype, rngs=rngs)
    self.stem_norm = batch_norm(stem_width, **norm)
    blocks, channels = [], stem_width
    for width, size in zip(widths, stage_sizes):
      for j in range(size):
        blocks.append(Block(channels, width, 2 if j == 0 else 1, block='basic',
                            zero_init_last_bn=False, **norm))
        channels = width
    self.blocks = nnx.List(blocks)
    self.head_conv = conv(channels, head_width, 3, 1, dtype=dtype, rngs=rngs)
    self.head_norm = batch_norm(head_width, **norm)
    per_anchor = 5 + num_classes
    bias = jnp.zeros((len(self.anchors), per_anchor))
    bias = bias.at[:, 4].set(-math.log((1 - _OBJECTNESS_PRIOR) / _OBJECTNESS_PRIOR))
    self.predict = Conv(head_width, len(self.anchors) * per_anchor, (1, 1), dtype=dtype,
                        rngs=rngs, kernel_init=nnx.initializers.normal(0.01),
                        bias_init=lambda key, shape, dtype: bias.reshape(shape).astype(dtype),
                        kernel_metadata={'logical_axes': (None, None, 'conv_in', None)})

  def __call__(self, images: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Raw predictions [B, H/stride, W/stride, anchors, 4 box + 1 objectness + classes]."""
    del rngs  # No dropout.
    x = relu(self.stem_norm(self.stem_conv(images), use_running_average=not train))
    for block in self.blocks:
      x = block(x, train=train)
    x = relu(self.head_norm(self.head_conv(x), use_running_average=not train))
    x = self.predict(x).astype(jnp.float32)
    return x.reshape(*x.shape[:3], len(self.anchors), 5 + self.num_classes)

  def forward_flops(self, input_shape: Sequence[int]) -> float:
    """One example's forward FLOPs (models.cost conventions), mirroring __call__: stem,
    residual blocks, head convs."""
    if len(input_shape) != 3 or input_shape[-1] != self.stem_conv.in_features:
      raise KilnError(f'input_shape {tuple(input_shape)} is not the (H, W, '
                      f'{self.stem_conv.in_features}) image the detector was built for')
    total, spatial = conv_flops(self.stem_conv, input_shape[:2])
    flops, spatial = residual_blocks_flops(self.blocks, spatial)
    head, spatial = conv_flops(self.head_conv, spatial)
    return total + flops + head + conv_flops(self.predict, spatial)[0]

  def decode_boxes(self, raw: jax.Array) -> jax.Array:
    """(x0, y0, x1, y1) pixels of every anchor's box from raw predictions [..., H, W,
    anchors, >= 4]."""
    height, width = raw.shape[-4], raw.shape[-3]
    cy, cx = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing='ij')
    cells = jnp.stack([cx, cy], -1)[:, :, None, :].astype(jnp.float32)  # [H, W, 1, 2]
    anchor_index = jnp.arange(len(self.anchors))[None, None, :]
    return self.decode_at(raw[..., :4], cells, anchor_index)

  def decode_at(self, box_raw: jax.Array, cells: jax.Array, anchor_index: jax.Array
                ) -> jax.Array:
    """Boxes from raw box values `box_raw` [..., 4] predicted at grid `cells` [..., 2]
    (x, y cell indices) by anchors `anchor_index` [...] (shapes broadcast)."""
    anchors = jnp.asarray(self.anchors, jnp.float32)[anchor_index]
    xy = jax.nn.sigmoid(box_raw[..., :2])
    wh = jax.nn.sigmoid(box_raw[..., 2:4])
    centre = (cells + 2.0 * xy - 0.5) * self.stride
    size = anchors * (2.0 * wh) ** 2
    return jnp.concatenate([centre - size / 2, centre + size / 2], axis=-1)
