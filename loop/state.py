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
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from loop import guard as guard_lib
from core.logical_axes import FAN_OUT_KEY, LOGICAL_AXES_KEY, Rules, kernel_matrix_dims
from parallel import sharding


@struct.dataclass
class TrainState:
  step: jax.Array  # Optimizer steps taken.
  params: dict  # nnx.Param values.
  model_state: dict  # Every other model variable (BatchNorm statistics, ...).
  opt_state: optax.OptState
  rng: jax.Array  # Raw uint32 key; per-step keys are folded in from `step`.
  ema_params: dict | None = None  # Moving average of `params` when config.ema is on.
  # Distillation (loop/teacher.py): the frozen teacher's {'params', 'model_state'}, sharded
  # by its own logical axes and checkpointed with the run; None without a teacher.
  teacher: dict | None = None
  # Pruning (compress/pruning.py): a bool tree like params, [shape] for prunable kernels and
  # a scalar True elsewhere; None when config.pruning is off.
  masks: dict | None = None
  # LoRA (compress/lora.py): adapters {..., kernel: {'a': A, 'b': B}} on the frozen `params`;
  # with them the optimizer state is over {'params', 'lora'}. None when config.lora is off.
  lora: dict | None = None
  # The numerics guard (loop/guard.py): recent accepted losses and the rollback learning-rate
  # scale, replicated; None when config.guard.policy is 'off'.
  guard: dict | None = None
  # Group DRO (trust/training/fairness.py): {'group_weights': q [G]}, replicated; None when
  # config.fairness.mitigation is not 'group_dro'.
  fairness: dict | None = None


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

  def logical_axes(self) -> tuple[dict, dict]:
    """Logical axis names of (params, model_state) leaves; None where a variable has none."""
    return sharding.variable_logical_axes(self._params), sharding.variable_logical_axes(self._rest)

  def kernel_layout(self) -> dict:
    """Per parameter, `core.logical_axes.kernel_matrix_dims`: (stacked, fan_in) dims of the
    matrix a kernel multiplies its input by, or None for vectors (biases, norm scales)."""
    def layout(variable):
      metadata = variable.get_metadata()
      return kernel_matrix_dims(variable.value.shape, metadata.get(LOGICAL_AXES_KEY),
                                metadata.get(FAN_OUT_KEY, 1))
    tree = jax.tree.map(layout, self._params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree

  def param_shapes(self) -> dict:
    """Per parameter, its shape (nested like params), without building the model."""
    tree = jax.tree.map(lambda v: tuple(v.value.shape), self._params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree

  @staticmethod
  def split(model: nnx.Module) -> tuple[dict, dict]:
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def init_state(template: ModelTemplate, tx: optax.GradientTransformation, seed: int,
               use_ema: bool = False, pruning=None, lora=None, guard=None,
               fairness=None) -> TrainState:
  """`pruning`: a compress.pruning.Pruning, whose (all True) masks the state then carries.
  `lora`: a compress.lora.LoRA, whose fresh adapters the state carries (and optimizes).
  `guard`: a loop.guard.GuardOptions, whose window the state carries when it is on.
  `fairness`: a trust.training.fairness.Mitigation, whose state (Group DRO's q) it carries."""
  init_key, train_key = jax.random.split(jax.random.key(seed))
  params, model_state = template.split(template.build_model(nnx.Rngs(params=init_key)))
  # --- LoRA: adapters from their own key (the model's init is unchanged) ---
  adapters = None if lora is None else lora.init(params, jax.random.fold_in(init_key, 1))
  # --- end LoRA ---
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                    opt_state=tx.init(optimized(params, adapters)),
                    rng=jax.random.key_data(train_key), lora=adapters,
                    ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
                    masks=None if pruning is None else pruning.init_masks(params),
                    guard=None if guard is None else guard_lib.init_state(guard),
                    fairness=None if fairness is None else fairness.init_state())


def optimized(params: dict, adapters: dict | None):
  """The tree the optimizer sees: the params, or {'params', 'lora'} with LoRA adapters."""
  return params if adapters is None else {'params': params, 'lora': adapters}


def state_specs(abstract_state: TrainState, template: ModelTemplate, mesh: Mesh,
                rules: Rules, lora=None) -> TrainState:
  """PartitionSpecs for every state leaf: parameters (and their EMA and optimizer
  moments) by their logical axes, everything else replicated."""
  param_axes, state_axes = template.logical_axes()
  param_specs = sharding.tree_specs(abstract_state.params, param_axes, mesh, rules)
  # LoRA: A keeps its kernel's row axes and B its column axes (rank dim replicated).
  lora_specs = None if abstract_state.lora is None else sharding.tree_specs(
      abstract_state.lora, lora.adapter_axes(param_axes, abstract_state.lora), mesh, rules)
  return TrainState(
      step=P(), rng=P(), params=param_specs,
      model_state=sharding.tree_specs(abstract_state.model_state, state_axes, mesh, rules),
      opt_state=sharding.match_by_path(abstract_state.opt_state,
                                       optimized(param_specs, lora_specs),
                                       optimized(abstract_state.params, abstract_state.lora)),
      lora=lora_specs,
      guard=None if abstract_state.guard is None else jax.tree.map(lambda _: P(),
                                                                   abstract_state.guard),
      fairness=jax.tree.map(lambda _: P(), abstract_state.fairness),
      ema_params=None if abstract_state.ema_params is None else param_specs,
      # Pruning masks: a kernel's mask lives with its kernel; scalar placeholders replicated.
      masks=None if abstract_state.masks is None else jax.tree.map(
          lambda spec, mask: spec if mask.ndim else P(), param_specs, abstract_state.masks,
          is_leaf=lambda x: isinstance(x, P)))


def create_sharded_state(template: ModelTemplate, tx: optax.GradientTransformation, seed: int,
                         mesh: Mesh, rules: Rules, use_ema: bool = False, pruning=None,
                         lora=None, guard=None, fairness=None) -> tuple[TrainState, TrainState]:
  """Returns the state, built on the devices in its final layout, and its shardings."""
  def init():
    return init_state(template, tx, seed, use_ema, pruning, lora, guard, fairness)
  abstract = jax.eval_shape(init)
  specs = state_specs(abstract, template, mesh, rules, lora)
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                           is_leaf=lambda x: isinstance(x, P))
  fraction = sharding.replicated_fraction(abstract.params, specs.params)
  logging.info('Parameters: %.1f%% of bytes replicated on every device (mesh %s)',
               100 * fraction, dict(mesh.shape))
  return jax.jit(init, out_shardings=shardings)(), shardings
