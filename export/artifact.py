"""A trained workdir as one pure function of its serving inputs: what every format exports.

The function closes over the trained parameters as host constants (an artifact needs no
checkpoint beside it) and is traced under `backends.ops.portable()`, so every op takes its
plain-XLA path: `jax.export` and the converters refuse Kiln's compiled CPU kernels (custom
calls). Inputs and outputs are dicts keyed as `Task.serving()` names them.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from backends import ops
from core.errors import KilnError
from loop import experiment as experiment_lib
from loop import run_config, trained
from tasks.base import Serving


@dataclasses.dataclass
class Trained:
  """A finished run, loaded for export: its config, experiment, model and signature."""
  workdir: str
  config: ml_collections.ConfigDict
  exp: experiment_lib.Experiment
  model: nnx.Module
  serving: Serving
  step: int


def read_config(workdir: str, defaults: ml_collections.ConfigDict | None = None
                ) -> ml_collections.ConfigDict:
  """The run's config.json, with sections added since it ran (e.g. `export`) taken from
  `defaults` (entry points pass configs/base.py's); a one-line error when the workdir
  holds no run."""
  try:
    config = run_config.load(workdir)
  except FileNotFoundError:
    raise KilnError(f"'{workdir}' holds no {run_config.CONFIG_FILE}: point --workdir at a "
                    'folder that train.py trained into') from None
  if defaults is not None:
    with config.unlocked():
      _fill_missing(config, defaults)
  if 'export' not in config:
    raise KilnError(f"'{workdir}' was trained before config.export existed: export it with "
                    'export.py, which fills in the defaults')
  return config


def _fill_missing(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> None:
  """Adds every key of `defaults` that `config` lacks, at any depth."""
  for key, value in defaults.items():
    if key not in config:
      config[key] = value
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(
        config[key], ml_collections.ConfigDict):
      _fill_missing(config[key], value)


def load(workdir: str, defaults: ml_collections.ConfigDict | None = None) -> Trained:
  """The newest checkpoint of `workdir` as a model ready to export (LoRA merged, EMA used
  where the run evaluated with it); `defaults` as read_config takes them."""
  config = read_config(workdir, defaults)
  model, exp, step = trained.load_model(config, workdir)
  return Trained(workdir, config, exp, model, exp.task.serving(), step)


def host_model(model: nnx.Module, weight_dtype=None) -> nnx.Module:
  """`model` with every array gathered onto one device (constants in a traced function,
  not buffers sharded over a training mesh); float weights cast to `weight_dtype` when
  given. JAX arrays, not NumPy: `embedding[tokens]` must trace."""
  graphdef, state = nnx.split(model)
  device = jax.local_devices()[0]

  def to_host(x):
    x = np.asarray(jax.device_get(x))
    if weight_dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(weight_dtype)
    return jax.device_put(x, device)
  return nnx.merge(graphdef, jax.tree.map(to_host, state))


def predict_fn(model: nnx.Module, serving: Serving) -> Callable[[dict], dict]:
  """inputs dict -> outputs dict, the model's parameters baked in, portable ops only."""
  model = host_model(model)

  def predict(inputs: dict) -> dict:
    with ops.portable():  # Acts on tracing: export and the converters trace this body.
      outputs = serving.forward(model, inputs)
    return {name: jnp.asarray(value) for name, value in outputs.items()}
  return predict


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


def input_specs(serving: Serving, batch: int | str = 'b') -> dict:
  """ShapeDtypeStructs of the inputs with a batch dim: a size, or a symbolic name that
  jax.export keeps polymorphic."""
  if isinstance(batch, str):
    (size,) = jax.export.symbolic_shape(batch)
  else:
    size = batch
  return {name: jax.ShapeDtypeStruct((size, *shape), np.dtype(dtype))
          for name, (shape, dtype) in serving.inputs.items()}
