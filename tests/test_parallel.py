"""Every parallel layout computes the same training run as one device."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from core.errors import KilnError
from loop.experiment import build_experiment
from core import logical_axes
from parallel import sharding
from parallel.mesh import make_mesh
from tests.tiny import REPO, tiny_config, tiny_gpt_config
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
@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
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


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_dropout_is_layout_invariant_under_jit(devices):
  _, one, one_out = run_steps(_config(dropout=0.5), devices[:1], num_steps=2)
  _, tp, tp_out = run_steps(_config('jit', 2, 2, 2, dropout=0.5), devices, num_steps=2)
  np.testing.assert_allclose([m['loss'] for m, _ in tp_out], [m['loss'] for m, _ in one_out],
                             rtol=1e-5)


def test_rules_resolve_by_divisibility(devices):
  mesh = make_mesh(_config(data=2, fsdp=2, tensor=2).mesh, devices)
  rules = sharding.parse_rules((('embed', 'fsdp'), ('mlp', 'tensor')), mesh)
  assert logical_axes.logical_to_spec(('embed', 'mlp'), (64, 32), mesh, rules) == P('fsdp', 'tensor')
  assert logical_axes.logical_to_spec(('embed', 'mlp'), (63, 32), mesh, rules) == P(None, 'tensor')
  assert logical_axes.logical_to_spec(('embed', 'embed'), (64, 64), mesh, rules) == P('fsdp')
  assert logical_axes.logical_to_spec(('batch', None), (8, 3), mesh, rules) == P(('data', 'fsdp'))
  with pytest.raises(KilnError, match='mesh axes'):
    sharding.parse_rules((('embed', 'model'),), mesh)


def test_bad_mesh_and_strategy_are_clear_errors(devices):
  with pytest.raises(KilnError, match='do not fit 8 devices'):
    make_mesh(_config(data=3).mesh, devices)
  with pytest.raises(KilnError, match='pure data parallelism'):
    build_experiment(_config('pmap', 2, 4, 1), devices)
  with pytest.raises(KilnError, match='unknown config.parallel.strategy'):
    build_experiment(_config('gspmd'), devices)


_BACK_TO_BACK = '''
import os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
import jax, jax.numpy as jnp
from parallel import mesh as mesh_lib
from parallel.strategy import PMAP_AXIS, create_strategy
mesh = mesh_lib.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
strategy = create_strategy(sys.argv[1], mesh, {})
def step(w, x):
  for _ in range(20):
    x = jnp.tanh(x @ w)
  total = x.sum(0)  # An all-reduce over the devices' batch shards (under jit).
  return jax.lax.psum(total, PMAP_AXIS) if sys.argv[1] == 'pmap' else total
w = jnp.eye(256) * 0.5
if sys.argv[1] == 'pmap':
  w = strategy.distribute(w, None)
eval_step = strategy.compile_eval(step, mesh_lib.replicated(mesh))
x = strategy.place({'x': jnp.ones((8 * 64, 256))})['x']
total = None
for _ in range(300):  # Each merge is dispatched while the next step is launched.
  total = eval_step(w, x) if total is None else (total + eval_step(w, x)) / 2
print(float(total.sum()))
'''


@pytest.mark.slow  # A fresh interpreter per strategy.
@pytest.mark.parametrize('strategy', ['jit', 'pmap'])
def test_back_to_back_collective_steps_on_fake_cpu_devices_do_not_deadlock(strategy):
  # Without waiting for each step, XLA:CPU's in-process all-reduce deadlocks here within a
  # few steps and aborts the process after its 40 s rendezvous timeout.
  result = subprocess.run([sys.executable, '-c', _BACK_TO_BACK, strategy], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-2000:]
  assert float(result.stdout.split()[-1]) > 0
