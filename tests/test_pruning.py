"""Pruning (compress/pruning.py) and model statistics (compress/stats.py).

Schedules and masks are checked against their published definitions computed here in
NumPy; the loop's part (masked weights stay zero, resume, sharding) on tiny runs.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from compress import pruning as pruning_lib
from compress import stats
from core.errors import KilnError
from core.paths import path_string
from tests.checkpoints import latest_state
from loop.experiment import build_experiment
from tests.stepping import host_batches, run_steps
from tests.tiny import tiny_config

FIRST_CONV = 'stages/0/0/conv'  # 3x3x1 = 9 input rows: no group of 4 divides it.
N_M_EXCLUDE = r'bias$|scale$|norm|embed|' + FIRST_CONV


def _pruning(**overrides):
  fields = dict(method='magnitude', target_sparsity=0.8, initial_sparsity=0.1, begin_step=10,
                end_step=50, update_every=10, scope='layer', n=2, m=4, layouts=())
  fields.update(overrides)
  return pruning_lib.Pruning(**fields)


def _zhu_gupta(t, s_i, s_f, t0, t1):
  return s_f + (s_i - s_f) * (1 - (min(max(t, t0), t1) - t0) / (t1 - t0)) ** 3


# --- the schedule ---

def test_cubic_schedule_is_zhu_and_gupta_at_update_steps_and_held_between():
  for end, every in ((50, 10), (45, 10)):  # 45: the last update is off the 10-step grid.
    p = _pruning(end_step=end, update_every=every)
    updates = [t for t in range(0, 120) if t >= 10 and (t - 10) % every == 0 and t <= end]
    if updates[-1] != end:
      updates.append(end)
    for t in [0, 5, 9, 10, 11, 15, 19, 20, 29, 30, 44, 45, 46, 49, 50, 51, 100]:
      expected_update = t in updates
      assert bool(p.is_update_step(t)) == expected_update, (end, t)
      last = max([u for u in updates if u <= t], default=None)
      expected = 0.0 if last is None else _zhu_gupta(last, 0.1, 0.8, 10, end)
      np.testing.assert_allclose(float(p.scheduled_sparsity(t)), expected, rtol=1e-6,
                                 err_msg=f'end {end}, step {t}')
  np.testing.assert_allclose(float(p.scheduled_sparsity(1000)), 0.8, rtol=1e-6)
  for t in (0, 7, 23, 50, 80):  # The formula itself, clamped to [t0, t1].
    np.testing.assert_allclose(float(pruning_lib.cubic_sparsity(t, 0.1, 0.8, 10, 50)),
                               _zhu_gupta(t, 0.1, 0.8, 10, 50), rtol=1e-6)


def test_n_m_updates_once_at_begin_step():
  p = _pruning(method='n_m', begin_step=3)
  assert [bool(p.is_update_step(t)) for t in range(6)] == [False] * 3 + [True] + [False] * 2
  assert float(p.scheduled_sparsity(2)) == 0.0 and float(p.scheduled_sparsity(9)) == 0.5


# --- masks ---

@pytest.mark.parametrize('shape, layout', [
    ((16, 8), (0, 1)),  # Dense.
    ((3, 3, 8, 4), (0, 3)),  # Conv: 72 input rows (kh, kw, cin).
    ((8, 3, 2, 4), (0, 1)),  # Fused qkv [E, 3, N, H]: one [E, 3E] matrix.
    ((2, 4, 8), (0, 2)),  # Attention output [N, H, E].
    ((3, 8, 6), (1, 1)),  # Three stacked (scanned) layers.
])
@pytest.mark.parametrize('n, m', [(2, 4), (1, 4), (4, 8)])
def test_n_m_mask_keeps_exactly_the_n_largest_of_every_m_input_rows(shape, layout, n, m):
  w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  mask = np.asarray(pruning_lib.n_m_mask(jnp.asarray(w), jnp.ones(shape, bool), layout, n, m))
  stacked, fan_in = layout
  rows = math.prod(shape[stacked:stacked + fan_in])
  groups_w = np.abs(w).reshape(math.prod(shape[:stacked]), rows // m, m, -1)
  groups_mask = mask.reshape(groups_w.shape)
  assert (groups_mask.sum(axis=2) == n).all()
  # The kept ones are the n largest of their group: NumPy's own top-n per group.
  top = np.argsort(-groups_w, axis=2, kind='stable')[:, :, :n]
  expected = np.zeros_like(groups_mask)
  np.put_along_axis(expected, top, True, axis=2)
  np.testing.assert_array_equal(groups_mask, expected)


def test_n_m_mask_never_revives_a_pruned_weight():
  w = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
  old = np.ones_like(w, bool)
  old[:4, 0] = False  # A whole group already pruned: nothing of it may come back.
  w[~old] = 0.0
  mask = np.asarray(pruning_lib.n_m_mask(jnp.asarray(w), jnp.asarray(old), (0, 1), 2, 4))
  assert not mask[:4, 0].any() and (mask[4:, 0].sum() == 2)


def _numpy_magnitude(w, mask, sparsity):
  """The k = round(s * size) lowest of |w| (pruned ones counting first) go."""
  scores = np.where(mask, np.abs(w), -1.0).ravel()
  k = int(np.round(np.float32(sparsity) * w.size))
  keep = np.ones(w.size, bool)
  keep[np.argsort(scores, kind='stable')[:k]] = False
  return keep.reshape(w.shape)


def test_layer_magnitude_mask_hits_the_count_and_never_revives():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(64, 32)).astype(np.float32)
  first = np.asarray(pruning_lib.magnitude_mask(jnp.asarray(w), jnp.ones(w.shape, bool), 0.5))
  np.testing.assert_array_equal(first, _numpy_magnitude(w, np.ones(w.shape, bool), 0.5))
  assert (~first).sum() == 1024
  # Training moved the live weights, all now smaller than any pruned one once was; the
  # pruned ones are zero. A higher sparsity prunes more, and revives nothing.
  w2 = np.where(first, rng.normal(size=w.shape) * 1e-3, 0.0).astype(np.float32)
  second = np.asarray(pruning_lib.magnitude_mask(jnp.asarray(w2), jnp.asarray(first), 0.75))
  assert (~second).sum() == 1536 and not (second & ~first).any()
  np.testing.assert_array_equal(second, _numpy_magnitude(w2, first, 0.75))
  # A lower (or zero) sparsity keeps the mask as it was.
  for s in (0.0, 0.25):
    again = np.asarray(pruning_lib.magnitude_mask(jnp.asarray(w2), jnp.asarray(second), s))
    np.testing.assert_array_equal(again, second)


def test_global_magnitude_masks_share_one_threshold():
  rng = np.random.default_rng(3)
  weights = {'a': rng.normal(size=(32, 16)).astype(np.float32),
             'b': 0.1 * rng.normal(size=(3, 3, 4, 8)).astype(np.float32)}  # Smaller weights.
  masks = {k: np.ones(v.shape, bool) for k, v in weights.items()}
  new = pruning_lib.global_magnitude_masks(
      {k: jnp.asarray(v) for k, v in weights.items()},
      {k: jnp.asarray(v) for k, v in masks.items()}, 0.6)
  new = {k: np.asarray(v) for k, v in new.items()}
  total = sum(v.size for v in weights.values())
  assert sum((~v).sum() for v in new.values()) == round(0.6 * total)
  pruned = np.concatenate([np.abs(weights[k])[~new[k]] for k in weights])
  kept = np.concatenate([np.abs(weights[k])[new[k]] for k in weights])
  assert pruned.max() < kept.min()
  assert (~new['b']).mean() > (~new['a']).mean()  # The small layer gives up more.


def test_prunable_are_kernels_the_regex_misses():
  layouts = {'conv/kernel': (0, 3), 'conv/bias': None, 'norm/scale': None,
             'token_embed': (0, 1), 'head/kernel': (0, 1)}
  assert pruning_lib.prunable_layouts(layouts, r'bias$|scale$|norm|embed') == {
      'conv/kernel': (0, 3), 'head/kernel': (0, 1)}


# --- model statistics ---

def test_model_stats_counts_and_bytes():
  kernel = np.arange(1, 33, dtype=np.float32).reshape(4, 8)
  kernel[:, ::2] = 0  # 16 of 32 zero.
  bias = np.array([0, 1, 2, 3, 4, 5, 6, 7], np.float32)  # 1 zero; never prunable.
  params = {'layer': {'kernel': kernel, 'bias': bias}}
  got = stats.model_stats(params, prunable=['layer/kernel'])
  assert got['params'] == 40 and got['nonzero_params'] == 23 and got['prunable_params'] == 32
  assert got['sparsity'] == 0.5 and got['model_sparsity'] == pytest.approx(17 / 40)
  assert got['bytes_dense'] == 160
  assert got['bytes_sparse'] == (16 * 4 + 32 // 8) + 8 * 4  # Values + bitmask; dense bias.
  # 1:4 N:M: 8 kept values, each with a 2-bit index in its group of 4.
  assert stats.model_stats(params, ['layer/kernel'], n_m=(1, 4))['bytes_sparse'] == (
      8 * 4 + 2) + 8 * 4
  dense = stats.model_stats({'k': np.ones((4, 8), np.float32)})  # A format picks the smaller.
  assert dense['bytes_sparse'] == dense['bytes_dense'] == 128 and dense['sparsity'] == 0.0


# --- bad input, at start-up ---

@pytest.mark.parametrize('key, value, message', [
    ('target_sparsity', 1.0, r'config\.pruning\.target_sparsity=1\.0 is out of range'),
    ('method', 'random', r"unknown config\.pruning\.method='random'"),
    ('m', 1, r'config\.pruning\.m=1 is out of range'),
])
def test_out_of_range_pruning_fields_fail_at_start_up(key, value, message, devices):
  config = tiny_config()
  config.pruning[key] = value
  with pytest.raises(KilnError, match=message):
    build_experiment(config, devices[:1])


@pytest.mark.parametrize('changes, message', [
    ({'method': 'n_m'}, r"config\.pruning\.m=4 does not divide the 9 input rows of "
                        r"'stages/0/0/conv/kernel': add it to config\.pruning\.exclude, or "
                        r'change m'),
    ({'method': 'n_m', 'exclude': N_M_EXCLUDE, 'n': 4}, r'config\.pruning\.n=4 must lie in'),
    ({'target_sparsity': 0.5, 'initial_sparsity': 0.6}, r'initial_sparsity=0\.6 must lie in'),
    ({'target_sparsity': 0.5, 'begin_step': 40}, r'begin_step=40 is not before the last of 40'),
    ({'target_sparsity': 0.5, 'begin_step': 20, 'end_step': 10}, r'end_step=10 comes before'),
    ({'target_sparsity': 0.5, 'exclude': '.'}, r'leaves no kernel to prune'),
])
def test_bad_pruning_combinations_fail_at_start_up_with_one_line(changes, message, devices):
  config = tiny_config()
  config.pruning.update(changes)
  with pytest.raises(KilnError, match=message) as error:
    build_experiment(config, devices[:1])
  assert '\n' not in str(error.value)


def test_defaults_resolve_from_the_run_length(devices):
  config = tiny_config()  # 40 steps.
  assert build_experiment(config, devices[:1]).step_options.pruning is None  # Off by default.
  config.pruning.target_sparsity = 0.9
  p = build_experiment(config, devices[:1]).step_options.pruning
  assert (p.begin_step, p.end_step) == (4, 30)
  assert FIRST_CONV + '/kernel' in p.prunable and 'hidden/bias' not in p.prunable


# --- in the loop ---

def _pruned_config(optimizer: str):
  config = tiny_config()
  config.model.dropout_rate = 0.0
  config.optimizer.name = optimizer
  config.optimizer.learning_rate = 0.05 if optimizer == 'sgd' else 1e-2
  config.regularization.weight_decay = 0.1  # Decoupled decay: it would move zeros if unmasked.
  config.regularization.exclude = '^$'  # Decay every parameter, kernels included.
  config.pruning.target_sparsity = 0.7
  config.pruning.begin_step = 2
  config.pruning.end_step = 10
  config.pruning.update_every = 4
  config.num_train_steps = 16
  config.checkpoint_every_steps = 4
  config.eval_every_steps = 8
  config.log_every_steps = 4
  return config


def _host(tree, pmap: bool = False):
  tree = jax.device_get(tree)
  return jax.tree.map(lambda x: x[0], tree) if pmap else tree


def _check_masked_zero(params, masks):
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
    assert (np.asarray(p)[~np.broadcast_to(m, p.shape)] == 0).all()


@pytest.mark.slow  # Compiles a train step per optimizer.
@pytest.mark.parametrize('optimizer', ['sgd', 'adamw'])
def test_masked_weights_stay_exactly_zero_after_every_update(optimizer, devices):
  config = _pruned_config(optimizer)
  config.ema.decay = 0.9
  exp = build_experiment(config, devices[:1])
  assert optimizer != 'sgd' or config.optimizer.sgd.momentum > 0
  state, shardings = exp.create_state()
  train_step = exp.train_step(shardings)
  previous = None
  for step, batch in enumerate(host_batches(exp, 14)):
    state, _, scalars = train_step(state, exp.strategy.place(batch))
    params, masks, ema = _host((state.params, state.masks, state.ema_params))
    _check_masked_zero(params, masks)
    _check_masked_zero(ema, masks)
    if previous is not None:  # Masks only shrink.
      for old, new in zip(jax.tree.leaves(previous), jax.tree.leaves(masks)):
        assert not (np.asarray(new) & ~np.asarray(old)).any()
    previous = masks
    # The logged sparsity is the schedule's (the step just run is `step`).
    np.testing.assert_allclose(float(scalars['sparsity']),
                               float(exp.step_options.pruning.scheduled_sparsity(step)),
                               atol=1e-3)
  assert float(scalars['sparsity']) == pytest.approx(0.7, abs=1e-3)


@pytest.mark.slow  # Three tiny runs per optimizer.
@pytest.mark.parametrize('optimizer', ['sgd', 'adamw'])
def test_resumed_pruned_run_matches_uninterrupted(optimizer, tmp_path, devices):
  config = _pruned_config(optimizer)
  once = train.train_and_evaluate(config, str(tmp_path / 'once'))
  half = train.train_and_evaluate(config, str(tmp_path / 'twice'), stop_at_step=7)
  assert half['steps'] == 7  # Between the updates at 6 and 10.
  twice = train.train_and_evaluate(config, str(tmp_path / 'twice'))
  assert once['steps'] == twice['steps'] == 16
  a, b = latest_state(str(tmp_path / 'once')), latest_state(str(tmp_path / 'twice'))
  jax.tree.map(np.testing.assert_array_equal, a['masks'], b['masks'])
  jax.tree.map(np.testing.assert_array_equal, a['params'], b['params'])
  _check_masked_zero(a['params'], a['masks'])
  # summary.json's statistics are those of the masks.
  with open(tmp_path / 'once' / 'summary.json') as f:
    model_stats = json.load(f)['model_stats']
  prunable = [np.asarray(m) for m in jax.tree.leaves(a['masks']) if np.ndim(m)]
  assert model_stats['sparsity'] == pytest.approx(
      1 - sum(m.sum() for m in prunable) / sum(m.size for m in prunable))
  assert model_stats['sparsity'] == pytest.approx(0.7, abs=1e-3)
  assert model_stats['params'] == sum(np.size(p) for p in jax.tree.leaves(a['params']))


LAYOUTS = {  # name: (strategy, data, fsdp, scope)
    'fsdp4x2': ('jit', 2, 4, 'layer'),
    'fsdp8_global': ('jit', 1, 8, 'global'),
    'pmap8': ('pmap', -1, 1, 'layer'),
}


def _sharded_config(strategy, data, fsdp, scope):
  config = _pruned_config('sgd')
  config.pruning.scope = scope
  config.parallel.strategy = strategy
  config.mesh.data, config.mesh.fsdp = data, fsdp
  return config


def _run(config, devices, num_steps):
  exp, state, outputs = run_steps(config, devices, num_steps)
  return exp, state, [float(metrics['loss']) for metrics, _ in outputs]


@pytest.mark.slow  # Compiles a sharded train step per layout.
@pytest.mark.parametrize('layout', LAYOUTS)
def test_pruning_under_sharding_matches_one_device(layout, devices):
  config = _sharded_config(*LAYOUTS[layout])
  pmap = config.parallel.strategy == 'pmap'
  _, one, one_losses = _run(_sharded_config('jit', -1, 1, LAYOUTS[layout][3]), devices[:1], 11)
  _, many, many_losses = _run(config, devices, 11)  # Past the updates at 2, 6 and 10.
  np.testing.assert_allclose(many_losses, one_losses, rtol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, _host(many.masks, pmap), _host(one.masks))
  if not pmap:  # Each kernel's mask lives where its kernel does.
    params = {path_string(k): v for k, v in jax.tree_util.tree_flatten_with_path(many.params)[0]}
    sharded = 0
    for k, mask in jax.tree_util.tree_flatten_with_path(many.masks)[0]:
      if mask.ndim:
        assert mask.sharding.spec == params[path_string(k)].sharding.spec
        sharded += 'fsdp' in str(mask.sharding.spec)
    assert sharded >= 2


@pytest.mark.slow  # A dense run, then its 2:4 retraining.
def test_n_m_prunes_the_loaded_checkpoint_at_step_zero(tmp_path, devices):
  dense = tiny_config()
  dense.num_train_steps = 10
  dense_dir = str(tmp_path / 'dense')
  dense_summary = train.train_and_evaluate(dense, dense_dir)
  assert dense_summary['model_stats']['sparsity'] == 0.0
  loaded = latest_state(dense_dir)['params']

  config = tiny_config()
  config.num_train_steps = 6
  config.init.checkpoint_dir = dense_dir
  config.pruning.method = 'n_m'
  config.pruning.exclude = N_M_EXCLUDE
  summary = train.train_and_evaluate(config, str(tmp_path / 'sparse'))
  state = latest_state(str(tmp_path / 'sparse'))
  flat_loaded = {path_string(k): v for k, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  layouts = build_experiment(config, devices[:1]).step_options.pruning.prunable
  for k, mask in jax.tree_util.tree_flatten_with_path(state['masks'])[0]:
    path = path_string(k)
    if path in layouts:  # The 2:4 pattern of the loaded weights, not of a random init.
      expected = pruning_lib.n_m_mask(jnp.asarray(flat_loaded[path]), jnp.ones(mask.shape, bool),
                                      layouts[path], 2, 4)
      np.testing.assert_array_equal(mask, np.asarray(expected))
    else:
      assert np.ndim(mask) == 0 and mask
  assert FIRST_CONV + '/kernel' not in layouts
  assert summary['model_stats']['sparsity'] == pytest.approx(0.5)
  assert summary['model_stats']['bytes_sparse'] < summary['model_stats']['bytes_dense']
  assert os.path.exists(tmp_path / 'sparse' / 'summary.json')
