"""Membership inference (trust/audit.py, audit.py): the attack statistics and a whole audit."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from loop.training import train_and_evaluate
from tests.tiny import REPO, tiny_config
from trust import audit


def test_auc_and_tpr_at_low_fpr_of_known_score_distributions():
  rng = np.random.default_rng(0)
  same = audit.attack_report(rng.normal(size=20_000), rng.normal(size=20_000))
  assert same['auc'] == pytest.approx(0.5, abs=0.01)
  assert same['tpr_at_1pct_fpr'] == pytest.approx(0.01, abs=0.005)
  shifted = audit.attack_report(rng.normal(1.0, 1.0, 20_000), rng.normal(0.0, 1.0, 20_000))
  # Two unit Gaussians one apart: AUC = Phi(1 / sqrt 2); TPR at 1% FPR = 1 - Phi(z_0.99 - 1).
  assert shifted['auc'] == pytest.approx(stats.norm.cdf(1 / np.sqrt(2)), abs=0.01)
  assert shifted['tpr_at_1pct_fpr'] == pytest.approx(stats.norm.sf(stats.norm.isf(0.01) - 1),
                                                     abs=0.01)
  apart = audit.attack_report(np.full(100, 5.0), np.zeros(100))
  assert apart['auc'] == 1.0 and apart['tpr_at_1pct_fpr'] == 1.0


def test_scores_are_the_negative_loss_and_the_logit_scaled_confidence():
  logits = jnp.asarray([[2.0, 0.5, -1.0], [0.0, 30.0, 0.0], [1.0, 1.0, 1.0]])
  labels = jnp.asarray([0, 1, 2])
  scores = audit.example_scores(logits, labels)
  p = np.exp(np.float64(logits)) / np.exp(np.float64(logits)).sum(1, keepdims=True)
  p_true = p[np.arange(3), np.asarray(labels)]
  np.testing.assert_allclose(np.asarray(scores['loss']), np.log(p_true), rtol=1e-5, atol=1e-6)
  # log(p / (1 - p)), finite even where p rounds to 1 in float32 (the second row).
  np.testing.assert_allclose(np.asarray(scores['logit_confidence']),
                             np.log(p_true) - np.log1p(-p_true), rtol=1e-4)


@pytest.mark.slow  # Trains a tiny run, then audits it in-process and through the entry point.
def test_audit_of_a_trained_run_writes_its_figures(tmp_path):
  config = tiny_config()
  config.num_train_steps = 60
  train_and_evaluate(config, str(tmp_path))
  report = audit.membership_inference(str(tmp_path))
  # Digits: 1,438 training and 359 held-out examples; the smaller side sets the count.
  assert report['members'] == report['non_members'] == 359
  assert report['non_member_split'] == 'eval' and report['privacy'] is None
  assert report['mean_loss']['members'] < report['mean_loss']['non_members']
  for figures in report['attacks'].values():
    assert 0.45 < figures['auc'] < 1.0 and 0.0 <= figures['tpr_at_1pct_fpr'] <= 1.0
  assert json.loads((tmp_path / audit.AUDIT_JSON).read_text()) == report
  missing = subprocess.run([sys.executable, 'audit.py', f'--workdir={tmp_path / "none"}'],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0
  assert missing.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'holds no' in missing.stderr.strip().splitlines()[-1]


def test_the_sample_spans_the_whole_split_and_pairs_the_attacks():
  # A split ordered by its scores (as MNIST's test files are by writer population): its first
  # half alone would read as 'members' against the other half; a uniform sample does not.
  ordered = np.linspace(-1.0, 1.0, 8_000)
  scores = {'loss': ordered, 'logit_confidence': 10 * ordered}
  sample = audit.uniform_sample(scores, 2_000, np.random.default_rng(0))
  np.testing.assert_array_equal(sample['logit_confidence'], 10 * sample['loss'])
  assert len(np.unique(sample['loss'])) == 2_000
  other = audit.uniform_sample(scores, 2_000, np.random.default_rng(1))
  assert audit.attack_report(sample['loss'], other['loss'])['auc'] == pytest.approx(0.5, abs=0.03)
  assert audit.attack_report(ordered[:2_000], ordered[-2_000:])['auc'] == 0.0
