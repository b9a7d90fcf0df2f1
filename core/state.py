"""Training state as a plain pytree, created directly in its sharded layout.

Parameters and the rest of the model state (e.g. BatchNorm statistics) are kept
as pure nested dicts: Orbax, Optax and path-based rules all work on them, and
`ModelTemplate.merge` turns them back into an NNX module inside the jitted step.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from parallel import mesh as mesh_lib


@struct.dataclass
class TrainState:
  step: jax.Array  # Optimizer steps taken.
  params: dict  # nnx.Param values.
  model_state: dict  # Every other model variable (BatchNorm statistics, ...).
  opt_state: optax.OptState
  rng: jax.Array  # Raw uint32 key; per-step keys are folded in from `step`.
  ema_params: dict | None = None  # Moving average of `params` when config.ema is on.


class ModelTemplate:
  """The static part of a model (graph and variable layout) without its values."""

  def __init__(self, build_model: Callable[[nnx.Rngs], nnx.Module]):
    self.build_model = build_model
    abstract = nnx.eval_shape(lambda: build_model(nnx.Rngs(0)))
    self.graphdef, self._params, self._rest = nnx.split(abstract, nnx.Param, ...)

  def merge(self, params: dict, model_state: dict) -> nnx.Module:
    params_state = jax.tree.map(lambda x: x, self._params)
    rest_state = jax.tree.map(lambda x: x, self._rest)
    nnx.replace_by_pure_dict(params_state, params)
    nnx.replace_by_pure_dict(rest_state, model_state)
    return nnx.merge(self.graphdef, params_state, rest_state)

  @staticmethod
  def split(model: nnx.Module) -> tuple[dict, dict]:
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def init_state(template: ModelTemplate, tx: optax.GradientTransformation, seed: int,
               use_ema: bool = False) -> TrainState:
  init_key, train_key = jax.random.split(jax.random.key(seed))
  params, model_state = template.split(template.build_model(nnx.Rngs(params=init_key)))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                    opt_state=tx.init(params), rng=jax.random.key_data(train_key),
                    ema_params=jax.tree.map(jnp.copy, params) if use_ema else None)


def state_shardings(abstract_state: TrainState, mesh: Mesh):
  """Every state leaf replicated (data parallelism); sharding rules come with FSDP/TP."""
  return jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract_state)


def create_sharded_state(template: ModelTemplate, tx: optax.GradientTransformation, seed: int,
                         mesh: Mesh, use_ema: bool = False) -> tuple[TrainState, TrainState]:
  """Returns the state, built on the devices in its final layout, and its shardings."""
  def init():
    return init_state(template, tx, seed, use_ema)
  shardings = state_shardings(jax.eval_shape(init), mesh)
  return jax.jit(init, out_shardings=shardings)(), shardings
