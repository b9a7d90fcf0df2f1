"""Fairness (issue 25): group gaps agree with fairlearn 0.15, Group DRO and reweighting do
what their definitions say, a bad group feature is one line, and Group DRO resumes exactly."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fairlearn import metrics as fl

from configs import speech_digits_groupdro
from core.errors import KilnError
from loop import fields
from loop.training import train_and_evaluate
from tasks import create_task
from tasks import fairness as group_metrics
from tasks.speech import metrics_collection
from trust.training import fairness

from tiny import tiny_config


def _collection(num_groups, num_classes):
  groups = group_metrics.Groups('speaker', tuple(f's{g}' for g in range(num_groups)),
                                lambda batch: batch['group'], np.ones(num_groups))
  return metrics_collection('Gaps', group_metrics.eval_fields(groups, num_classes))


@pytest.mark.parametrize('num_classes', [2, 5])
def test_gaps_agree_with_fairlearn(num_classes):
  rng = np.random.default_rng(num_classes)
  n, num_groups = 600, 4
  group = rng.integers(num_groups, size=n)
  label = rng.integers(num_classes, size=n)
  # Predictions that depend on the group, so that the gaps are far from 0.
  right = rng.random(n) < np.array([0.9, 0.7, 0.5, 0.8])[group]
  predicted = np.where(right, label, rng.integers(num_classes, size=n))
  mask = np.ones(n, np.float32)
  mask[-37:] = 0  # Padding: must count nowhere.
  group[5] = -1  # An example whose group is unknown counts in no group.
  collection = _collection(num_groups, num_classes)

  @jax.jit  # One compiled program instead of a hundred small eager ones.
  def gaps(group, label, predicted, mask):
    # Two batches merged, as eval merges them over batches and devices.
    halves = [collection.single_from_model_output(
        group=group[part], label=label[part], predicted=predicted[part], mask=mask[part])
        for part in (slice(0, 250), slice(250, n))]
    return halves[0].merge(halves[1]).compute()
  got = {k: float(v) for k, v in gaps(group, label, predicted, mask).items()}

  keep = (mask > 0) & (group >= 0)
  y, p, a = label[keep], predicted[keep], group[keep]
  per_class = [(fl.demographic_parity_difference((y == c), (p == c), sensitive_features=a),
                fl.equalized_odds_difference((y == c), (p == c), sensitive_features=a))
               for c in range(num_classes)]
  frame = fl.MetricFrame(metrics=lambda t, q: np.mean(t == q), y_true=y, y_pred=p,
                         sensitive_features=a)
  np.testing.assert_allclose(got['demographic_parity_difference'],
                             max(d for d, _ in per_class), atol=1e-6)
  np.testing.assert_allclose(got['equalized_odds_difference'],
                             max(e for _, e in per_class), atol=1e-6)
  np.testing.assert_allclose(got['worst_group_accuracy'], frame.group_min(), atol=1e-6)
  np.testing.assert_allclose(got['group_accuracy_gap'], frame.difference(), atol=1e-6)
  for g in range(num_groups):
    np.testing.assert_allclose(got[f'accuracy_speaker_s{g}'], frame.by_group[g], atol=1e-6)
  if num_classes == 2:  # Binary: fairlearn's own figure, no one-vs-rest needed.
    np.testing.assert_allclose(got['demographic_parity_difference'],
                               fl.demographic_parity_difference(y, p, sensitive_features=a),
                               atol=1e-6)
    np.testing.assert_allclose(got['equalized_odds_difference'],
                               fl.equalized_odds_difference(y, p, sensitive_features=a),
                               atol=1e-6)


def test_group_dro_weights_move_to_the_worst_group():
  """Three groups whose losses stay 0.2, 0.5 and 2.0: q concentrates on the third, and the
  loss is q's weighted mean of the groups' mean losses."""
  mitigation = fairness.Mitigation('group_dro', ('a', 'b', 'c'), lambda batch: batch['group'],
                                   np.array([10, 10, 10]), step_size=0.5)
  group = jnp.array([0, 0, 1, 1, 1, 2, -1, 2])
  per_example = jnp.array([0.1, 0.3, 0.5, 0.4, 0.6, 2.0, 99.0, 2.0])
  batch = {'group': group, 'mask': jnp.array([1, 1, 1, 1, 1, 1, 1, 0], jnp.float32)}
  state = mitigation.init_state()
  np.testing.assert_allclose(state['group_weights'], [1 / 3] * 3)
  objective = jax.jit(mitigation.objective)
  history = []
  for _ in range(20):
    loss, state, scalars = objective(per_example, batch, state)
    history.append(np.asarray(state['group_weights']))
  q = history[-1]
  assert q[2] > 0.99 and q[0] < q[1] < q[2]
  assert all(h[2] > g[2] for g, h in zip(history, history[1:]))  # Rises every step.
  np.testing.assert_allclose(float(loss), q @ np.array([0.2, 0.5, 2.0]), rtol=1e-5)
  np.testing.assert_allclose(float(scalars['group_weight_2']), q[2])
  # Gradients flow through the losses only (q fixed): d loss / d l_i = q_g / n_g.
  grad = jax.jit(jax.grad(lambda l: mitigation.objective(l, batch, state)[0]))(per_example)
  q_next = np.asarray(objective(per_example, batch, state)[1]['group_weights'])
  np.testing.assert_allclose(grad, [q_next[0] / 2] * 2 + [q_next[1] / 3] * 3 + [q_next[2], 0, 0],
                             rtol=1e-5)


def test_reweighting_matches_a_hand_computation():
  # Training counts 60 / 30 / 10: weights N / (G n_g) = 100/180, 100/90, 100/30.
  np.testing.assert_allclose(fairness.inverse_frequency_weights(np.array([60, 30, 10, 0])),
                             [100 / 180, 100 / 90, 100 / 30, 0.0], rtol=1e-6)
  mitigation = fairness.Mitigation('reweight', ('a', 'b', 'c'), lambda batch: batch['group'],
                                   np.array([60, 30, 10]))
  batch = {'group': jnp.array([0, 1, 2, 2]), 'mask': jnp.array([1, 1, 1, 0], jnp.float32)}
  loss, state, _ = mitigation.objective(jnp.array([1.0, 2.0, 3.0, 50.0]), batch, None)
  assert state is None
  np.testing.assert_allclose(float(loss), (100 / 180 * 1 + 100 / 90 * 2 + 100 / 30 * 3) / 3,
                             rtol=1e-6)


def test_bad_group_feature_and_combinations_give_one_line(tmp_path):
  c = tiny_config()
  c.fairness.group = 'speaker'
  with pytest.raises(KilnError, match=r"'speaker' is not a group feature of dataset 'digits': "
                     r'choose one of label') as error:
    train_and_evaluate(c, str(tmp_path / 'run'))
  assert '\n' not in str(error.value)
  assert not (tmp_path / 'run').exists()  # Nothing written.
  c.fairness.group = ''
  c.fairness.mitigation = 'group_dro'
  with pytest.raises(KilnError, match=r'needs groups: set config.fairness.group'):
    train_and_evaluate(c, str(tmp_path / 'run'))
  c.fairness.group = 'label'
  c.gradient.accumulation_steps = 2
  with pytest.raises(KilnError, match=r'set config.gradient.accumulation_steps=1'):
    train_and_evaluate(c, str(tmp_path / 'run'))
  c.fairness.mitigation = 'typo'
  with pytest.raises(KilnError, match=r'fairness.mitigation'):
    fields.validate(c)
  c = speech_digits_groupdro.get_config()
  c.dataset.subsample_speaker = 'nobody'  # Refused before any recording is read.
  with pytest.raises(KilnError, match=r"'nobody' is not an FSDD speaker: choose one of george"):
    train_and_evaluate(c, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def _tiny_groupdro():
  """The tiny digits CNN with Group DRO over its ten classes."""
  c = tiny_config()
  c.fairness.group = 'label'
  c.fairness.mitigation = 'group_dro'
  c.fairness.dro_step_size = 0.5  # Large: q moves visibly in a few steps.
  c.fairness.dro_adjustment = 1.0
  c.num_train_steps = 12
  c.log_every_steps = 6
  c.eval_every_steps = 12
  c.checkpoint_every_steps = 6
  return c


@pytest.mark.slow  # Three short training runs.
def test_group_dro_resume_equals_uninterrupted_run(tmp_path):
  c = _tiny_groupdro()
  whole = train_and_evaluate(c, str(tmp_path / 'whole'))
  train_and_evaluate(c, str(tmp_path / 'parts'), stop_at_step=6)
  parts = train_and_evaluate(c, str(tmp_path / 'parts'))
  q_whole = np.array(whole['fairness']['group_weights'])
  assert np.abs(q_whole - 0.1).max() > 0.01  # q moved.
  np.testing.assert_array_equal(np.array(parts['fairness']['group_weights']), q_whole)
  assert parts['final_eval'] == whole['final_eval']
  for name in (*group_metrics.GAPS, 'accuracy_label_0', 'accuracy_label_9'):
    assert name in whole['final_eval']
  saved = json.loads((tmp_path / 'whole' / 'summary.json').read_text())
  assert saved['fairness']['mitigation'] == 'group_dro'
  assert sum(saved['fairness']['train_examples']) == 1438  # The digits' 80% training part.


@pytest.mark.slow  # Reads and featurizes all 3,000 FSDD recordings.
def test_fsdd_groups_and_the_cut_speaker():
  c = speech_digits_groupdro.get_config()
  task = create_task(c)
  task.load_data(0, 1)
  groups = task.groups
  assert groups.names == ('george', 'jackson', 'lucas', 'nicolas', 'theo', 'yweweler')
  np.testing.assert_array_equal(groups.train_counts, [45, 450, 450, 450, 450, 450])
  assert task.source.eval.num_examples == 300  # The test split is never cut.
  for metric in ('worst_group_accuracy', 'equalized_odds_difference', 'accuracy_speaker_george'):
    assert metric in task.eval_metric_names
  c.fairness.group = 'accent'
  accents = task._load_groups()
  assert accents.names == ('BEL/French', 'DEU/German', 'GRC/Greek', 'USA/neutral')
  np.testing.assert_array_equal(accents.train_counts, [450, 900, 45, 900])
  batch = {'speaker': jnp.array([0, 4, -1]), 'frames': jnp.ones(3)}  # george, theo, unknown.
  np.testing.assert_array_equal(accents.of_batch(batch), [2, 3, -1])
  c.fairness.group = 'hair_colour'  # FSDD's groups come from speakers.json.
  with pytest.raises(KilnError, match=r"'hair_colour' is not a group feature of dataset 'fsdd': "
                     r'choose one of speaker, accent, gender, language'):
    task._load_groups()


def test_worst_group_wer_is_the_highest_group_rate():
  groups = group_metrics.Groups('accent', ('a', 'b', 'c'), None, np.ones(3))
  collection = metrics_collection('Wer', group_metrics.error_rate_fields(
      groups, 'wer', 'word_errors', 'words'))
  errors, words = np.array([1, 0, 3, 2, 5, 9]), np.array([4, 2, 5, 4, 5, 9])
  group, mask = np.array([0, 0, 1, 1, -1, 2]), np.array([1, 1, 1, 1, 1, 0])
  got = jax.jit(lambda *a: collection.single_from_model_output(
      word_errors=a[0], words=a[1], group=a[2], mask=a[3]).compute())(errors, words, group, mask)
  # Group c has only padding and the -1 row counts nowhere: rates a 1/6, b 5/9.
  np.testing.assert_allclose(float(got['worst_group_wer']), 5 / 9, rtol=1e-6)
  np.testing.assert_allclose(float(got['group_wer_gap']), 5 / 9 - 1 / 6, rtol=1e-6)


def _tfds_coarse_label_config():
  """The tiny CNN on TFDS cifar100 (mocked: no download), grouped by its 20 superclasses."""
  c = tiny_config()
  c.dataset.name = 'tfds:cifar100'
  c.fairness.group = 'coarse_label'
  return c


def test_a_tfds_class_feature_beside_the_label_groups_the_examples():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=40):
    task = create_task(_tfds_coarse_label_config())
    task.load_data(0, 1)
    train = list(task.source.train.examples.as_numpy_iterator())
  groups = task.groups
  assert groups.num_groups == len(groups.names) == 20  # cifar100's superclasses.
  coarse = np.array([example['coarse_label'] for example in train])
  np.testing.assert_array_equal(groups.train_counts, np.bincount(coarse, minlength=20))
  batch = {'coarse_label': jnp.asarray(coarse[:5]), 'label': jnp.zeros(5, jnp.int32)}
  np.testing.assert_array_equal(groups.of_batch(batch), coarse[:5])
  c = _tfds_coarse_label_config()
  c.fairness.group = 'superclass'
  with tfds.testing.mock_data(num_examples=40), pytest.raises(
      KilnError, match=r"group='superclass' is not a group feature .*choose one of label, "
                       r'coarse_label'):
    create_task(c).load_data(0, 1)


@pytest.mark.slow  # A short training run (mocked data).
def test_a_tfds_class_feature_gives_per_group_eval_metrics(tmp_path):
  import tensorflow_datasets as tfds
  c = _tfds_coarse_label_config()
  c.num_train_steps = 4
  c.eval_every_steps = 4
  c.checkpoint_every_steps = 4
  with tfds.testing.mock_data(num_examples=64):
    train_and_evaluate(c, str(tmp_path / 'run'))
  final = json.loads((tmp_path / 'run' / 'summary.json').read_text())['final_eval']
  per_group = [final[f'accuracy_coarse_label_{g}'] for g in range(20)]
  present = [a for a in per_group if a is not None and np.isfinite(a)]
  assert present and final['worst_group_accuracy'] == pytest.approx(min(present))
  assert 'demographic_parity_difference' in final and 'equalized_odds_difference' in final
