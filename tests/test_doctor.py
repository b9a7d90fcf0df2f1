"""The doctor's bug zoo: small broken setups, each of which must be named by the right finding,
and the healthy tiny config, which must get none (errors or warnings)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from flax import nnx

from doctor import run
from doctor.data_checks import take_examples
from doctor.findings import problems
from input_pipeline import batching
from loop import experiment
from loop.state import ModelTemplate
from tests.tiny import REPO, tiny_bert_classify_config, tiny_bert_config, tiny_config


def _options(checks: str, **changes) -> run.Options:
  return dataclasses.replace(run.Options(), checks=tuple(checks.split(',')), **changes)


def _replace_split(exp, which: str, transform) -> None:
  """Plants a data bug: `which` split's examples (as arrays) rewritten by `transform`."""
  source = exp.task.source
  split = getattr(source, which)
  examples = take_examples(batching.eval_batches(split, 256), 10 ** 6)
  examples.pop('mask')
  examples = transform(examples)
  count = len(examples['label'])
  new_split = dataclasses.replace(split, examples=tf.data.Dataset.from_tensor_slices(examples),
                                  num_examples=count, max_examples_per_host=count)
  exp.task.source = dataclasses.replace(source, **{which: new_split})


def _wrap_model(exp, wrap) -> None:
  """Plants a model bug: the template builds `wrap(model)` instead of the model."""
  build = exp.template.build_model
  exp.template = ModelTemplate(lambda rngs: wrap(build(rngs)))


class _StopGradient(nnx.Module):
  """A layer frozen by mistake: its output is detached from its parameters."""

  def __init__(self, inner):
    self.inner = inner

  def __call__(self, *args, **kwargs):
    return jax.lax.stop_gradient(self.inner(*args, **kwargs))


class _IgnoresInput(nnx.Module):
  """Logits that ignore the input: the model is fed zeros in place of the images."""

  def __init__(self, inner):
    self.inner = inner

  def __call__(self, images, **kwargs):
    return self.inner(jnp.zeros_like(images), **kwargs)


def _freeze_first_conv(model):
  model.stages[0][0].conv = _StopGradient(model.stages[0][0].conv)
  return model


def _diagnose(exp, tmp_path, checks: str, **changes):
  report = run.diagnose_experiment(exp, str(tmp_path), _options(checks, **changes))
  return {f.check for f in problems(report['findings'])}, report


def _shuffle_labels(examples):
  examples['label'] = np.random.default_rng(0).permutation(examples['label'])
  return examples


def _unnormalise(examples):
  examples['image'] = examples['image'] * 255.0  # Raw pixel values, never scaled.
  return examples


@pytest.mark.parametrize('bug, split, transform, expected', [
    ('labels shuffled', 'train', _shuffle_labels, 'labels_unrelated'),
    ('inputs unnormalised', 'train', _unnormalise, 'unnormalized_inputs'),
])
def test_data_bugs_are_named(bug, split, transform, expected, tmp_path, devices):
  exp = experiment.build_experiment(tiny_config())
  _replace_split(exp, split, transform)
  found, _ = _diagnose(exp, tmp_path, 'data')
  assert found == {expected}, bug


def test_train_eval_leakage_is_named(tmp_path, devices):
  exp = experiment.build_experiment(tiny_config())
  train = take_examples(batching.eval_batches(exp.task.source.train, 256), 100)
  train.pop('mask')

  def leak(examples):  # 100 training digits copied into the held-out split.
    return {k: np.concatenate([train[k], v]) for k, v in examples.items()}
  _replace_split(exp, 'eval', leak)
  found, report = _diagnose(exp, tmp_path, 'data')
  assert found == {'leakage'}
  leakage = next(f for f in report['findings'] if f.check == 'leakage')
  assert leakage.data['shared'] >= 100 and 'deduplicate' in leakage.fix


@pytest.mark.slow  # Compiles and trains the model a few hundred steps.
def test_learning_rate_100x_too_high_is_named(tmp_path, devices):
  config = tiny_config()
  config.optimizer.learning_rate *= 100
  found, report = _diagnose(experiment.build_experiment(config), tmp_path, 'lr_range',
                            lr_range_steps=60)
  assert found == {'learning_rate'}
  finding = next(f for f in report['findings'] if f.check == 'learning_rate')
  assert finding.data['configured'] / finding.data['suggested'] > 10
  assert '--config.optimizer.learning_rate=' in finding.fix
  assert os.path.exists(tmp_path / 'doctor_lr_range.png')


@pytest.mark.slow  # Compiles and trains the model.
@pytest.mark.parametrize('bug, wrap, expected', [
    ('a frozen layer', _freeze_first_conv, 'frozen_layer'),
    ('logits that ignore the input', _IgnoresInput, 'input_ignored'),
])
def test_model_bugs_are_named(bug, wrap, expected, tmp_path, devices):
  exp = experiment.build_experiment(tiny_config())
  _wrap_model(exp, wrap)
  found, report = _diagnose(exp, tmp_path, 'overfit', overfit_steps=25)
  assert expected in found, (bug, found)
  if expected == 'frozen_layer':
    frozen = next(f for f in report['findings'] if f.check == 'frozen_layer')
    assert frozen.data['layers'] == ['stages/0/0/conv/inner']
  else:  # It cannot memorise a batch either (and its first conv, fed zeros, gets no gradient).
    assert {'input_ignored', 'overfit_failed'} <= found <= {'input_ignored', 'overfit_failed',
                                                            'frozen_layer'}


class _Silenced(nnx.Module):
  """A layer whose output is lost (multiplied by zero) though its weights are not zero."""

  def __init__(self, inner):
    self.inner = inner

  def __call__(self, *args, **kwargs):
    return 0.0 * self.inner(*args, **kwargs)


def _tiny_resnet_config():
  config = tiny_config()
  config.model = config.model.__class__({'name': 'resnet18', 'stem': 'cifar', 'width': 4,
                                         'stage_sizes': (1, 1), 'zero_init_last_bn': True})
  return config


def test_zero_initialised_residual_norms_are_not_vanishing_or_dead(tmp_path, devices):
  """Each block's last BatchNorm starts at scale 0 (the block is the identity): its exactly-zero
  output is reported as zero-initialised, not as a vanishing or dead layer."""
  found, report = _diagnose(experiment.build_experiment(_tiny_resnet_config()), tmp_path, 'init')
  assert not {'activation_scale', 'dead_units'} & found, found
  zero = next(f for f in report['findings'] if f.check == 'zero_initialised')
  assert zero.severity == 'info' and zero.data['layers'] == ['blocks/0/norms/1', 'blocks/1/norms/1']


@pytest.mark.slow  # The control of the test above: a second model compiled.
def test_a_silenced_layer_with_nonzero_weights_still_vanishes(tmp_path, devices):
  exp = experiment.build_experiment(tiny_config())

  def silence_first_conv(model):
    model.stages[0][0].conv = _Silenced(model.stages[0][0].conv)
    return model
  _wrap_model(exp, silence_first_conv)
  found, report = _diagnose(exp, tmp_path, 'init')
  assert 'activation_scale' in found
  scale = next(f for f in report['findings'] if f.check == 'activation_scale')
  assert 'stages/0/0/conv rms 0' in scale.message
  assert not any(f.check == 'zero_initialised' for f in report['findings'])


@pytest.mark.slow  # Compiles a BERT and trains it.
def test_bert_classifier_scored_on_its_class_logits_and_its_unused_mlm_head_is_not_frozen(
    tmp_path, devices):
  """The classifying BERT's prediction is model.classify, not its __call__ (the masked-LM
  head, which this task never reads): the uniform loss is ln 4 for 4 speakers, and the MLM
  head's zero gradient is reported as unused, not as a frozen layer."""
  found, report = _diagnose(experiment.build_experiment(tiny_bert_classify_config()), tmp_path,
                            'init,overfit', overfit_steps=15)
  assert report['initial']['uniform_loss'] == pytest.approx(np.log(4), rel=1e-5)
  assert not {'frozen_layer', 'input_ignored', 'initial_loss'} & found, found
  unused = next(f for f in report['findings'] if f.check == 'unused_layers')
  assert unused.data['layers'] == ['mlm_bias', 'mlm_dense', 'mlm_norm']


@pytest.mark.slow  # Compiles a BERT and trains it.
def test_masked_lm_memorises_one_batch_with_its_corruption_drawn_once(tmp_path, devices):
  """A masked LM draws which tokens to corrupt at every step: the overfit check holds that
  draw (and dropout's) fixed, so that one batch is one problem to memorise."""
  config = tiny_bert_config()
  config.dataset.seq_len = 32
  config.dataset.window_stride = 32
  config.batch_size = 16
  found, report = _diagnose(experiment.build_experiment(config), tmp_path, 'overfit',
                            overfit_steps=150)
  assert 'overfit_one_batch' in {f.check for f in report['findings']}, found


@pytest.mark.slow  # Compiles DP-SGD's per-example step and trains it.
def test_overfit_check_trains_dp_sgd_on_its_padded_poisson_batch(tmp_path, devices):
  """Under DP-SGD the doctor's batch is the run's own: a Poisson sample padded to a fixed shape
  with its mask (the DP step reads it), and the clipped, noised step still memorises it."""
  config = tiny_config()
  config.model.norm = 'group'  # BatchNorm is refused under DP.
  config.model.norm_groups = 4
  config.model.dropout_rate = 0.0
  config.privacy.enabled = True
  config.batch_size = 64  # Noise std / batch near configs/mnist_dp.py's (sigma ~1, 512 rows).
  config.num_train_steps = 1000  # The schedule's decay stays far beyond the check's steps.
  config.privacy.noise_multiplier = 0.15
  config.optimizer.name = 'sgd'  # configs/mnist_dp.py's recipe for clipped, noised gradients.
  config.optimizer.learning_rate = 0.25
  config.optimizer.sgd.momentum = 0.9
  found, report = _diagnose(experiment.build_experiment(config), tmp_path, 'init,overfit',
                            overfit_steps=100)
  assert 'overfit_one_batch' in {f.check for f in report['findings']}, report['overfit']
  assert not found, found


@pytest.mark.slow  # Every group of checks: trains, sweeps rates, compiles for several batches.
def test_healthy_config_gets_no_false_alarms(tmp_path, devices):
  config = tiny_config()
  config.auto_batch.max_batch_size = 32  # Legal batches from 8: three compiles.
  config.auto_batch.limit_gb = 0.5
  report = run.diagnose_experiment(experiment.build_experiment(config), str(tmp_path),
                                   _options(','.join(run.GROUPS), lr_range_steps=60))
  assert [f.line() for f in problems(report['findings'])] == []
  checks = {f.check for f in report['findings']}
  assert {'overfit_one_batch', 'learning_rate_range', 'largest_batch'} <= checks
  assert report['initial']['uniform_loss'] == pytest.approx(np.log(10), rel=1e-5)
  largest = next(f for f in report['findings'] if f.check == 'largest_batch')
  assert largest.data['batch_size'] == 32  # Tiny: the search limit binds, not memory.
  with open(tmp_path / 'doctor.json') as f:
    on_disk = json.load(f)
  assert on_disk['problems'] == 0 and len(on_disk['findings']) == len(report['findings'])
  assert len(on_disk['overfit']['losses']) >= 10 and os.path.exists(tmp_path / 'doctor_lr_range.png')


@pytest.mark.slow  # A subprocess.
def test_doctor_py_prints_one_line_per_finding_and_exits_0_when_healthy(tmp_path):
  proc = subprocess.run([sys.executable, 'doctor.py', '--config=configs/default.py',
                         f'--workdir={tmp_path}', '--config.doctor.checks=data,init'],
                        cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1].startswith('0 problem(s) in ')
  assert os.path.exists(tmp_path / 'doctor.json')


@pytest.mark.slow  # A subprocess.
def test_doctor_py_rejects_unknown_check_groups(tmp_path):
  proc = subprocess.run([sys.executable, 'doctor.py', '--config=configs/default.py',
                         f'--workdir={tmp_path}', '--config.doctor.checks=data,vibes'],
                        cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith('error: config.doctor.checks names vibes')
