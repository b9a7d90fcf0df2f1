"""DP-SGD (trust/training/privacy.py in the loop): the accountant's figures, calibration,
Poisson batches, per-example clipping bounding one example's influence, the noise's standard
deviation, and the layouts (accumulation, FSDP, pmap) agreeing under DP."""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.errors import KilnError
from input_pipeline import batching, sources
from loop.experiment import build_experiment
from loop.training import train_and_evaluate
from tests.stepping import host_batches
from tests.tiny import tiny_config
from trust.training import privacy


def _independent_epsilon(q, sigma, steps, delta, accountant):
  """dp-accounting called directly, as a reader of the paper would."""
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
  ledger = (dp_accounting.pld.PLDAccountant() if accountant == 'pld'
            else dp_accounting.rdp.RdpAccountant())
  return ledger.compose(event).get_epsilon(delta)


def test_epsilon_matches_the_published_reference():
  """q = 256/60000, sigma 1.1, 14,063 steps (60 epochs), delta 1e-5: RDP 2.60, PLD 2.39."""
  q, sigma, steps, delta = 256 / 60000, 1.1, 14_063, 1e-5
  assert privacy.epsilon(q, sigma, steps, delta, 'rdp') == pytest.approx(2.60, rel=0.01)
  assert privacy.epsilon(q, sigma, steps, delta, 'pld') == pytest.approx(2.39, rel=0.01)
  assert privacy.epsilon(q, sigma, 0, delta) == 0.0


@pytest.mark.parametrize('accountant', ['rdp', pytest.param('pld', marks=pytest.mark.slow)])
def test_target_epsilon_calibrates_the_noise_to_the_budget(accountant):
  q, steps, delta = 0.01, 300, 1e-5
  sigma = privacy.calibrate_noise(2.0, q, steps, delta, accountant)
  spent = _independent_epsilon(q, sigma, steps, delta, accountant)
  assert 1.97 <= spent <= 2.0  # Within budget, and not wastefully so.
  assert _independent_epsilon(q, sigma * 0.97, steps, delta, accountant) > 2.0


def test_clipping_bounds_each_examples_contribution():
  rng = np.random.default_rng(0)
  grads = {'w': jnp.asarray(rng.normal(size=(6, 4, 3)) * np.array([0.01, 0.1, 1, 10, 100, 1e3])
                            [:, None, None], jnp.float32),
           'b': jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)}
  mask = jnp.asarray([1, 1, 1, 1, 1, 0], jnp.float32)
  config = privacy.Privacy(clip_norm=0.5, noise_multiplier=0.0, sampling_rate=0.1,
                           expected_batch_size=5.0, padded_batch_size=6, num_examples=50,
                           delta=1e-5, accountant='pld')
  total, clipped, sampled = config.clipped_sum(grads, mask)
  norms = np.sqrt(sum(np.sum(np.square(np.asarray(g)).reshape(6, -1), 1)
                      for g in jax.tree.leaves(grads)))
  scale = np.minimum(1, 0.5 / norms) * np.asarray(mask)
  np.testing.assert_allclose(np.asarray(total['w']), np.tensordot(scale, np.asarray(grads['w']),
                                                                  1), rtol=1e-5, atol=1e-6)
  assert float(sampled) == 5 and float(clipped) == np.sum((norms > 0.5) * np.asarray(mask))
  # Each example alone: its clipped gradient never exceeds C; the masked row adds nothing.
  for i in range(6):
    alone = jnp.zeros(6).at[i].set(mask[i])
    one = config.clipped_sum(grads, alone)[0]
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in jax.tree.leaves(one)))
    assert norm <= 0.5 + 1e-5
    assert norm == pytest.approx(min(norms[i], 0.5) * float(mask[i]), rel=1e-4, abs=1e-7)


def test_poisson_batches_sample_each_example_independently_and_resume_exactly():
  exp_data = sources.load(tiny_config().dataset, 0, 1).train
  n, q, rows = exp_data.num_examples, 0.05, 128
  stream = batching.poisson_batches(exp_data, rows, q, seed=3)
  batches = [next(stream) for _ in range(200)]
  sizes = np.array([b['mask'].sum() for b in batches])
  assert all(b['image'].shape[0] == rows and b['mask'].shape == (rows,) for b in batches)
  # Binomial(n, q): mean n q, variance n q (1 - q); 200 draws put the mean within ~4 sd/sqrt(200).
  assert abs(sizes.mean() - n * q) < 4 * np.sqrt(n * q * (1 - q) / 200)
  assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.35)
  for b in batches[:5]:  # Padding rows are zeros after the sampled ones.
    size = int(b['mask'].sum())
    assert np.all(b['mask'][:size] == 1) and not np.any(b['image'][size:])
  resumed = batching.poisson_batches(exp_data, rows, q, seed=3, start_step=150)
  for expected in batches[150:153]:
    got = next(resumed)
    np.testing.assert_array_equal(got['label'], expected['label'])
    np.testing.assert_array_equal(got['mask'], expected['mask'])


def _dp_config(noise=2.0, clip=0.01):
  """A tiny MLP with SGD at learning rate 1 and no momentum: the update is minus the gradient."""
  config = tiny_config()
  config.model = config.model.__class__({'name': 'mlp', 'hidden_features': (32, 16),
                                         'dropout_rate': 0.0})
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 1.0
  config.optimizer.sgd.momentum = 0.0
  config.schedule.name = 'constant'
  config.schedule.warmup_steps = 0
  config.privacy.enabled = True
  config.privacy.noise_multiplier = noise
  config.privacy.clip_norm = clip
  return config


def _update(exp, step_fn, state, batch):
  """Params after one step minus before (the state is copied: the step donates it)."""
  before = jax.device_get(state.params)
  after, _, scalars = step_fn(jax.tree.map(jnp.copy, state), exp.strategy.place(batch))
  return jax.tree.map(lambda a, b: np.asarray(a) - b, jax.device_get(after.params), before), scalars


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.slow  # Seconds of compiles: the fast tier stays under 3 minutes.
def test_one_example_moves_the_update_by_at_most_clip_norm_and_the_noise_has_its_std(devices):
  """Neighbouring batches (one example removed) share the step's noise, so their updates differ
  by that example's clipped gradient / (q N): at most C / (q N). An empty sample's update is
  the noise alone: standard deviation sigma C / (q N). Nothing recompiles between samples."""
  sigma, clip = 2.0, 0.01
  exp = build_experiment(_dp_config(sigma, clip), devices)
  state, shardings = exp.create_state()
  step_fn = exp.train_step(shardings)
  batch = host_batches(exp, 1)[0]
  expected = exp.privacy.expected_batch_size
  with_all, scalars = _update(exp, step_fn, state, batch)
  assert float(scalars['dp_clipped_fraction']) == 1.0  # C = 0.01 clips every example.
  for row in np.flatnonzero(batch['mask'])[:3]:
    neighbour = {**batch, 'mask': batch['mask'].copy()}
    neighbour['mask'][row] = 0.0
    without, _ = _update(exp, step_fn, state, neighbour)
    influence = np.linalg.norm(_flat(with_all) - _flat(without))
    assert influence == pytest.approx(clip / expected, rel=1e-3)  # Clipped: exactly C / (q N).
  empty = {**batch, 'mask': np.zeros_like(batch['mask'])}
  noise, scalars = _update(exp, step_fn, state, empty)
  assert float(scalars['dp_sample_size']) == 0
  values = _flat(noise) * expected  # lr = 1: the update is -(noise / (q N)).
  assert len(values) > 2000  # The sample std is within ~1.4% of the true one per sd.
  assert values.std() == pytest.approx(sigma * clip, rel=0.05)
  assert abs(values.mean()) < 4 * sigma * clip / np.sqrt(len(values))
  assert step_fn._cache_size() == 1  # Samples of every size ran one executable.


def test_batchnorm_and_mixup_are_refused_with_one_line(devices):
  config = tiny_config()  # The CNN with BatchNorm.
  config.privacy.enabled = True
  with pytest.raises(KilnError, match=r"BatchNorm.*config.model.norm='group'") as error:
    build_experiment(config, devices)
  assert '\n' not in str(error.value)
  config.model.norm = 'group'
  config.model.norm_groups = 4
  config.augment.mixup_alpha = 0.2
  with pytest.raises(KilnError, match='mixup_alpha=0'):
    build_experiment(config, devices)


def test_delta_must_be_below_one_over_the_examples(devices):
  config = _dp_config()
  config.privacy.delta = 0.01
  with pytest.raises(KilnError, match=r'config.privacy.delta=0.01 .* below 1/'):
    build_experiment(config, devices)


def _params_after(config, devices, steps=2):
  exp = build_experiment(config, devices)
  state, shardings = exp.create_state()
  step_fn = exp.train_step(shardings)
  for batch in host_batches(exp, steps):
    state, _, _ = step_fn(state, exp.strategy.place(batch))
  return jax.device_get(exp.strategy.checkpoint_view(state).params)


@pytest.mark.slow  # Four layouts of the same DP step, each compiled.
def test_accumulation_fsdp_and_pmap_take_the_same_private_step(devices):
  """The same samples and the same noise: micro-batches, FSDP-sharded parameters and pmap all
  give the single-device parameters."""
  base = _dp_config(noise=1.0, clip=0.5)
  reference = _params_after(base, devices[:1])
  accumulated = _dp_config(noise=1.0, clip=0.5)
  accumulated.gradient.accumulation_steps = 2
  fsdp = _dp_config(noise=1.0, clip=0.5)
  fsdp.mesh.data, fsdp.mesh.fsdp = 2, 4
  pmap = _dp_config(noise=1.0, clip=0.5)
  pmap.parallel.strategy = 'pmap'
  for name, config, chosen in (('accumulation', accumulated, devices[:1]), ('fsdp', fsdp, devices),
                               ('pmap', pmap, devices)):
    got = _params_after(config, chosen)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(got)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-6,
                                 err_msg=name)


@pytest.mark.slow  # A whole (tiny) DP run of the GroupNorm CNN.
def test_a_private_run_learns_and_reports_the_accountants_epsilon(tmp_path, devices):
  config = tiny_config()
  config.model.norm = 'group'
  config.model.norm_groups = 4
  config.privacy.enabled = True
  config.privacy.target_epsilon = 8.0
  config.privacy.clip_norm = 1.0
  config.batch_size = 128  # q = 0.09: small DP batches drown in noise (32 reached 21%).
  config.optimizer.learning_rate = 2e-2
  summary = train_and_evaluate(config, str(tmp_path))
  report = summary['privacy']
  assert report['steps'] == config.num_train_steps and report['delta'] == 1e-5
  assert report['epsilon'] <= 8.0
  independent = _independent_epsilon(report['sampling_rate'], report['noise_multiplier'],
                                     report['steps'], 1e-5, 'pld')
  assert report['epsilon'] == pytest.approx(independent, rel=0.01)
  # 40 noisy steps at epsilon 8 (measured 44.8%): well above chance (10 classes), and learning.
  assert summary['final_eval']['accuracy'] > 0.3
  assert summary['final_eval']['loss'] < 0.8 * np.log(10)
