"""Knowledge distillation: the loss arithmetic (Hinton, Vinyals & Dean 2015, "Distilling
the Knowledge in a Neural Network", arXiv:1503.02531).

The student is trained on

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * hard loss

per example (classifiers) or per token (language models), averaged over the positions the
task's own loss counts. Both softmaxes run at temperature T; the T^2 factor keeps the soft
term's gradient, T * (softmax(s/T) - softmax(t/T)) per position, on the scale of the hard
term's as T changes (Hinton et al., section 2). The teacher's logits are constants here:
nothing flows back into the teacher. Which forward passes produce the logits is the
task's business (tasks/*.distillation_outputs); running them is the loop's.
"""

import dataclasses

import jax
import jax.numpy as jnp
from clu import metrics

SOFT, HARD, TOTAL = 'distill_soft', 'distill_hard', 'distill_total'  # Train metric names.


def soft_term(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float
              ) -> jax.Array:
  """T^2 * KL(softmax(teacher/T) || softmax(student/T)) per position: logits [..., C] ->
  [...]. Exactly 0 where the student's logits equal the teacher's."""
  teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return temperature ** 2 * kl


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(w * v) / max(sum(w), 1): the same normalisation as the tasks' masked losses."""
  weights = weights.astype(values.dtype)
  return (values * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def objective(hard_loss: jax.Array, student_logits: jax.Array, teacher_logits: jax.Array,
              weights: jax.Array, alpha: float, temperature: float
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(alpha * soft + (1 - alpha) * hard, soft per position, soft): `hard_loss` is the task's
  own scalar loss, `weights` [...] says which positions count (1) and which are padding (0)."""
  per_position = soft_term(student_logits, teacher_logits, temperature)
  soft = weighted_mean(per_position, weights)
  return alpha * soft + (1.0 - alpha) * hard_loss, per_position, soft


_COLLECTIONS: dict[type, type] = {}


def _with_terms_class(base: type[metrics.Collection]) -> type[metrics.Collection]:
  """`base` plus the three distillation averages; one class per base, so that micro-batch
  scans and merges see the same pytree structure on every call."""
  if base not in _COLLECTIONS:
    fields = {f.name: f.type for f in dataclasses.fields(base) if f.name != '_reduction_counter'}
    fields.update({name: metrics.Average for name in (SOFT, HARD, TOTAL)})
    _COLLECTIONS[base] = metrics.Collection.create(**fields)
  return _COLLECTIONS[base]


def with_terms(task_metrics: metrics.Collection, soft_per_position: jax.Array,
               weights: jax.Array, hard_loss: jax.Array, total: jax.Array
               ) -> metrics.Collection:
  """The task's train metrics plus distill_soft (the T^2-scaled KL, averaged over the
  counted positions), distill_hard (the task's loss) and distill_total (what is trained)."""
  cls = _with_terms_class(type(task_metrics))
  kept = {f.name: getattr(task_metrics, f.name) for f in dataclasses.fields(task_metrics)}
  mask = jnp.broadcast_to(weights, soft_per_position.shape) > 0
  return cls(**kept, **{
      SOFT: metrics.Average.from_model_output(soft_per_position, mask=mask),
      HARD: metrics.Average.from_model_output(hard_loss),
      TOTAL: metrics.Average.from_model_output(total)})
