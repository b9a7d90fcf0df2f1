"""Membership inference against a trained run: what an attacker who sees the model's outputs
learns about whether an example was in its training set (what an epsilon buys, measured).

Members are training examples, non-members held-out ones (the test split, else the eval
split), the same number of each, drawn uniformly from each split. Two shadow-free attacks
score every example and threshold the score: the loss attack (Yeom et al. 2018: members have
lower loss) and the logit-scaled confidence log(p / (1 - p)) of the true class, the statistic
of Carlini et al.'s LiRA (2022) without its shadow models (a global threshold, so it ranks as
a confidence attack does but keeps resolution where p is near 1). Reported per attack: ROC
AUC (0.5: nothing learned) and the true-positive rate at 1% false positives, the figure that
matters for a few examples.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import metrics as sk_metrics

from core.errors import KilnError
from core.io import write_json_atomic
from input_pipeline import batching
from loop import trained

AUDIT_JSON = 'audit.json'
ATTACKS = ('loss', 'logit_confidence')


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
  """The largest true-positive rate among thresholds whose false-positive rate is <= fpr."""
  fprs, tprs, _ = sk_metrics.roc_curve(labels, scores)
  return float(np.max(tprs[fprs <= fpr]))


def attack_report(member_scores: np.ndarray, non_member_scores: np.ndarray) -> dict:
  """AUC and TPR at 1% / 0.1% FPR of the attack 'member if score > threshold'."""
  labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(non_member_scores))])
  scores = np.concatenate([member_scores, non_member_scores])
  return {'auc': float(sk_metrics.roc_auc_score(labels, scores)),
          'tpr_at_1pct_fpr': tpr_at_fpr(labels, scores, 0.01),
          'tpr_at_0.1pct_fpr': tpr_at_fpr(labels, scores, 0.001)}


def example_scores(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Per example, each attack's membership score (higher: more likely a member)."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  log_p = -loss
  # log(p / (1 - p)) = log p - log(sum of the other classes' probabilities), stably.
  others = jax.nn.logsumexp(jnp.where(jax.nn.one_hot(labels, logits.shape[-1]) > 0, -jnp.inf,
                                      jax.nn.log_softmax(logits, -1)), axis=-1)
  return {'loss': -loss, 'logit_confidence': log_p - others}


def _split_scores(run: trained.Trained, split, batch_size: int, is_train: bool) -> dict:
  """Each attack's scores of every example of `split`, in its order, as the model answers
  them in eval mode."""
  serving = run.serving
  if 'logits' not in jax.eval_shape(lambda: serving.forward(
      run.model, {name: jnp.zeros((1, *shape), dtype)
                  for name, (shape, dtype) in serving.inputs.items()})):
    raise KilnError(f"task '{run.config.task}' has no per-example class logits to audit: "
                    'membership inference covers classification and speech_classification')
  model = trained.host_model(run.model)

  @jax.jit
  def scores_of(inputs, labels):
    return example_scores(serving.forward(model, inputs)['logits'], labels)

  out: dict[str, list] = {name: [] for name in ATTACKS}
  for batch in batching.eval_batches(split, batch_size):
    if 'label' not in batch:
      raise KilnError(f"task '{run.config.task}' batches carry no 'label': membership inference "
                      'needs one class per example')
    keep = batch['mask'] > 0
    # Train images are stored unnormalised ([0, 1] pixels, what serving takes); eval images
    # normalised, which inputs_from_batch undoes.
    inputs = ({'image': np.asarray(batch['image'], np.float32)}
              if is_train and 'image' in serving.inputs else serving.inputs_from_batch(batch))
    if 'image' in inputs and inputs['image'].shape[1:] != serving.inputs['image'][0]:
      raise KilnError(f"training images of shape {inputs['image'].shape[1:]} differ from the "
                      f"served {serving.inputs['image'][0]}: audit a run without image_size")
    scores = jax.device_get(scores_of(inputs,
                                      jnp.asarray(batch['label'], jnp.int32)))
    for name in ATTACKS:
      out[name].append(np.asarray(scores[name])[keep])
  return {name: np.concatenate(values) for name, values in out.items()}


def uniform_sample(scores: dict[str, np.ndarray], count: int,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
  """The same `count` examples, drawn uniformly without replacement, of each attack's scores.
  Not the first `count`: a split's order can follow its difficulty (MNIST's test files hold
  one writer population, then another), which an AUC reads as membership."""
  size = len(next(iter(scores.values())))
  picked = np.sort(rng.choice(size, count, replace=False))
  return {name: values[picked] for name, values in scores.items()}


def membership_inference(workdir: str, num_examples: int = 0, defaults=None,
                         batch_size: int = 500, sample_seed: int = 0) -> dict:
  """Audits `workdir`'s newest checkpoint; writes and returns `workdir`/audit.json.
  `num_examples`: members and non-members each (0: as many as the smaller side has), drawn
  uniformly from each split with `sample_seed`."""
  if num_examples < 0:
    raise KilnError(f'--num_examples={num_examples} must be >= 0 (0: all the smaller side has)')
  run = trained.load(workdir, defaults)
  source = run.exp.task.source
  held_out_name = 'test' if getattr(source, 'test', None) is not None else 'eval'
  held_out = getattr(source, held_out_name)
  available = min(source.train.num_examples, held_out.num_examples)
  count = min(num_examples or available, available)
  rng = np.random.default_rng(sample_seed)
  members = uniform_sample(_split_scores(run, source.train, batch_size, is_train=True), count,
                           rng)
  non_members = uniform_sample(_split_scores(run, held_out, batch_size, is_train=False), count,
                               rng)
  report = {'workdir': os.path.abspath(workdir), 'step': run.step, 'members': count,
            'non_members': count, 'non_member_split': held_out_name,
            'sample_seed': sample_seed,
            'attacks': {name: attack_report(members[name], non_members[name])
                        for name in ATTACKS},
            'mean_loss': {'members': float(-members['loss'].mean()),
                          'non_members': float(-non_members['loss'].mean())}}
  summary_path = os.path.join(workdir, 'summary.json')
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      report['privacy'] = json.load(f).get('privacy')  # None for a non-private run.
  write_json_atomic(os.path.join(workdir, AUDIT_JSON), report)
  return report


def summary_line(report: dict) -> str:
  parts = [f"{name}: AUC {r['auc']:.4f}, TPR@1%FPR {r['tpr_at_1pct_fpr']:.4f}"
           for name, r in report['attacks'].items()]
  privacy = report.get('privacy')
  budget = (f" (epsilon {privacy['epsilon']:.2f}, delta {privacy['delta']:g})" if privacy
            else ' (not private)')
  return (f"membership inference on {report['members']} train vs {report['non_members']} "
          f"{report['non_member_split']} examples{budget}: " + '; '.join(parts))
