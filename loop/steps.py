"""The jitted train and eval steps: pure functions of (state, batch)."""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from compress import pruning as pruning_lib
from core.errors import KilnError
from loop import guard as guard_lib
from loop.state import ModelTemplate, TrainState, optimized
from optim import regularization
from parallel import mesh as mesh_lib
from tasks.base import Task
from trust.training import adversarial
from trust.training import fairness as fairness_lib
from trust.training import privacy as privacy_lib


_ATTACK_STREAM = 0x61747461  # Folded into keys: attacks never reuse dropout's bits.


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What the train step needs from the config besides the task and optimizer."""
  l1: float = 0.0
  l2: float = 0.0
  exclude: str = ''  # Regex of parameter paths exempt from the L1/L2 penalty.
  accumulation_steps: int = 1
  ema_decay: float = 0.0
  pruning: pruning_lib.Pruning | None = None  # Set by build_experiment when pruning is on.
  privacy: privacy_lib.Privacy | None = None  # DP-SGD, set by build_experiment when it is on.
  train_attack: adversarial.Attack | None = None  # Adversarial training's attack, when on.
  guard: guard_lib.GuardOptions = guard_lib.GuardOptions()  # config.guard (loop/guard.py).
  fairness: fairness_lib.Mitigation | None = None  # Reweighting or Group DRO, when on.

  @classmethod
  def from_config(cls, config) -> 'StepOptions':
    if config.gradient.accumulation_steps < 1:
      raise KilnError(f'config.gradient.accumulation_steps={config.gradient.accumulation_steps} '
                      'must be >= 1')
    if not 0.0 <= config.ema.decay < 1.0:
      raise KilnError(f'config.ema.decay={config.ema.decay} must lie in [0, 1) (0 disables)')
    return cls(l1=config.regularization.l1, l2=config.regularization.l2,
               exclude=config.regularization.exclude,
               accumulation_steps=config.gradient.accumulation_steps, ema_decay=config.ema.decay,
               guard=guard_lib.GuardOptions.from_config(config))


def split_micro_batches(batch, k: int, mesh: Mesh | None):
  """[B, ...] -> [k, B/k, ...], micro-batch j = rows j, j+k, ...: every device keeps its
  own rows, so splitting moves no data between devices."""
  spec = None if mesh is None else NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES))

  def split(x):
    micro = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return micro if spec is None else jax.lax.with_sharding_constraint(micro, spec)
  return jax.tree.map(split, batch)


# What one optimizer step writes; the guard keeps all of them as they were on a bad step.
UPDATED_FIELDS = ('params', 'model_state', 'opt_state', 'ema_params', 'masks', 'lora', 'fairness')


def _micro_batch_unroll(count: int) -> int:
  """How many micro-batches each iteration of the accumulation loop runs: all of them when
  there are two (XLA:CPU's while loop around a small step cost 7%: GPT CPU config in 2
  micro-batches 32.1 -> 29.9 ms, compile unchanged), else one (baby GPT in 8: 1,513 vs
  1,505 ms unrolled, noise, for a 6 s -> 20 s compile)."""
  return count if count <= 2 else 1


def train_step_fn(task: Task, template: ModelTemplate, tx: optax.GradientTransformation,
                  options: StepOptions, mesh: Mesh | None = None, axis_name: str | None = None,
                  teacher=None, lora=None):
  """`(state, batch) -> (state, task metrics, optimizer scalars)` as a function to compile.

  Under jit, `mesh` is the global mesh and XLA inserts the collectives. Under pmap,
  `axis_name` names the mapped device axis and gradients/metrics are reduced over it.
  `teacher` (a loop.teacher.Teacher, whose values ride in `state.teacher`) turns the task's
  loss into the distillation objective. `lora` (a compress.lora.LoRA, adapters in
  `state.lora`): the model runs with W + (alpha/r) A B, and the optimizer updates only the
  adapters and the base leaves it leaves trainable.
  """
  k = options.accumulation_steps
  pruning, guard = options.pruning, options.guard
  privacy = options.privacy
  fairness = options.fairness
  penalized = bool(options.l1 or options.l2)

  def penalty(params):
    mask = regularization.included_mask(params, options.exclude)
    return regularization.penalty(params, mask, options.l1, options.l2)

  # --- adversarial training: the step trains on the worst inputs in the ball around each
  # example, found against the current parameters in eval mode (no gradient reaches them) ---
  def attacked(params, model_state, batch, key, step):
    if lora is not None:
      params = lora.apply(params['params'], params['lora'])
    model = template.merge(jax.lax.stop_gradient(params), model_state)
    attack = options.train_attack
    return attack_batch(task, model, batch, key, attack, attack.scale(step))
  # --- end adversarial training ---

  def loss_and_grads(params, model_state, batch, key, step, teacher_values=None,
                     with_penalty=True, fairness_state=None):
    """(loss, (task metrics, model state, (fairness state, fairness scalars))), grads.
    `step`: the optimizer step, which sets the adversarial ramp's radius."""
    if options.train_attack is not None:
      batch = attacked(params, model_state, batch, jax.random.fold_in(key, _ATTACK_STREAM), step)

    def loss_fn(params):
      if lora is not None:  # LoRA: `params` is {'params', 'lora'}; the model sees W + s A B.
        params = lora.apply(params['params'], params['lora'])
      model = template.merge(params, model_state)
      rngs = nnx.Rngs(dropout=key)  # Made inside the trace that may advance it.
      fairness_out = (fairness_state, {})
      if teacher is None and fairness is not None:  # The groups' objective over the examples.
        per_example, batch_metrics = task.example_train_losses(model, batch, rngs)
        loss, *fairness_out = fairness.objective(per_example, batch, fairness_state)
      elif teacher is None:
        loss, batch_metrics = task.loss(model, batch, rngs)
      else:  # Distillation: the teacher's eval forward runs here, in the same step.
        loss, batch_metrics = teacher.loss(task, model, batch, rngs, teacher_values)
      if penalized and with_penalty:
        loss = loss + penalty(params)
      return loss, (batch_metrics, template.split(model)[1], tuple(fairness_out))
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  # --- DP-SGD: per-example gradients (vmap over rows), each clipped, summed over the sample;
  # padding rows (mask 0) add nothing. The data-independent penalty joins after the noise. ---
  def clipped_sum(params, model_state, batch, key, step, teacher_values):
    def one_example(example, example_key):
      (loss, (example_metrics, example_state, _)), grads = loss_and_grads(
          params, model_state, jax.tree.map(lambda x: x[None], example), example_key, step,
          teacher_values, with_penalty=False)
      return grads, loss, example_metrics, example_state
    mask = batch['mask']
    grads, losses, stacked_metrics, states = jax.vmap(one_example)(
        batch, jax.random.split(key, mask.shape[0]))
    return privacy_lib.PrivateGrads(
        *privacy.clipped_sum(grads, mask), loss_sum=jnp.sum(losses * mask),
        metrics=privacy_lib.masked_metrics(stacked_metrics, mask),
        model_state=privacy_lib.masked_mean(states, mask))
  # --- end DP-SGD ---

  def train_step(state: TrainState, batch):
    if guard.on and state.guard is None:
      raise KilnError(f'config.guard.policy={guard.policy!r} but the train state has no guard '
                      'window: build it with init_state(..., guard=options.guard)')
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    noise_key = step_key  # DP-SGD's noise: the same on every device, whatever the strategy.
    if axis_name is not None:  # Each device draws its own dropout masks.
      step_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))
    # --- pruning: masks from the params as they are when the step starts (so that a run
    # started from another's checkpoint prunes the loaded weights), only at update steps ---
    params, masks = state.params, state.masks
    if pruning is not None:
      masks = pruning.update_masks(state.step, params, masks)
      params = pruning.apply(params, masks)
    # --- end pruning ---
    # --- LoRA: gradients (and updates) over the tree the optimizer sees ---
    params = optimized(params, state.lora)
    # --- end LoRA ---
    dp_scalars, fairness_state, fairness_scalars = {}, state.fairness, {}
    if privacy is not None:  # DP-SGD: clipped sums over the (micro-)batches, noised once.
      if k == 1:
        private = clipped_sum(params, state.model_state, batch, step_key, state.step,
                              state.teacher)
      else:
        def private_micro_step(carry, micro):
          index, micro_batch = micro
          private = clipped_sum(params, carry.model_state, micro_batch,
                                jax.random.fold_in(step_key, index), state.step, state.teacher)
          return carry.add(private), private.metrics
        zeros = privacy_lib.PrivateGrads.zeros(params, state.model_state)
        private, stacked_metrics = jax.lax.scan(
            private_micro_step, zeros, (jnp.arange(k), split_micro_batches(batch, k, mesh)))
        private = private.replace(metrics=stacked_metrics.reduce())
      if axis_name is not None:  # Every device's rows summed, then noised once.
        private = private.psum(axis_name)
      grads = privacy.noised_mean(private.grad_sum, noise_key)
      if penalized:
        grads = jax.tree.map(jnp.add, grads, jax.grad(penalty)(params))
      batch_metrics, model_state = private.metrics, private.model_state
      loss = private.loss_sum / jnp.maximum(private.sampled, 1.0)
      dp_scalars = private.scalars()
    elif k == 1:
      (loss, (batch_metrics, model_state, (fairness_state, fairness_scalars))), grads = (
          loss_and_grads(params, state.model_state, batch, step_key, state.step, state.teacher,
                         fairness_state=state.fairness))
    else:
      def micro_step(carry, micro):
        grads_sum, model_state = carry
        index, micro_batch = micro
        # Group DRO refuses micro-batches (trust/training/fairness.py): no state to carry.
        (micro_loss, (micro_metrics, model_state, _)), grads = loss_and_grads(
            params, model_state, micro_batch, jax.random.fold_in(step_key, index), state.step,
            state.teacher)
        return (jax.tree.map(jnp.add, grads_sum, grads), model_state), (micro_metrics,
                                                                        micro_loss)

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads_sum, model_state), (stacked_metrics, micro_losses) = jax.lax.scan(
          micro_step, (zeros, state.model_state),
          (jnp.arange(k), split_micro_batches(batch, k, mesh)), unroll=_micro_batch_unroll(k))
      # Equal-sized micro-batches: the mean of their mean losses is the full-batch mean.
      grads = jax.tree.map(lambda g: g / k, grads_sum)
      batch_metrics = stacked_metrics.reduce()
      loss = jnp.mean(micro_losses)
    if axis_name is not None:
      if privacy is None:  # DP-SGD summed over devices above.
        grads = jax.lax.pmean(grads, axis_name)
      batch_metrics = sum_over_devices(batch_metrics, axis_name)
      loss = jax.lax.pmean(loss, axis_name)  # Every replica must take the same decision.

    if pruning is not None:  # Optimizer moments of pruned weights see no gradient.
      grads = pruning.apply(grads, masks)

    def apply_update(grads, model_state, fairness_state):
      updates, opt_state = tx.update(grads, state.opt_state, params)
      if guard.on:  # Rollbacks may have cut the rate: scaling Adam's update scales its rate.
        updates = jax.tree.map(lambda u: u * state.guard['lr_scale'].astype(u.dtype), updates)
      new_params = optax.apply_updates(params, updates)
      lora_values = state.lora
      if lora is not None:  # LoRA: back to the base params and the adapters.
        new_params, lora_values = new_params['params'], new_params['lora']
      ema_params = state.ema_params
      if ema_params is not None:
        ema_params = regularization.ema_update(ema_params, new_params, options.ema_decay)
      if pruning is not None:  # Momentum and weight decay may move them: pruned stays zero.
        new_params = pruning.apply(new_params, masks)
        ema_params = None if ema_params is None else pruning.apply(ema_params, masks)
      return (dict(params=new_params, model_state=model_state, opt_state=opt_state,
                   ema_params=ema_params, masks=masks, lora=lora_values,
                   fairness=fairness_state), optax.global_norm(updates))

    optimizer_scalars = {'grad_norm': optax.global_norm(grads), **dp_scalars,
                         **fairness_scalars}
    if guard.on:
      # --- guard: a non-finite or spiking step keeps the state it started from. A cond, not
      # a select over the new and old trees: a select reads the old optimizer moments after
      # the update wrote them, so XLA copies every one of them on every step ---
      ok, guard_state, guard_scalars = guard_lib.check(guard, state.guard, loss,
                                                      optimizer_scalars['grad_norm'])

      def keep(grads, model_state, fairness_state):
        del grads, model_state, fairness_state
        return ({f: getattr(state, f) for f in UPDATED_FIELDS},
                jnp.zeros((), optimizer_scalars['grad_norm'].dtype))

      fields, update_norm = jax.lax.cond(ok, apply_update, keep, grads, model_state,
                                         fairness_state)
      new_state = state.replace(step=state.step + 1, guard=guard_state, **fields)
      optimizer_scalars.update(guard_scalars)
      # --- end guard ---
    else:
      fields, update_norm = apply_update(grads, model_state, fairness_state)
      new_state = state.replace(step=state.step + 1, **fields)
    optimizer_scalars['update_norm'] = update_norm
    params = new_state.params
    if pruning is not None:
      optimizer_scalars.update(pruning.scalars(params))
    return new_state, batch_metrics, optimizer_scalars

  return train_step


def attack_batch(task: Task, model, batch, key, attack: adversarial.Attack, scale=1.0):
  """`batch` with its inputs replaced by `attack`'s worst ones against `model` (`scale`: the
  fraction of its radius in force, adversarial.Attack.scale)."""
  pixels = adversarial.perturb(
      lambda p: task.example_losses(model, task.with_pixels(batch, p)),
      task.attack_pixels(batch), key, attack, scale)
  return task.with_pixels(batch, pixels)


def eval_step_fn(task: Task, template: ModelTemplate, use_ema: bool = False,
                 axis_name: str | None = None, lora=None,
                 attack: adversarial.Attack | None = None):
  """`attack`: the metrics on attacked inputs join the clean ones as robust_<metric>."""
  def eval_step(state: TrainState, batch):
    params = state.ema_params if use_ema and state.ema_params is not None else state.params
    if lora is not None:  # LoRA: the base with its adapters, W + (alpha/r) A B.
      params = lora.apply(params, state.lora, freeze=False)
    model = template.merge(params, state.model_state)
    batch_metrics = task.evaluate(model, batch)
    if attack is not None:  # Robustness: the same metrics on the worst inputs nearby.
      key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), _ATTACK_STREAM)
      if axis_name is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
      batch_metrics = adversarial.with_robust(
          batch_metrics, task.evaluate(model, attack_batch(task, model, batch, key, attack)))
    return batch_metrics if axis_name is None else sum_over_devices(batch_metrics, axis_name)
  return eval_step


def sum_over_devices(batch_metrics, axis_name: str):
  """Task metrics are sums (CLU Average keeps total and count), so psum merges them."""
  return jax.tree.map(lambda x: jax.lax.psum(x, axis_name), batch_metrics)
