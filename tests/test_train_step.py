"""The jitted train step: accumulation, BatchNorm across devices, penalties, clipping, EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core.paths import path_string
from loop.experiment import build_experiment
from optim import regularization
from tests.tiny import tiny_config
from tests.stepping import host_batches, run_steps


def _mlp_config():
  config = tiny_config()
  config.model = config.model.__class__({'name': 'mlp', 'hidden_features': (32, 16),
                                         'dropout_rate': 0.0})
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.1
  config.schedule.name = 'constant'
  config.schedule.warmup_steps = 0
  return config


def _by_path(tree) -> dict[str, np.ndarray]:
  return {path_string(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_trees_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_accumulating_four_micro_batches_equals_the_full_batch(devices):
  full_config, micro_config = _mlp_config(), _mlp_config()
  micro_config.gradient.accumulation_steps = 4
  _, full, full_out = run_steps(full_config, devices)
  _, micro, micro_out = run_steps(micro_config, devices)
  _assert_trees_close(full.params, micro.params, rtol=1e-5, atol=1e-6)
  for (full_metrics, full_scalars), (micro_metrics, micro_scalars) in zip(full_out, micro_out):
    assert micro_metrics['loss'] == pytest.approx(full_metrics['loss'], rel=1e-5)
    assert micro_scalars['grad_norm'] == pytest.approx(full_scalars['grad_norm'], rel=1e-5)


def test_batchnorm_statistics_are_global_and_identical_on_every_device(devices):
  config = tiny_config()
  config.model.dropout_rate = 0.0
  _, one_device, _ = run_steps(config, devices[:1], num_steps=1)
  _, eight_devices, _ = run_steps(config, devices, num_steps=1)
  for leaf in jax.tree.leaves(eight_devices.model_state):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(shards) == 8
    for shard in shards[1:]:
      np.testing.assert_array_equal(shard, shards[0])
  # Statistics over the global batch, as one device holding all of it computes them.
  _assert_trees_close(one_device.model_state, eight_devices.model_state, rtol=1e-4, atol=1e-6)
  _assert_trees_close(one_device.params, eight_devices.params, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_eval_uses_running_averages(devices):
  config = tiny_config()
  exp, state, _ = run_steps(config, devices, num_steps=2)
  running_mean = jax.tree.leaves(state.model_state)[0]
  assert np.abs(np.asarray(running_mean)).sum() > 0  # Training moved them away from init.
  model = exp.template.merge(state.params, state.model_state)
  images = next(exp.task.eval_batches(64))['image']
  whole = model(jnp.asarray(images), train=False)
  alone = jnp.concatenate([model(jnp.asarray(images[i:i + 1]), train=False) for i in range(8)])
  # Per-example eval outputs do not depend on the rest of the batch.
  np.testing.assert_allclose(np.asarray(whole[:8]), np.asarray(alone), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # Gradients of the whole default model, penalty on and off.
def test_penalty_gradients_follow_the_mask(devices):
  exp = build_experiment(tiny_config(), devices)
  state, _ = exp.create_state()
  params = jax.tree.map(lambda p: p + 0.1, state.params)  # Move scales/biases off 0 and 1.
  mask = regularization.included_mask(params, tiny_config().regularization.exclude)
  paths = _by_path(mask)
  assert paths['hidden/kernel'] and paths['stages/0/0/conv/kernel']
  assert not paths['hidden/bias'] and not paths['stages/0/0/norm/scale']
  l1, l2 = 0.003, 0.02
  grads = jax.grad(lambda p: regularization.penalty(p, mask, l1, l2))(params)
  for w, g, included in zip(jax.tree.leaves(params), jax.tree.leaves(grads), jax.tree.leaves(mask)):
    expected = l1 * np.sign(w) + 2 * l2 * np.asarray(w) if included else np.zeros_like(w)
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-6, atol=1e-7)


def test_penalty_enters_the_training_loss(devices):
  plain, penalized = _mlp_config(), _mlp_config()
  penalized.regularization.l2 = 0.5
  _, plain_state, _ = run_steps(plain, devices, num_steps=1)
  _, penalized_state, _ = run_steps(penalized, devices, num_steps=1)
  # SGD: the extra step is -lr * 2 * l2 * w on kernels; biases are excluded.
  init, _ = build_experiment(plain, devices).create_state()
  lr, l2 = plain.optimizer.learning_rate, penalized.regularization.l2
  plain_params, penalized_params = _by_path(plain_state.params), _by_path(penalized_state.params)
  for name, w0 in _by_path(init.params).items():
    expected = -lr * 2 * l2 * w0 if name.endswith('kernel') else np.zeros_like(w0)
    np.testing.assert_allclose(penalized_params[name] - plain_params[name], expected,
                               rtol=1e-4, atol=1e-6)


def test_global_norm_clipping_bounds_the_update(devices):
  config = _mlp_config()
  config.optimizer.sgd.momentum = 0.0
  config.gradient.clip_global_norm = 0.01
  _, _, outputs = run_steps(config, devices, num_steps=2)
  for _, scalars in outputs:
    assert scalars['grad_norm'] > 0.01  # Raw gradients are larger than the bound...
    assert scalars['update_norm'] == pytest.approx(0.1 * 0.01, rel=1e-4)  # ...updates are not.


def test_ema_tracks_parameters(devices):
  config = _mlp_config()
  config.ema.decay = 0.9
  exp = build_experiment(config, devices)
  state, shardings = exp.create_state()
  before = jax.device_get(state.params)
  train_step = exp.train_step(shardings)
  state, _, _ = train_step(state, exp.strategy.place(host_batches(exp, 1)[0]))
  expected = jax.tree.map(lambda b, a: 0.9 * b + 0.1 * np.asarray(a), before, state.params)
  _assert_trees_close(expected, state.ema_params, rtol=1e-6, atol=1e-7)
