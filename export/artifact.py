"""A trained workdir as one pure function of its serving inputs: what every format exports
(loop/trained.py loads the run and builds the function; serve/ uses the same code).

The function closes over the trained parameters as host constants (an artifact needs no
checkpoint beside it) and is traced under `backends.ops.portable()`, so every op takes its
plain-XLA path: `jax.export` and the converters refuse Kiln's compiled CPU kernels (custom
calls). Inputs and outputs are dicts keyed as `Task.serving()` names them.
"""

import numpy as np
from flax import nnx

from backends import ops
from core.errors import KilnError
from loop.trained import (  # noqa: F401 (export's API)
    Trained, host_model, input_specs, load, predict_fn, read_config)


class _CallRecorder:
  """Stands in for a model inside `Serving.forward` and records the positional arguments of
  each direct call: the model's own inputs (e.g. normalised images) for quantisation."""

  def __init__(self, model: nnx.Module):
    self._model, self.calls = model, []

  def __call__(self, *args, **kwargs):
    self.calls.append(args)
    return self._model(*args, **kwargs)

  def __getattr__(self, name):  # Methods other than __call__ (e.g. classify) are not recorded.
    return getattr(self._model, name)


def model_inputs(trained: Trained, inputs: dict) -> tuple:
  """The positional arguments `trained.serving.forward` calls the model with on `inputs`;
  a one-line error for a task whose forward calls another method (quantising in JAX hooks
  the model's __call__)."""
  recorder = _CallRecorder(trained.model)
  with ops.portable():
    trained.serving.forward(recorder, inputs)
  if len(recorder.calls) != 1:
    raise KilnError(f"task '{trained.config.task}' does not call its model directly, so the "
                    "model cannot be quantised in JAX: export 'tflite_int8' or "
                    "'tflite_dynamic' instead")
  return tuple(np.asarray(x) for x in recorder.calls[0])
