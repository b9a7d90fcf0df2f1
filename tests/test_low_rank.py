"""Low-rank factoring (compress/low_rank.py): SVD error against Eckart-Young, factored layers
against the truncated kernel, the rank rules, and factoring a trained run then fine-tuning."""

import json
import math

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from compress import low_rank
from core.errors import KilnError
from models.cnn import CNN
from models.conv import Conv
from models.cost import conv_flops, linear_flops
from loop.experiment import build_experiment
from loop import pretrained, training
from loop.training import train_and_evaluate
from monitor import run_log
from tests.tiny import tiny_config


def test_reconstruction_error_is_the_dropped_energy():
  matrix = np.random.default_rng(0).normal(size=(12, 7))
  singular = np.linalg.svd(matrix, compute_uv=False)
  for rank in range(1, 8):
    first, second = low_rank.svd_factors(matrix, rank)
    assert first.shape == (12, rank) and second.shape == (rank, 7)
    error = np.square(matrix - first @ second).sum()
    np.testing.assert_allclose(error, np.square(singular[rank:]).sum(), rtol=1e-9, atol=1e-9)


def test_rank_rules():
  singular = np.array([4.0, 2.0, 1.0, 1.0])  # Squares 16, 4, 1, 1 of 22.
  assert low_rank.choose_rank(singular, 100, 100, energy=16 / 22) == 1
  assert low_rank.choose_rank(singular, 100, 100, energy=0.75) == 2  # 20/22 >= 0.75 > 16/22.
  assert low_rank.choose_rank(singular, 100, 100, energy=1.0) == 4
  assert low_rank.choose_rank(singular, 100, 40, rank_ratio=0.1) == 4  # ceil(0.1 * 40).
  assert low_rank.choose_rank(singular, 100, 40, rank_ratio=0.01) == 1
  # Stays whole where r (rows + cols) >= rows cols: 8 x 8 saves nothing from rank 4 up.
  assert low_rank.choose_rank(singular, 8, 8, rank_ratio=0.375) == 3
  assert low_rank.choose_rank(singular, 8, 8, rank_ratio=0.5) is None
  assert low_rank.choose_rank(singular, 8, 8, energy=1.0) is None  # Rank 4: 64 >= 64.


def _truncated(kernel, rank):
  matrix = kernel.reshape(-1, kernel.shape[-1])
  u, s, vt = np.linalg.svd(matrix, full_matrices=False)
  return ((u[:, :rank] * s[:rank]) @ vt[:rank]).reshape(kernel.shape).astype(np.float32)


def _load(module, params):
  graphdef, state = nnx.split(module)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def _factored_params(layer_params, rank):
  plan = low_rank.Plan(ranks={'layer': rank}, checkpoint_dir='')
  return plan.factored_params({'layer': layer_params})['layer']


def test_factored_dense_reproduces_the_truncated_kernel():
  rng = np.random.default_rng(1)
  dense = nnx.Linear(10, 6, rngs=nnx.Rngs(0))
  kernel, bias = rng.normal(size=(10, 6)).astype(np.float32), rng.normal(size=6).astype(np.float32)
  factored = low_rank.FactoredLinear(dense, 3, rngs=nnx.Rngs(0))
  factored = _load(factored, _factored_params({'kernel': kernel, 'bias': bias}, 3))
  x = rng.normal(size=(5, 10)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(factored)(x), x @ _truncated(kernel, 3) + bias, rtol=1e-4,
                             atol=1e-5)
  assert linear_flops(factored) == 2 * 3 * (10 + 6) < linear_flops(dense)


@pytest.mark.slow  # Seconds of compiles: the fast tier stays under 3 minutes.
@pytest.mark.parametrize('strides,padding', [(1, 'SAME'), (2, 'VALID')])
def test_factored_conv_reproduces_a_conv_by_the_truncated_kernel(strides, padding):
  rng = np.random.default_rng(2)
  conv = Conv(4, 6, (3, 3), strides=strides, padding=padding, rngs=nnx.Rngs(0))
  kernel = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
  bias = rng.normal(size=6).astype(np.float32)
  factored = low_rank.FactoredConv(conv, 2, rngs=nnx.Rngs(0))
  factored = _load(factored, _factored_params({'kernel': kernel, 'bias': bias}, 2))
  reference = _load(Conv(4, 6, (3, 3), strides=strides, padding=padding, rngs=nnx.Rngs(0)),
                    {'kernel': _truncated(kernel, 2), 'bias': bias})
  x = rng.normal(size=(2, 9, 9, 4)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(factored)(x), jax.jit(reference)(x), rtol=1e-4, atol=1e-4)
  flops, shape = conv_flops(factored, (9, 9))
  dense_flops, dense_shape = conv_flops(conv, (9, 9))
  assert shape == dense_shape
  # The spatial conv has the original's taps with r outputs, the 1x1 one r inputs per output.
  assert flops == pytest.approx(dense_flops * 2 / 6 + 2 * math.prod(shape) * 2 * 6)


def _config(**low_rank_settings):
  c = tiny_config()
  c.init.checkpoint_dir = 'base'
  for key, value in low_rank_settings.items():
    c.low_rank[key] = value
  return c


def test_bad_settings_are_one_line_errors(tmp_path):
  source = {'hidden': {'kernel': np.zeros((64, 32), np.float32)}}
  def model():
    return nnx.eval_shape(lambda: CNN(num_classes=10, input_shape=(8, 8, 1), features=(8, 16),
                                      dense_features=32, rngs=nnx.Rngs(0)))
  cases = [
      (_config(energy=0.5, rank_ratio=0.5), r'config\.low_rank\.energy=0\.5 and rank_ratio=0\.5'),
      (_config(rank_ratio=1.5), r'config\.low_rank\.energy and rank_ratio must lie in \(0, 1\]'),
      (_config(rank_ratio=0.5, include='nothing'),
       r"config\.low_rank\.include='nothing'.*matches no Dense or Conv kernel"),
  ]
  no_checkpoint = _config(rank_ratio=0.5)
  no_checkpoint.init.checkpoint_dir = ''
  cases.append((no_checkpoint, r'config\.init\.checkpoint_dir'))
  for config, message in cases:
    with pytest.raises(KilnError, match=message) as info:
      low_rank.plan(config, model, lambda: source)
    assert '\n' not in str(info.value)
  assert low_rank.plan(_config(), model, lambda: source) is None  # Off: nothing is read.
  with pytest.raises(KilnError, match=r"config\.low_rank\.rank_ratio.*\[0, 1\]|rank_ratio"):
    build_experiment(_config(rank_ratio=1.5), jax.devices()[:1])


@pytest.mark.slow  # Trains the tiny CNN, then factors and fine-tunes it (two full runs).
def test_factor_a_trained_run_then_fine_tune(tmp_path):
  base_dir = str(tmp_path / 'base')
  base = train_and_evaluate(tiny_config(), base_dir)
  config = tiny_config()
  config.init.checkpoint_dir = base_dir
  config.low_rank.rank_ratio = 0.25
  config.low_rank.include = 'hidden'
  config.num_train_steps = 20
  config.log_every_steps = 5
  config.eval_every_steps = 20
  exp = build_experiment(config, jax.devices())
  assert exp.low_rank.ranks == {'hidden': math.ceil(0.25 * 32)}  # [64, 32] hidden kernel.
  params = jax.eval_shape(lambda: exp.template.split(exp.template.build_model(nnx.Rngs(0)))[0])
  assert set(params['hidden']) == {'down', 'up'}
  assert params['hidden']['down']['kernel'].shape == (64, 8)
  assert params['hidden']['up']['kernel'].shape == (8, 32) and 'bias' in params['hidden']['up']
  # The run starts from the SVD factors, every other leaf as the checkpoint has it.
  state, shardings = exp.create_state()
  started = jax.device_get(training._start_from_pretrained(exp, state, shardings, base_dir).params)
  _, trained = pretrained.read_params(base_dir)
  np.testing.assert_allclose(started['hidden']['down']['kernel'] @ started['hidden']['up']['kernel'],
                             _truncated(trained['hidden']['kernel'], 8), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(started['hidden']['up']['bias'], trained['hidden']['bias'])
  np.testing.assert_array_equal(started['classifier']['kernel'], trained['classifier']['kernel'])
  summary = train_and_evaluate(config, str(tmp_path / 'factored'))
  # FLOPs: the base's less the hidden layer's 2*64*32, plus the factored pair's 2*8*(64+32).
  saved = 3 * config.batch_size * (2 * 64 * 32 - 2 * 8 * (64 + 32))
  assert summary['train_step_flops'] == pytest.approx(base['train_step_flops'] - saved)
  assert summary['mfu'] is None or 0 < summary['mfu'] < 1
  with open(tmp_path / 'factored' / 'summary.json') as f:
    assert json.load(f)['steps'] == 20
  losses = _train_losses(tmp_path / 'factored')
  assert losses[-1] < losses[0], losses
  assert summary['final_eval']['accuracy'] > 0.5


def _train_losses(workdir) -> list[float]:
  return list(run_log.read_scalars(str(workdir))['train_loss'][1])
