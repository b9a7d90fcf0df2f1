"""The one convolution layer every Kiln model uses.

`Conv` is `nnx.Conv` (same parameters, same checkpoints, same FLOP counting) with its
`conv_general_dilated` hook pointed at `convolve`, which picks a lowering per shape
and backend. Today `convolve` always takes XLA's native convolution; issue 9 adds
the GEMM lowerings for CPU and the measured choice between them.
"""

import functools

import jax
from flax import nnx


def convolve(inputs: jax.Array, kernel: jax.Array, window_strides, padding, *,
             lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
             feature_group_count: int = 1, precision=None, lowering: str = 'auto',
             **kwargs) -> jax.Array:
  """Drop-in for `jax.lax.conv_general_dilated` as `nnx.Conv` calls it."""
  del lowering  # Only the native lowering exists so far.
  return jax.lax.conv_general_dilated(
      inputs, kernel, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)


class Conv(nnx.Conv):
  """`nnx.Conv` whose convolution goes through `convolve`.

  `lowering`: 'auto' (measured or rule-table choice per shape and backend) or a
  lowering's name to force it.
  """

  def __init__(self, *args, lowering: str = 'auto', **kwargs):
    super().__init__(*args, conv_general_dilated=functools.partial(convolve, lowering=lowering),
                     **kwargs)
