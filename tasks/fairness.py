"""Fairness across groups at eval: per-group accuracy and the gaps between groups.

`config.fairness.group` names a feature that puts every example in a group (FSDD's
speaker, accent or gender; a classifier's label). Eval then adds, beside the task's own
metrics, `<rate>_<feature>_<group>` per group and four gaps, all computed from one
confusion tensor per eval pass, counts[g, y, p] = examples of group g with label y
predicted p (a sum over examples, so it merges exactly across batches, devices and hosts):

- `worst_group_accuracy` and `group_accuracy_gap` (best minus worst group);
- `demographic_parity_difference` and `equalized_odds_difference` with fairlearn's
  definitions (fairlearn.metrics, method 'between_groups', agg 'worst_case'). fairlearn's
  are for a binary prediction; for C classes Kiln takes each class one-vs-rest (y = c,
  prediction = c) and reports the worst class: max over c of fairlearn's figure for that
  class. With two classes both classes give fairlearn's figure itself. As in fairlearn,
  groups with no eval examples are not groups, and a rate whose denominator is empty
  (no positives, or no negatives, of that class in a group) counts as 0.

Groups with an unknown feature (id -1) and padding (mask 0) count nowhere.
"""

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics
from flax import struct
from jax.experimental import multihost_utils

from core.errors import KilnError

GAPS = ('worst_group_accuracy', 'group_accuracy_gap', 'demographic_parity_difference',
        'equalized_odds_difference')


@dataclasses.dataclass(frozen=True)
class Groups:
  """Which group each example belongs to, as the task's data defines it."""
  feature: str  # config.fairness.group.
  names: tuple[str, ...]  # Group g's name.
  of_batch: Callable[[dict], jax.Array]  # batch -> [B] int32 group ids; -1 where unknown.
  train_counts: np.ndarray  # [G] training examples per group over all hosts.

  @property
  def num_groups(self) -> int:
    return len(self.names)


def slug(name: str) -> str:
  """A group name as a metric-name part ('USA/neutral' -> 'USA_neutral')."""
  return re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')


def lookup(table, ids: jax.Array) -> jax.Array:
  """table[ids] with -1 kept for unknown ids (-1): speaker -> accent group, for one."""
  table = jnp.asarray(np.asarray(table, np.int32))
  return jnp.where(ids >= 0, table[jnp.maximum(ids, 0)], -1)


def check_feature(feature: str, available, where: str) -> None:
  """The one-line error for a group feature the data does not have."""
  if feature not in available:
    raise KilnError(f"config.fairness.group={feature!r} is not a group feature of {where}: "
                    f"choose one of {', '.join(available) or '(none)'}, or '' to turn it off")


def whole_split_feature(split, key: str) -> np.ndarray:
  """Feature `key` of every example of a source split (this host's share of it), in one
  array: what the groups' training sizes are counted from."""
  values = split.examples.map(lambda ex: ex[key]).batch(max(split.num_examples, 1))
  return np.concatenate(list(values.as_numpy_iterator()))


def train_counts(split, groups_of_examples: np.ndarray, num_groups: int) -> np.ndarray:
  """Examples of each group in the whole of `split`, from the groups of this host's examples
  (-1: none): a split each host reads a share of (not `sliced`) adds every host's counts."""
  ids = np.asarray(groups_of_examples)
  counts = np.bincount(ids[ids >= 0], minlength=num_groups).astype(np.int64)
  if not split.sliced and split.process_count > 1:
    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
  return counts


# ------------------------------------------------------------------ the statistics

def _present_range(values: jax.Array, present: jax.Array) -> jax.Array:
  """max - min of values [G, ...] over groups that have eval examples (axis 0)."""
  high = jnp.max(jnp.where(present[:, None], values, -jnp.inf), 0)
  low = jnp.min(jnp.where(present[:, None], values, jnp.inf), 0)
  return jnp.where(jnp.any(present), high - low, jnp.nan)


def _ratio(numerator, denominator):
  return jnp.where(denominator > 0, numerator / jnp.maximum(denominator, 1e-12), 0.0)


def group_accuracies(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(accuracy per group [G], group has eval examples [G]) from counts [G, C, C]."""
  per_group = counts.sum((1, 2))
  correct = jnp.trace(counts, axis1=1, axis2=2)
  return _ratio(correct, per_group), per_group > 0


def worst_group_accuracy(counts):
  accuracy, present = group_accuracies(counts)
  return jnp.where(jnp.any(present), jnp.min(jnp.where(present, accuracy, jnp.inf)), jnp.nan)


def group_accuracy_gap(counts):
  accuracy, present = group_accuracies(counts)
  return _present_range(accuracy[:, None], present)[0]


def demographic_parity_difference(counts):
  """max over classes c of (max - min over groups of P(prediction = c | group))."""
  per_group = counts.sum((1, 2))
  selection = _ratio(counts.sum(1), per_group[:, None])  # [G, C]
  return jnp.max(_present_range(selection, per_group > 0))


def equalized_odds_difference(counts):
  """max over classes c of max(TPR range, FPR range) over groups, one-vs-rest on c."""
  per_group = counts.sum((1, 2))
  hits = jnp.diagonal(counts, axis1=1, axis2=2)  # [G, C]: label c predicted c.
  positives = counts.sum(2)  # [G, C]: label c.
  predicted = counts.sum(1)  # [G, C]: predicted c.
  tpr = _ratio(hits, positives)
  fpr = _ratio(predicted - hits, per_group[:, None] - positives)
  present = per_group > 0
  return jnp.max(jnp.maximum(_present_range(tpr, present), _present_range(fpr, present)))


_STATISTICS = {'worst_group_accuracy': worst_group_accuracy,
               'group_accuracy_gap': group_accuracy_gap,
               'demographic_parity_difference': demographic_parity_difference,
               'equalized_odds_difference': equalized_odds_difference}


# ------------------------------------------------------------------ CLU metrics

@struct.dataclass
class GroupConfusion(metrics.Metric):
  """counts[g, y, p] over the eval examples; `compute` is one statistic of it. Subclasses
  (made by `confusion_metric`) fix the shape and the statistic."""
  counts: jax.Array
  num_groups = 0
  num_classes = 0

  @classmethod
  def statistic(cls, counts):
    raise NotImplementedError

  @classmethod
  def empty(cls):
    return cls(jnp.zeros((cls.num_groups, cls.num_classes, cls.num_classes), jnp.float32))

  @classmethod
  def from_model_output(cls, *, group, label, predicted, mask=None, **_):
    return cls(confusion(group, label, predicted, cls.num_groups, cls.num_classes, mask))

  def merge(self, other):
    return type(self)(self.counts + other.counts)

  def compute(self):
    return type(self).statistic(self.counts)


def confusion(group, label, predicted, num_groups: int, num_classes: int, mask=None):
  """counts [G, C, C] of one batch: a segment sum over the flattened (g, y, p) index."""
  weight = jnp.ones(group.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  weight = weight * (group >= 0)
  index = (jnp.maximum(group, 0) * num_classes + label) * num_classes + predicted
  flat = jax.ops.segment_sum(weight, index.astype(jnp.int32),
                             num_segments=num_groups * num_classes * num_classes)
  return flat.reshape(num_groups, num_classes, num_classes)


def confusion_metric(statistic: Callable, num_groups: int, num_classes: int):
  return struct.dataclass(type(statistic.__name__, (GroupConfusion,), {
      'num_groups': num_groups, 'num_classes': num_classes,
      'statistic': classmethod(lambda cls, counts: statistic(counts))}))


def group_accuracy_metric(index: int, num_groups: int, num_classes: int):
  """One group's accuracy, from the same counts."""
  return confusion_metric(lambda counts: group_accuracies(counts)[0][index], num_groups,
                          num_classes)


def eval_fields(groups: Groups, num_classes: int, rate: str = 'accuracy',
                existing=()) -> dict[str, type[metrics.Metric]]:
  """Metric fields a task adds to its eval collection: per-group accuracy (unless the task
  already reports it under the same name) and the gaps. The task passes `group`, `label`
  and `predicted` ([B] int arrays) to single_from_model_output."""
  fields = {}
  for g, name in enumerate(groups.names):
    field = f'{rate}_{groups.feature}_{slug(name)}'
    if field not in existing:
      fields[field] = group_accuracy_metric(g, groups.num_groups, num_classes)
  for name in GAPS:
    fields[name] = confusion_metric(_STATISTICS[name], groups.num_groups, num_classes)
  return fields


def with_fields(collection: type[metrics.Collection], fields: dict) -> type[metrics.Collection]:
  """`collection` plus `fields`, as a new CLU collection class."""
  annotations = {**collection.__annotations__, **fields}
  return struct.dataclass(type(collection.__name__, (metrics.Collection,),
                               {'__annotations__': annotations}))


# ------------------------------------------------------------------ error rates (WER)

@struct.dataclass
class GroupRate(metrics.Metric):
  """Per group sum(numerator) / sum(denominator) (e.g. word errors / words); `compute` is
  the worst group's rate (the highest error) or the gap between the worst and best."""
  numerator: jax.Array  # [G]
  denominator: jax.Array  # [G]
  num_groups = 0
  numerator_name = ''
  denominator_name = ''
  gap = False  # False: worst group's rate; True: worst minus best.

  @classmethod
  def empty(cls):
    return cls(jnp.zeros((cls.num_groups,), jnp.float32), jnp.zeros((cls.num_groups,),
                                                                    jnp.float32))

  @classmethod
  def from_model_output(cls, *, group, mask=None, **outputs):
    weight = jnp.ones(group.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    weight = weight * (group >= 0)
    ids = jnp.maximum(group, 0)

    def per_group(values):
      return jax.ops.segment_sum(values.astype(jnp.float32) * weight, ids,
                                 num_segments=cls.num_groups)
    return cls(per_group(outputs[cls.numerator_name]), per_group(outputs[cls.denominator_name]))

  def merge(self, other):
    return type(self)(self.numerator + other.numerator, self.denominator + other.denominator)

  def compute(self):
    present = self.denominator > 0
    rates = _ratio(self.numerator, self.denominator)
    worst = jnp.max(jnp.where(present, rates, -jnp.inf))
    value = worst - jnp.min(jnp.where(present, rates, jnp.inf)) if self.gap else worst
    return jnp.where(jnp.any(present), value, jnp.nan)


def error_rate_fields(groups: Groups, rate: str, numerator: str, denominator: str
                      ) -> dict[str, type[metrics.Metric]]:
  """`worst_group_<rate>` and `group_<rate>_gap` for an error rate (WER) per group."""
  def field(gap):
    return struct.dataclass(type(f'GroupRate_{rate}', (GroupRate,), {
        'num_groups': groups.num_groups, 'numerator_name': numerator,
        'denominator_name': denominator, 'gap': gap}))
  return {f'worst_group_{rate}': field(False), f'group_{rate}_gap': field(True)}


def gap_names(task_class, config) -> tuple[str, ...]:
  """The gap metrics `task_class` adds under config.fairness.group (none when it is '')."""
  fairness = config.get('fairness', None)
  if fairness is None or not fairness.get('group', ''):
    return ()
  return tuple(getattr(task_class, 'fairness_gaps', ()))
