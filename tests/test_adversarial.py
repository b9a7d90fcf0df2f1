"""Attacks (trust/training/adversarial.py) and their wiring into the eval and train steps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core.errors import KilnError
from loop import fields
from loop.experiment import build_experiment
from tests.stepping import host_batches
from tests.tiny import tiny_config
from trust.training import adversarial


def _linear_problem(seed=0, n=64, d=20):
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(size=(d, 2)), jnp.float32)
  x = jnp.asarray(rng.uniform(0.3, 0.7, size=(n, d)), jnp.float32)  # Far from the box edges.
  labels = jnp.asarray(rng.integers(0, 2, size=n))

  def losses(inputs):
    return optax.softmax_cross_entropy_with_integer_labels(inputs @ w, labels)
  return w, x, labels, losses


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_attacks_stay_in_the_ball_and_the_box_and_raise_the_loss(norm):
  _, x, _, losses = _linear_problem()
  eps = 0.25 if norm == 'linf' else 1.0
  attack = adversarial.Attack(norm, eps, step_size=eps / 4, steps=10, restarts=2)
  adv = adversarial.perturb(losses, x, jax.random.key(0), attack)
  delta = np.asarray(adv - x)
  if norm == 'linf':
    assert np.abs(delta).max() <= eps + 1e-6
  else:
    assert np.linalg.norm(delta, axis=1).max() <= eps + 1e-5
  assert np.asarray(adv).min() >= 0 and np.asarray(adv).max() <= 1
  assert np.all(np.asarray(losses(adv)) >= np.asarray(losses(x)) - 1e-6)


def test_pgd_finds_the_closed_form_worst_case_of_a_linear_model():
  """Two classes, logits x W: the loss grows with the margin (W[:, wrong] - W[:, right]) . x,
  so the L-inf worst case is eps * sign of that direction (inside the box here), and the L2
  one eps times its unit vector."""
  w, x, labels, losses = _linear_problem()
  direction = (w[:, 1] - w[:, 0])[None, :] * jnp.where(labels == 0, 1.0, -1.0)[:, None]
  for norm, eps, best in (
      ('linf', 0.05, x + 0.05 * jnp.sign(direction)),
      ('l2', 0.2, x + 0.2 * direction / jnp.linalg.norm(direction, axis=1, keepdims=True))):
    attack = adversarial.Attack(norm, eps, step_size=eps / 5, steps=30, restarts=1,
                                random_start=True)
    found = losses(adversarial.perturb(losses, x, jax.random.key(1), attack))
    np.testing.assert_allclose(np.asarray(found), np.asarray(losses(best)), rtol=1e-4, atol=1e-5)
    # FGSM (one step of eps from the input) is exact for L-inf here, too.
  fgsm = adversarial.Attack('linf', 0.05, step_size=0.05, steps=1, random_start=False)
  np.testing.assert_allclose(np.asarray(losses(adversarial.perturb(losses, x, jax.random.key(2),
                                                                    fgsm))),
                             np.asarray(losses(x + 0.05 * jnp.sign(direction))), rtol=1e-5)


def test_more_restarts_never_find_weaker_inputs():
  """Restart i draws the same start whatever the count, and each example keeps its worst
  restart: the loss after 5 restarts is never below the loss after 1 or 2."""
  rng = np.random.default_rng(3)
  w1 = jnp.asarray(rng.normal(size=(20, 16)), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  x = jnp.asarray(rng.uniform(0, 1, size=(32, 20)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, size=32))

  def losses(inputs):
    return optax.softmax_cross_entropy_with_integer_labels(jnp.tanh(inputs @ w1) @ w2, labels)

  def loss_after(restarts):
    attack = adversarial.Attack('linf', 0.1, 0.02, steps=5, restarts=restarts)
    return np.asarray(losses(adversarial.perturb(losses, x, jax.random.key(0), attack)))
  one, two, five = loss_after(1), loss_after(2), loss_after(5)
  assert np.all(two >= one - 1e-6) and np.all(five >= two - 1e-6)
  assert np.any(five > one + 1e-4)  # The extra restarts found something.


def test_n_fgsm_steps_past_the_ball_from_its_wider_noise_and_stays_in_the_box():
  """N-FGSM (de Jorge et al. 2022): a start uniform within 2 epsilon, one signed step of
  epsilon, no projection. On a linear model the gradient's sign s is the same everywhere, so
  each pixel moves by noise + epsilon s: up to 3 epsilon, never against s by more than epsilon,
  and past epsilon for many pixels (FGSM-RS from the same key stays within epsilon)."""
  w, x, labels, losses = _linear_problem()
  eps = 0.1
  s = np.sign(np.asarray((w[:, 1] - w[:, 0])[None, :] * jnp.where(labels == 0, 1.0, -1.0)[:, None]))
  n_fgsm = adversarial.Attack('linf', eps, step_size=eps, steps=1, noise=2.0, project=False)
  delta = np.asarray(adversarial.perturb(losses, x, jax.random.key(0), n_fgsm) - x)
  assert np.abs(delta).max() <= 3 * eps + 1e-6
  assert np.mean(np.abs(delta) > eps + 1e-6) > 0.3  # Uniform noise: about half of the pixels.
  assert np.min(delta * s) >= -eps - 1e-6
  fgsm_rs = adversarial.Attack('linf', eps, step_size=1.25 * eps, steps=1)
  assert np.abs(np.asarray(adversarial.perturb(losses, x, jax.random.key(0), fgsm_rs) - x)).max(
      ) <= eps + 1e-6
  # Near the box's edges the pixels are clipped to [0, 1], not to the ball.
  edge = jnp.asarray(np.random.default_rng(1).choice([0.0, 0.05, 0.95, 1.0], size=x.shape),
                     jnp.float32)
  adv = np.asarray(adversarial.perturb(losses, edge, jax.random.key(0), n_fgsm))
  assert adv.min() >= 0 and adv.max() <= 1


def test_the_ramp_grows_the_radius_linearly_then_holds_it():
  attack = adversarial.Attack('linf', 0.3, 0.3, steps=1, warmup_steps=4)
  scales = [float(attack.scale(jnp.asarray(step))) for step in range(6)]
  np.testing.assert_allclose(scales, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
  assert float(dataclasses.replace(attack, warmup_steps=0).scale(jnp.asarray(0))) == 1.0
  # A scale of 0.5 halves the radius, the step and the noise: N-FGSM then reaches 1.5 epsilon.
  _, x, _, losses = _linear_problem()
  n_fgsm = adversarial.Attack('linf', 0.1, 0.1, steps=1, noise=2.0, project=False)
  full = np.asarray(adversarial.perturb(losses, x, jax.random.key(0), n_fgsm) - x)
  half = np.asarray(adversarial.perturb(losses, x, jax.random.key(0), n_fgsm, scale=0.5) - x)
  np.testing.assert_allclose(half, full / 2, atol=1e-6)  # x is far from the box's edges.


def test_training_attacks_from_the_config_and_bad_settings():
  config = tiny_config()
  config.adversarial.epsilon = 0.3
  config.adversarial.train = 'n_fgsm'
  attack = adversarial.train_attack(config)
  assert (attack.step_size, attack.steps, attack.noise, attack.project) == (0.3, 1, 2.0, False)
  config.adversarial.train = 'fgsm_rs'
  attack = adversarial.train_attack(config)
  assert (attack.step_size, attack.noise, attack.project) == (0.375, 1.0, True)
  config.adversarial.train_noise = -1.0
  with pytest.raises(KilnError, match='train_noise'):
    fields.validate(config)
  config.adversarial.train_noise, config.adversarial.epsilon_warmup_steps = 2.0, -5
  with pytest.raises(KilnError, match='epsilon_warmup_steps'):
    fields.validate(config)


@pytest.mark.slow  # Compiles four train steps.
def test_the_train_step_trains_on_n_fgsm_inputs_and_ramps_them(devices):
  """One step from the same state and batch: N-FGSM and FGSM-RS update differently, and at
  the start of a long ramp N-FGSM's update is (nearly) the clean one."""
  def params_after_one_step(train, warmup_steps=0):
    config = _mlp_config()
    config.adversarial.train = train
    config.adversarial.epsilon_warmup_steps = warmup_steps
    config.schedule.warmup_steps = 0  # The learning rate's warmup would make step 0 a no-op.
    config.optimizer.name = 'sgd'  # Steps in proportion to the gradient; Adam's first is its sign.
    exp = build_experiment(config, devices)
    state, shardings = exp.create_state()
    state, _, _ = exp.train_step(shardings)(state, exp.strategy.place(host_batches(exp, 1)[0]))
    return np.concatenate([np.ravel(p) for p in jax.tree.leaves(jax.device_get(state.params))])

  clean, n_fgsm = params_after_one_step('none'), params_after_one_step('n_fgsm')
  fgsm_rs = params_after_one_step('fgsm_rs')
  ramped = params_after_one_step('n_fgsm', warmup_steps=10**6)
  gap = np.abs(n_fgsm - clean).max()
  assert np.abs(n_fgsm - fgsm_rs).max() > 0.1 * gap > 0
  assert np.abs(ramped - clean).max() < 1e-3 * gap


def _mlp_config():
  config = tiny_config()
  config.model = config.model.__class__({'name': 'mlp', 'hidden_features': (32,),
                                         'dropout_rate': 0.0})
  config.adversarial.epsilon = 0.2
  config.adversarial.eval_steps = 5
  config.adversarial.eval_step_size = 0.05
  return config


@pytest.mark.slow  # Compiles a train step with FGSM-RS and an eval step with PGD.
def test_eval_reports_robust_metrics_and_training_on_attacks_runs(devices):
  config = _mlp_config()
  config.adversarial.eval = True
  config.adversarial.train = 'fgsm_rs'
  exp = build_experiment(config, devices)
  state, shardings = exp.create_state()
  train_step, eval_step = exp.train_step(shardings), exp.eval_step(shardings)
  for batch in host_batches(exp, 5):
    state, batch_metrics, _ = train_step(state, exp.strategy.place(batch))
  assert np.isfinite(float(batch_metrics.compute()['loss']))
  metrics = {k: float(v) for k, v in exp.evaluate(eval_step, state).compute().items()}
  assert set(metrics) == {'loss', 'accuracy', 'robust_loss', 'robust_accuracy'}
  assert metrics['robust_accuracy'] < metrics['accuracy']
  assert metrics['robust_loss'] > metrics['loss']


def test_a_task_without_an_input_to_attack_is_refused():
  from configs import gpt_shakespeare_char_cpu
  config = gpt_shakespeare_char_cpu.get_config()
  config.adversarial.eval = True
  with pytest.raises(KilnError, match="has no input to attack"):
    build_experiment(config, jax.devices()[:1])
