"""A trained model back from a run's workdir, ready to call eagerly (notebooks, sampling), and
as one pure function of its serving inputs (what export/ writes and serve/ runs)."""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
from absl import logging
from flax import nnx

from backends import ops
from loop import experiment as experiment_lib
from loop import run_config
from loop.checkpoint import Checkpointer
from core.errors import KilnError
from tasks.base import Serving


def load_model(config, workdir: str, exp: experiment_lib.Experiment | None = None
               ) -> tuple[nnx.Module, experiment_lib.Experiment, int]:
  """(model with the newest checkpoint's parameters, the experiment `config` builds, step).
  A LoRA run's model is the plain one with its adapters merged (compress.lora.merge).

  `config` must be the one the run trained with: it rebuilds the data (and so the
  model's sizes, e.g. the vocabulary) and the state layout. The EMA parameters are used
  when the run kept them and evaluated with them. `exp` reuses an experiment already built.
  """
  exp = exp or experiment_lib.build_experiment(config)
  checkpointer = Checkpointer(workdir, keep=1)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise KilnError(f"no checkpoint in '{workdir}/checkpoints': train there first with "
                      'train.py (or train_and_evaluate)')
    state, shardings = exp.create_state()
    state, _ = checkpointer.restore(step, exp.strategy.checkpoint_view(state),
                                    exp.strategy.restore_shardings(shardings))
  finally:
    checkpointer.close()
  use_ema = state.ema_params is not None and config.ema.use_for_eval
  params = state.ema_params if use_ema else state.params
  if exp.lora is not None:  # LoRA: adapters folded into plain kernels (the model without LoRA).
    params = exp.lora.merge(params, state.lora)
  logging.info('Loaded step %d from %s', step, workdir)
  return exp.template.merge(params, state.model_state), exp, step


@dataclasses.dataclass
class Trained:
  """A finished run, loaded for export or serving: its config, experiment, model and signature."""
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
    raise KilnError(f"'{workdir}' was trained before config.export existed: load it through "
                    'export.py or serve.py, which fill in the defaults')
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
  """The newest checkpoint of `workdir` as a model ready to export or serve (LoRA merged, EMA used
  where the run evaluated with it); `defaults` as read_config takes them."""
  config = read_config(workdir, defaults)
  model, exp, step = load_model(config, workdir)
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


def input_specs(serving: Serving, batch: int | str = 'b') -> dict:
  """ShapeDtypeStructs of the inputs with a batch dim: a size, or a symbolic name that
  jax.export keeps polymorphic."""
  if isinstance(batch, str):
    (size,) = jax.export.symbolic_shape(batch)
  else:
    size = batch
  return {name: jax.ShapeDtypeStruct((size, *shape), np.dtype(dtype))
          for name, (shape, dtype) in serving.inputs.items()}
