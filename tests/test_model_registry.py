"""Adding a model is its module plus its registration: a model defined here, registered
from here, trains through the normal loop, and the FLOPs the run reports are its own count
(or, without one, XLA's, with a warning)."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from core import fields as F
from core.errors import KilnError
from loop import experiment, training
from models import MODELS, create_model, register_model
from monitor import flops, run_log
from tests.tiny import tiny_config


class UncountedToyMLP(nnx.Module):
  """One hidden layer over the flattened image, with no cost of its own: XLA counts it."""

  def __init__(self, *, num_classes: int, input_shape, hidden_features: int = 32,
               rngs: nnx.Rngs):
    inputs = 1
    for size in input_shape:
      inputs *= size
    self.hidden = nnx.Linear(inputs, hidden_features, rngs=rngs)
    self.classifier = nnx.Linear(hidden_features, num_classes, rngs=rngs)

  def __call__(self, images, *, train: bool = False, rngs=None):
    x = jax.nn.relu(self.hidden(images.reshape(images.shape[0], -1)))
    return self.classifier(x).astype(jnp.float32)


class ToyMLP(UncountedToyMLP):
  """The same model reporting its own cost and declaring what its config keys may hold."""

  CONFIG_FIELDS = {'hidden_features': F.POSITIVE_INT}

  def forward_flops(self, input_shape) -> float:
    return 2.0 * (self.hidden.in_features * self.hidden.out_features
                  + self.classifier.in_features * self.classifier.out_features)


@pytest.fixture
def registered():
  """Registers the toy models for one test and removes them after it."""
  names = {'toy_mlp': ToyMLP, 'uncounted_toy_mlp': UncountedToyMLP}
  for name, cls in names.items():
    register_model(name, cls)
  yield names
  for name in names:
    MODELS.pop(name)


def _toy_config(name: str):
  c = tiny_config()
  c.model = ml_collections.ConfigDict({'name': name, 'hidden_features': 32})
  return c


def _run(name: str, workdir: str):
  summary = training.train_and_evaluate(_toy_config(name), workdir)
  scalars = run_log.read_scalars(workdir)
  return summary, {tag: list(scalars[tag][1]) for tag in
                   ('train_loss', 'tflops_per_device', 'step_time_s')}


def _assert_logged_tflops_come_from(step_flops: float, summary, logged) -> None:
  assert summary['train_step_flops'] == pytest.approx(step_flops, rel=1e-12)
  assert logged['tflops_per_device']
  for tflops, seconds in zip(logged['tflops_per_device'], logged['step_time_s']):
    assert tflops * 1e12 * seconds * summary['num_devices'] == pytest.approx(step_flops, rel=1e-6)


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_registered_toy_trains_and_reports_its_own_flops(registered, tmp_path, devices):
  summary, logged = _run('toy_mlp', str(tmp_path))
  assert logged['train_loss'][-1] < 0.7 * logged['train_loss'][0]  # 2.1 -> 1.0 here.
  assert summary['final_eval']['accuracy'] > 0.5  # Chance is 0.1.
  per_example = 2.0 * (64 * 32 + 32 * 10)  # The toy's own count on 8x8 digits, 10 classes.
  _assert_logged_tflops_come_from(3 * per_example * tiny_config().batch_size, summary, logged)
  assert summary['mfu'] is not None and summary['mfu'] > 0


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_a_model_without_a_counter_trains_on_xla_flops_with_a_warning(
    registered, tmp_path, devices, monkeypatch):
  warnings = []
  monkeypatch.setattr(flops.logging, 'warning', lambda *args: warnings.append(args[0] % args[1:]))
  monkeypatch.setattr(flops, '_WARNED', set())
  summary, logged = _run('uncounted_toy_mlp', str(tmp_path))
  assert logged['train_loss'][-1] < 0.7 * logged['train_loss'][0]  # 2.1 -> 1.0 here.
  model = create_model(_toy_config('uncounted_toy_mlp').model, nnx.Rngs(0), num_classes=10,
                       input_shape=(8, 8, 1))
  xla = flops.xla_forward_flops(model, (8, 8, 1))
  # XLA also counts the bias adds and the ReLU: near the toy's own count, above it.
  assert 1.0 < xla / (2.0 * (64 * 32 + 32 * 10)) < 1.05
  _assert_logged_tflops_come_from(3 * xla * tiny_config().batch_size, summary, logged)
  assert [w for w in warnings if 'has no forward_flops' in w] == [
      "UncountedToyMLP has no forward_flops(input_shape): its FLOPs (and MFU) come from XLA's "
      'cost analysis, which also counts elementwise work']


def test_a_taken_name_is_one_line_error(registered):
  with pytest.raises(KilnError, match="'toy_mlp' is already registered to ToyMLP"):
    register_model('toy_mlp', UncountedToyMLP)
  with pytest.raises(KilnError, match="'cnn' is already registered"):
    register_model('cnn', ToyMLP)


def test_a_registered_model_s_own_constraints_are_checked_before_the_run(registered):
  config = _toy_config('toy_mlp')
  config.model.hidden_features = 0
  with pytest.raises(KilnError, match=r'config\.model\.hidden_features=0') as error:
    experiment.build_experiment(config)
  assert '\n' not in str(error.value)
