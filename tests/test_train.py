"""End-to-end behaviour of train_and_evaluate on real digits, 8 fake devices."""

import json
import os
import shutil
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import train
from core.errors import KilnError
from monitor import run_log
from tasks.classification import ImageClassification
from tests.checkpoints import latest_params
from tests.tiny import tiny_config


@pytest.fixture(scope='module')
def full_run(tmp_path_factory, devices):
  """One uninterrupted tiny run, shared by the tests below."""
  workdir = str(tmp_path_factory.mktemp('full'))
  summary = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, summary


def _scalars(workdir: str, tag: str) -> list[float]:
  return list(run_log.read_scalars(workdir)[tag][1])


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_loss_falls_and_model_learns(full_run):
  workdir, summary = full_run
  train_losses = _scalars(workdir, 'train_loss')
  assert len(train_losses) == 4  # log_every_steps=10 over 40 steps.
  assert train_losses[-1] < 0.5 * train_losses[0]
  eval_loss = _scalars(workdir, 'eval_loss')
  assert eval_loss[-1] < eval_loss[0]
  assert summary['final_eval']['accuracy'] > 0.8  # Chance is 0.1.
  learning_rates = _scalars(workdir, 'learning_rate')
  assert learning_rates[0] > learning_rates[-1] > 0  # Warmup over at step 5, then cosine decay.
  for tag in ('grad_norm', 'update_norm'):
    assert len(_scalars(workdir, tag)) == 4 and all(v > 0 for v in _scalars(workdir, tag))


@pytest.mark.slow  # Seconds of compiles: the fast tier stays under 3 minutes.
def test_summary_json_is_complete(full_run):
  workdir, summary = full_run
  with open(os.path.join(workdir, 'summary.json')) as f:
    on_disk = json.load(f)
  assert on_disk['steps'] == 40
  assert on_disk['num_devices'] == 8
  assert on_disk['examples_per_sec'] > 0 and on_disk['wall_time_s'] > 0
  assert set(on_disk['final_eval']) == {'accuracy', 'loss'}
  assert 'test' not in on_disk  # Bundled digits have no test split.
  assert on_disk['final_eval'] == pytest.approx(summary['final_eval'])
  assert not [f for f in os.listdir(workdir) if f.startswith('.tmp-')]
  for key in ('mfu', 'tflops_per_device', 'input_wait_fraction', 'peak_memory_bytes',
              'compile_time_s', 'step_time_s'):
    assert on_disk[key] is not None and on_disk[key] >= 0, key
  assert 0 < on_disk['mfu'] < 1 and on_disk['compile_time_s'] > 0
  assert on_disk['peak_memory_bytes'] > 1000 and on_disk['train_step_flops'] > 1e6


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_resumed_run_matches_uninterrupted(full_run, tmp_path):
  workdir, _ = full_run
  config = tiny_config()
  interrupted = str(tmp_path / 'resumed')
  first = train.train_and_evaluate(config, interrupted, stop_at_step=25)
  assert first['steps'] == 25
  second = train.train_and_evaluate(config, interrupted)
  assert second['steps'] == 40
  expected, got = latest_params(workdir), latest_params(interrupted)
  jax.tree.map(np.testing.assert_array_equal, expected, got)  # The CPU run is deterministic.
  assert second['final_eval'] == full_run[1]['final_eval']


def test_finished_run_is_not_retrained(full_run):
  workdir, summary = full_run
  again = train.train_and_evaluate(tiny_config(), workdir)
  assert again['steps'] == 40
  assert again['final_eval'] == pytest.approx(summary['final_eval'], rel=1e-6)


@pytest.mark.parametrize('change, expected', [
    (('model', 'dense_features', 16), 'params/classifier/kernel is (32, 10) there, (16, 10) here'),
    (('optimizer', 'name', 'sgd'), 'it has no opt_state/'),
])
@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_resuming_another_models_checkpoint_names_the_difference(full_run, tmp_path, change,
                                                                expected):
  workdir, _ = full_run
  shutil.copytree(os.path.join(workdir, 'checkpoints'), tmp_path / 'checkpoints')
  before = sorted(os.listdir(tmp_path / 'checkpoints'))
  config = tiny_config()
  section, key, value = change
  config[section][key] = value
  with pytest.raises(KilnError, match='was not written by this model and optimizer') as error:
    train.train_and_evaluate(config, str(tmp_path))
  assert expected in str(error.value) and 'pass a new --workdir' in str(error.value)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == before


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_early_stopping_stops_and_stays_stopped(tmp_path, devices):
  config = tiny_config()
  config.eval_every_steps = 5
  config.early_stopping.metric = 'loss'
  config.early_stopping.mode = 'max'  # Loss falls, so "max" never improves after the first eval.
  config.early_stopping.patience = 2
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['stopped_early'] and summary['steps'] == 15
  assert train.train_and_evaluate(config, str(tmp_path))['steps'] == 15


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_trains_from_tfds_under_mock_data(tmp_path, devices):
  config = tiny_config()
  config.dataset.name = 'tfds:mnist'
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 3
  with tfds.testing.mock_data(num_examples=40):
    summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['steps'] == 3
  assert 0.0 <= summary['final_eval']['accuracy'] <= 1.0 and summary['final_eval']['loss'] > 0


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_input_wait_is_measured(full_run, tmp_path, monkeypatch):
  _, prefetched = full_run
  assert prefetched['input_wait_fraction'] < 0.10

  original = ImageClassification.train_batches

  def slow_batches(self, host_batch_size, start_step):
    for batch in original(self, host_batch_size, start_step):
      time.sleep(0.1)  # A host pipeline far slower than the step.
      yield batch

  monkeypatch.setattr(ImageClassification, 'train_batches', slow_batches)
  config = tiny_config()
  config.num_train_steps = 25
  config.log_every_steps = 5
  slow = train.train_and_evaluate(config, str(tmp_path))
  assert slow['input_wait_fraction'] > 0.5


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_profiler_traces_the_requested_steps(tmp_path, devices):
  config = tiny_config()
  config.num_train_steps = 8
  config.profile.first_step = 2
  config.profile.num_steps = 3
  train.train_and_evaluate(config, str(tmp_path))
  traces = list((tmp_path / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
