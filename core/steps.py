"""The jitted train and eval steps: pure functions of (state, batch)."""

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from core.state import ModelTemplate, TrainState
from parallel import mesh as mesh_lib
from tasks.base import Task


def make_train_step(task: Task, template: ModelTemplate, tx: optax.GradientTransformation,
                    mesh: Mesh, shardings: TrainState):
  def train_step(state: TrainState, batch):
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      model = template.merge(params, state.model_state)
      rngs = nnx.Rngs(dropout=step_key)  # Made inside the trace that may advance it.
      loss, batch_metrics = task.loss(model, batch, rngs)
      return loss, (batch_metrics, template.split(model)[1])

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (batch_metrics, model_state)), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              model_state=model_state, opt_state=opt_state)
    return new_state, batch_metrics

  return jax.jit(train_step, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)


def make_eval_step(task: Task, template: ModelTemplate, mesh: Mesh, shardings: TrainState):
  def eval_step(state: TrainState, batch):
    return task.evaluate(template.merge(state.params, state.model_state), batch)

  return jax.jit(eval_step, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))
