"""Every parallel layout computes the same training run as one device."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from core.errors import KilnError
from core.experiment import build_experiment
from parallel import sharding
from parallel.mesh import make_mesh
from tests.tiny import tiny_config, tiny_gpt_config
from tests.stepping import run_steps

LAYOUTS = {  # name: (strategy, data, fsdp, tensor)
    'dp8': ('jit', -1, 1, 1),
    'fsdp4x2': ('jit', 2, 4, 1),
    'tp2x4': ('jit', 2, 1, 4),
    'pmap8': ('pmap', -1, 1, 1),
}


FAMILIES = {'cnn': tiny_config, 'gpt': tiny_gpt_config}


def _config(strategy='jit', data=-1, fsdp=1, tensor=1, dropout=0.0, family='cnn'):
  config = FAMILIES[family]()
  config.model.dropout_rate = dropout  # pmap draws masks per device; jit for the global batch.
  config.parallel.strategy = strategy
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
  return config


def _params(state):
  """Host copy of the parameters (replica 0 under pmap)."""
  params = jax.device_get(state.params)
  if np.ndim(jax.device_get(state.step)) == 1:
    params = jax.tree.map(lambda x: x[0], params)
  return params


@pytest.fixture(scope='module', params=list(FAMILIES))
def single_device(request, devices):
  family = request.param
  _, state, outputs = run_steps(_config(family=family), devices[:1], num_steps=5)
  return family, _params(state), [metrics['loss'] for metrics, _ in outputs]


@pytest.mark.parametrize('layout', LAYOUTS)
def test_layout_matches_single_device(layout, single_device, devices):
  family, expected_params, expected_losses = single_device
  exp, state, outputs = run_steps(_config(*LAYOUTS[layout], family=family), devices, num_steps=5)
  np.testing.assert_allclose([m['loss'] for m, _ in outputs], expected_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               _params(state), expected_params)
  if layout.startswith(('fsdp', 'tp')):  # The layout really shards the parameters.
    specs = jax.tree.map(lambda x: x.sharding.spec, state.params)
    axis = 'fsdp' if layout.startswith('fsdp') else 'tensor'
    assert any(axis in str(spec) for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))
    fraction = sharding.replicated_fraction(state.params,
                                            jax.tree.map(lambda x: x.sharding.spec, state.params))
    assert fraction < 0.5


def test_dropout_is_layout_invariant_under_jit(devices):
  _, one, one_out = run_steps(_config(dropout=0.5), devices[:1], num_steps=2)
  _, tp, tp_out = run_steps(_config('jit', 2, 2, 2, dropout=0.5), devices, num_steps=2)
  np.testing.assert_allclose([m['loss'] for m, _ in tp_out], [m['loss'] for m, _ in one_out],
                             rtol=1e-5)


def test_rules_resolve_by_divisibility(devices):
  mesh = make_mesh(_config(data=2, fsdp=2, tensor=2).mesh, devices)
  rules = sharding.parse_rules((('embed', 'fsdp'), ('mlp', 'tensor')), mesh)
  assert sharding.logical_to_spec(('embed', 'mlp'), (64, 32), mesh, rules) == P('fsdp', 'tensor')
  assert sharding.logical_to_spec(('embed', 'mlp'), (63, 32), mesh, rules) == P(None, 'tensor')
  assert sharding.logical_to_spec(('embed', 'embed'), (64, 64), mesh, rules) == P('fsdp')
  assert sharding.logical_to_spec(('batch', None), (8, 3), mesh, rules) == P(('data', 'fsdp'))
  with pytest.raises(KilnError, match='mesh axes'):
    sharding.parse_rules((('embed', 'model'),), mesh)


def test_bad_mesh_and_strategy_are_clear_errors(devices):
  with pytest.raises(KilnError, match='do not fit 8 devices'):
    make_mesh(_config(data=3).mesh, devices)
  with pytest.raises(KilnError, match='pure data parallelism'):
    build_experiment(_config('pmap', 2, 4, 1), devices)
  with pytest.raises(KilnError, match='unknown config.parallel.strategy'):
    build_experiment(_config('gspmd'), devices)
