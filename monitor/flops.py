"""The MFU arithmetic built on the model's own FLOP count.

Each model family counts one example's forward FLOPs itself (`model.forward_flops(
input_shape)`, built from models.cost: each matmul or convolution 2 FLOPs per
multiply-add). This module never imports a model: it calls that method duck-typed, and
turns the count into a training step's (3x the forward: the backward pass costs about
twice the forward, so rematerialisation or XLA's own rewrites never inflate the reported
MFU), TFLOP/s per device and MFU. XLA's cost analysis (`xla_flops`) is the cross-check,
and the fallback for a model that does not count itself.
"""

import inspect
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx

from core.errors import KilnError

# Model classes already warned about counting by XLA (the warning is said once per class).
_WARNED: set[type] = set()


def forward_flops(model: nnx.Module, input_shape: Sequence[int], input_dtype=np.float32
                  ) -> float:
  """FLOPs of one example's forward pass; `input_shape` excludes the batch dim.

  The model's own `forward_flops(input_shape)` when it has one (it reads only layer
  shapes, so concrete and abstract `nnx.eval_shape` models count alike); otherwise XLA's
  count of the compiled forward on one example of `input_dtype`, with a warning.
  """
  counter = getattr(model, 'forward_flops', None)
  if callable(counter):
    return float(counter(tuple(input_shape)))
  if type(model) not in _WARNED:
    _WARNED.add(type(model))
    logging.warning('%s has no forward_flops(input_shape): its FLOPs (and MFU) come from '
                    "XLA's cost analysis, which also counts elementwise work",
                    type(model).__name__)
  return xla_forward_flops(model, input_shape, input_dtype)


def xla_forward_flops(model: nnx.Module, input_shape: Sequence[int], input_dtype=np.float32
                      ) -> float:
  """XLA's FLOPs for `model(x)` (eval mode when it takes `train`) on one example `x`."""
  graphdef, state = nnx.split(model)
  takes_train = 'train' in inspect.signature(type(model).__call__).parameters
  kwargs = {'train': False} if takes_train else {}
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, **kwargs))
  example = jax.ShapeDtypeStruct((1, *input_shape), input_dtype)
  try:
    counted = xla_flops(forward, state, example)
  except Exception as error:  # Whatever the forward raised, the fix is the same.
    reason = (str(error).splitlines() or [type(error).__name__])[0]
    raise KilnError(f'{type(model).__name__} has no forward_flops and XLA could not count '
                    f'model(x) for one input of shape {tuple(input_shape)} ({reason}): add '
                    'forward_flops(input_shape) to the model') from error
  if counted is None:
    raise KilnError(f'{type(model).__name__} has no forward_flops and this backend gives no '
                    'cost analysis: add forward_flops(input_shape) to the model')
  return counted


def train_step_flops(model: nnx.Module, input_shape: Sequence[int], batch_size: int,
                     input_dtype=np.float32) -> float:
  """Model FLOPs of one optimizer step over a global batch: forward + backward (2x forward)."""
  if batch_size <= 0:
    raise KilnError(f'batch_size={batch_size} must be positive')
  return 3.0 * forward_flops(model, input_shape, input_dtype) * batch_size


def palm_train_step_flops(model: nnx.Module, length: int, batch_size: int) -> float:
  """The PaLM paper's count of a training step (model.palm_flops_per_token, a GPT's),
  reported beside `train_step_flops` so that MFU figures compare with those papers' and
  repositories'."""
  return model.palm_flops_per_token(length) * length * batch_size


def xla_flops(jitted_fn, *args, **kwargs) -> float | None:
  """FLOPs XLA counts in the compiled `jitted_fn(*args, **kwargs)`; None if the backend
  gives no cost analysis. A sharded program reports one device's share.

  XLA counts elementwise ops too and skips work it removed (e.g. the input gradient
  of a first layer), so expect it near, not equal to, the analytic count.
  """
  analysis = jitted_fn.lower(*args, **kwargs).compile().cost_analysis()
  if analysis is None:
    return None
  # Older JAX returns one dict per HLO module, newer a single dict.
  modules = analysis if isinstance(analysis, (list, tuple)) else [analysis]
  counts = [module['flops'] for module in modules if module and 'flops' in module]
  return float(sum(counts)) if counts else None


def _positive(name: str, value: float) -> None:
  if not value > 0:
    raise KilnError(f'{name}={value} must be positive')


def tflops_per_device(flops_per_step: float, step_seconds: float, num_devices: int) -> float:
  """Achieved model TFLOP/s per device."""
  _positive('step_seconds', step_seconds)
  _positive('num_devices', num_devices)
  return flops_per_step / step_seconds / num_devices / 1e12


def mfu(flops_per_step: float, step_seconds: float, num_devices: int,
        peak_flops_per_device: float | None) -> float | None:
  """Model FLOPs utilisation: achieved FLOP/s per device over the device's peak FLOP/s
  (see monitor.hardware.peak_flops_per_device); None when the peak is unknown."""
  if peak_flops_per_device is None:
    return None
  _positive('peak_flops_per_device', peak_flops_per_device)
  achieved = tflops_per_device(flops_per_step, step_seconds, num_devices) * 1e12
  return achieved / peak_flops_per_device
