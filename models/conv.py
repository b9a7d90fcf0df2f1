"""The one convolution layer every Kiln model uses.

`Conv` is `nnx.Conv` (same parameters, same checkpoints, same FLOP counting) with its
`conv_general_dilated` hook pointed at `backends.ops.conv_general_dilated`: XLA's native
convolution, or on CPU the lowering backends/cpu/conv_lowering.py picks per shape.
"""

from flax import nnx

from backends import ops


class Conv(nnx.Conv):
  """`nnx.Conv` whose convolution goes through `backends.ops.conv_general_dilated`."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, conv_general_dilated=ops.conv_general_dilated, **kwargs)
