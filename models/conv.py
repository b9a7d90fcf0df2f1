"""The one convolution layer every Kiln model uses.

`Conv` is `nnx.Conv` (same parameters, same checkpoints, same FLOP counting) with its
`conv_general_dilated` hook pointed at `convolve`, which picks a lowering per shape
and backend: XLA's native convolution, or on CPU a GEMM rewrite of it when that
measures faster (models/conv_lowering.py).
"""

import functools

import jax
from flax import nnx

from core.errors import KilnError
from backends.cpu import conv_lowering


def convolve(inputs: jax.Array, kernel: jax.Array, window_strides, padding, *,
             lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
             feature_group_count: int = 1, precision=None, lowering: str = 'auto',
             **kwargs) -> jax.Array:
  """Drop-in for `jax.lax.conv_general_dilated` as `nnx.Conv` calls it.

  `lowering`: 'auto' (conv_lowering.choose: native on accelerators; on CPU each pass,
  forward and both gradients, measured or from the rule table), or one of
  conv_lowering.LOWERINGS to force it on every pass. Calls the GEMM
  lowerings do not cover (input dilation, other layouts, an explicit output sharding,
  batch groups) stay native whatever is asked.
  """
  if lowering != 'auto' and lowering not in conv_lowering.LOWERINGS:
    raise KilnError(f"conv lowering '{lowering}' does not exist: use 'auto' or one of "
                    f'{conv_lowering.LOWERINGS}')
  spec = None
  covered = kwargs.get('out_sharding') is None and set(kwargs) <= {'out_sharding',
                                                                   'preferred_element_type'}
  if lowering != 'native' and covered:
    spec = conv_lowering.channels_last_spec(
        inputs, kernel, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count)
  if spec is None:
    return jax.lax.conv_general_dilated(
        inputs, kernel, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision, **kwargs)
  if lowering == 'auto':
    plan = conv_lowering.choose(spec)
  else:
    plan = conv_lowering.forced(lowering, spec)
  return conv_lowering.convolve(inputs, kernel, spec, plan, precision,
                                kwargs.get('preferred_element_type'))


class Conv(nnx.Conv):
  """`nnx.Conv` whose convolution goes through `convolve`.

  `lowering`: 'auto' (measured or rule-table choice per shape and backend) or a
  lowering's name to force it.
  """

  def __init__(self, *args, lowering: str = 'auto', **kwargs):
    if lowering != 'auto' and lowering not in conv_lowering.LOWERINGS:
      raise KilnError(f"conv lowering '{lowering}' does not exist: use 'auto' or one of "
                      f'{conv_lowering.LOWERINGS}')
    super().__init__(*args, conv_general_dilated=functools.partial(convolve, lowering=lowering),
                     **kwargs)
