"""Training for the worst group: group-reweighted loss and Group DRO (Sagawa et al. 2020).

Both replace the mean of a batch's per-example losses (the task's `example_train_losses`)
inside the jitted step; group ids come from the task's `Groups` (tasks/fairness.py).

- 'reweight': example i weighs N / (G n_g(i)) (inverse training frequency of its group,
  normalised so that the weights average 1 over the training set); loss = mean_i w_i l_i.
- 'group_dro': online Group DRO (Sagawa et al. 2020, Algorithm 1, as in their code): per
  step, the batch's mean loss of each group l_g (a segment sum over the group ids, padding
  masked); q_g <- q_g exp(eta (l_g + C / sqrt(n_g))), normalised; loss = sum_g q_g l_g, q
  held fixed in the gradient. Groups absent from a batch have l_g = 0. q is train state
  (checkpointed, so a resumed run continues exactly). The paper's point: without strong L2
  or early stopping (on worst-group accuracy) an over-parameterised model reaches zero
  training loss in every group and Group DRO gains nothing over ERM.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from core.errors import KilnError

MITIGATIONS = ('none', 'reweight', 'group_dro')


def group_means(values: jax.Array, groups: jax.Array, weights: jax.Array, num_groups: int):
  """(mean of `values` per group [G], weight per group [G]); ids -1 count nowhere."""
  weights = weights.astype(values.dtype) * (groups >= 0)
  ids = jnp.maximum(groups, 0)
  sums = jax.ops.segment_sum(values * weights, ids, num_segments=num_groups)
  counts = jax.ops.segment_sum(weights, ids, num_segments=num_groups)
  return sums / jnp.maximum(counts, 1e-12) * (counts > 0), counts


def inverse_frequency_weights(train_counts: np.ndarray) -> np.ndarray:
  """w_g = N / (G n_g) over the groups with training examples (0 for the others)."""
  counts = np.asarray(train_counts, np.float64)
  present = counts > 0
  weights = np.zeros_like(counts)
  weights[present] = counts.sum() / (present.sum() * counts[present])
  return weights.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Mitigation:
  """One run's fairness objective; `of_batch` maps a batch to its [B] group ids."""
  method: str  # 'reweight' or 'group_dro'.
  names: tuple[str, ...]  # Group names (scalars are logged per group).
  of_batch: object  # Callable[[batch], jax.Array].
  train_counts: np.ndarray  # [G] training examples per group.
  step_size: float = 0.01  # Group DRO's eta.
  adjustment: float = 0.0  # Group DRO's C.

  @property
  def num_groups(self) -> int:
    return len(self.names)

  def init_state(self) -> dict | None:
    """The train state's 'fairness' entry: Group DRO's q, uniform at the start."""
    if self.method != 'group_dro':
      return None
    return {'group_weights': jnp.full((self.num_groups,), 1.0 / self.num_groups, jnp.float32)}

  def objective(self, per_example: jax.Array, batch: dict, state: dict | None):
    """(loss, new fairness state, scalars to log) for a batch's per-example losses."""
    groups = self.of_batch(batch)
    mask = batch.get('mask', jnp.ones(per_example.shape, jnp.float32)).astype(jnp.float32)
    if self.method == 'reweight':
      weights = jnp.asarray(inverse_frequency_weights(self.train_counts))[jnp.maximum(groups, 0)]
      weights = weights * mask * (groups >= 0)
      return jnp.sum(weights * per_example) / jnp.maximum(jnp.sum(mask), 1.0), state, {}
    losses, _ = group_means(per_example, groups, mask, self.num_groups)
    seen = jax.lax.stop_gradient(losses)
    if self.adjustment:
      seen = seen + self.adjustment / np.sqrt(np.maximum(self.train_counts, 1)).astype(np.float32)
    q = state['group_weights'] * jnp.exp(self.step_size * seen)
    q = q / jnp.sum(q)
    scalars = {f'group_weight_{i}': q[i] for i in range(self.num_groups)}
    return jnp.sum(q * losses), {'group_weights': q}, scalars


def from_config(config, groups) -> Mitigation | None:
  """None when config.fairness.mitigation is 'none'; `groups` is the task's Groups (or None
  when config.fairness.group is '')."""
  fairness = config.fairness
  if fairness.mitigation == 'none':
    return None
  if fairness.mitigation not in MITIGATIONS:
    raise KilnError(f'config.fairness.mitigation={fairness.mitigation!r}: choose one of '
                    f"{', '.join(MITIGATIONS)}")
  if groups is None:
    raise KilnError(f'config.fairness.mitigation={fairness.mitigation!r} needs groups: set '
                    "config.fairness.group (e.g. 'speaker' on FSDD)")
  refused = []
  if config.privacy.enabled:
    refused.append('config.privacy.enabled=False (DP-SGD clips per-example gradients of the '
                   'plain loss)')
  if config.distillation.teacher_workdir:
    refused.append("config.distillation.teacher_workdir=''")
  if fairness.mitigation == 'group_dro':
    if config.gradient.accumulation_steps > 1:
      refused.append('config.gradient.accumulation_steps=1 (q is updated once per batch)')
    if config.parallel.strategy != 'jit':
      refused.append("config.parallel.strategy='jit' (q must see the whole batch)")
  if refused:
    raise KilnError(f'config.fairness.mitigation={fairness.mitigation!r} does not combine with '
                    f'this run: set {refused[0]}')
  return Mitigation(method=fairness.mitigation, names=tuple(groups.names),
                    of_batch=groups.of_batch, train_counts=np.asarray(groups.train_counts),
                    step_size=fairness.dro_step_size, adjustment=fairness.dro_adjustment)
