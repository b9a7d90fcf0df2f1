"""backends.ops: one switch for the backend implementations, and a portable mode under which
models export with jax.export (no custom calls), equal to what they compute in a run."""

import importlib.util
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from backends import ops
from configs import default
from core.errors import KilnError
from models import create_model
from models.transformer import GPT, causal_attend
from tests.tiny import REPO

HAS_CPU_ROOM = importlib.util.find_spec('backends.cpu') is not None


def _cnn():
  """configs/default.py's CNN, sized for the digits (8x8x1, 10 classes)."""
  return create_model(default.get_config().model, nnx.Rngs(0), num_classes=10,
                      input_shape=(8, 8, 1))


def _forward(model):
  graphdef, state = nnx.split(model)
  return lambda state, x: nnx.merge(graphdef, state)(x)


def _export(fn, *args):
  # A fresh function each time: jit reuses an earlier trace of the same one, whatever the
  # ops setting was then.
  return jax.export.export(jax.jit(lambda *a: fn(*a)))(*args)


@pytest.fixture
def conv_rules(monkeypatch):
  """The single-device CPU rule table (the 8 test devices otherwise keep native convs)."""
  monkeypatch.setenv('KILN_CONV_LOWERING', 'rules')


@pytest.mark.skipif(not HAS_CPU_ROOM, reason='backends/cpu/ is absent: nothing to fall back from')
def test_cpu_lowering_does_not_export_but_portable_does_and_agrees(conv_rules):
  from backends.cpu import kernels
  if not kernels.available():
    pytest.skip("Kiln's CPU kernels do not build here")
  model = _cnn()
  forward, state = _forward(model), nnx.state(model)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  with pytest.raises(ValueError, match='KilnConvForward'):
    _export(forward, state, x)
  expected = jax.jit(forward)(state, x)  # The run's path: the compiled direct convs.
  with ops.portable():
    exported = _export(forward, state, x)
  text = exported.mlir_module()
  assert 'Kiln' not in text and 'custom_call' not in text.replace('Sharding', '')
  np.testing.assert_allclose(exported.call(state, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_default_cnn_exports_under_portable_and_equals_the_model(conv_rules):
  model = _cnn()
  forward, state = _forward(model), nnx.state(model)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  with ops.portable():
    exported = _export(forward, state, x)
  np.testing.assert_allclose(exported.call(state, x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # jax.export of a GPT and a run of the exported program.
def test_gpt_forward_exports_under_portable_and_equals_the_model():
  model = GPT(vocab_size=65, max_len=32, num_layers=2, num_heads=2, embed_dim=32,
              rngs=nnx.Rngs(0))
  forward, state = _forward(model), nnx.state(model)
  tokens = jax.random.randint(jax.random.key(2), (2, 32), 0, 65)
  if HAS_CPU_ROOM and ops.accelerated('causal_attention'):
    with pytest.raises(ValueError, match='KilnPackedAttention'):
      _export(forward, state, tokens)
  with ops.portable():
    assert not ops.accelerated('causal_attention')
    exported = _export(forward, state, tokens)
  assert 'Kiln' not in exported.mlir_module()
  np.testing.assert_allclose(exported.call(state, tokens), model(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_portable_causal_attention_equals_the_models_formulation():
  q, k, v = (jax.random.normal(key, (2, 40, 3, 8)) for key in jax.random.split(jax.random.key(3),
                                                                             3))
  heads_major = lambda t: t.transpose(0, 2, 1, 3)  # noqa: E731
  expected = heads_major(causal_attend(*map(heads_major, (q * 8 ** -0.5, k, v))))
  with ops.portable():
    np.testing.assert_allclose(ops.causal_attention(q * 8 ** -0.5, k, v), expected, rtol=1e-5,
                               atol=1e-6)
    dropped = ops.causal_attention(q, k, v, dropout_rate=0.5, key=jax.random.key(4))
    assert dropped.shape == q.shape and not np.allclose(dropped, ops.causal_attention(q, k, v))


def test_the_switch_rejects_bad_values_and_scopes_nest():
  backend = ml_collections.ConfigDict({'cpu_kernels': 'gpu'})
  with pytest.raises(KilnError, match=r"config.backend.cpu_kernels='gpu' must be one of auto, "
                                      r"xla, cpu"):
    ops.configure(backend)
  assert ops.mode() == 'auto'
  with ops.portable():
    assert ops.mode() == 'xla'
    assert not any(ops.accelerated(op) for op in ops.OPS)
    x = jnp.ones((2, 4, 4, 3))
    np.testing.assert_array_equal(ops.max_pool(x, (2, 2), (2, 2)),
                                  nnx.max_pool(x, (2, 2), (2, 2)))
  assert ops.mode() == 'auto'
  with pytest.raises(KilnError, match="backend op 'softmax' does not exist"):
    ops.register('softmax', jax.nn.softmax, platform='cpu')
  if not HAS_CPU_ROOM:
    with pytest.raises(KilnError, match=r"cpu_kernels='cpu' but no CPU backend is installed"):
      ops.configure(ml_collections.ConfigDict({'cpu_kernels': 'cpu'}))


# A fresh interpreter where backends/cpu/ cannot be found, as if the folder were deleted.
_WITHOUT_CPU_ROOM = """
import importlib.abc, sys
class Deleted(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == 'backends.cpu' or name.startswith('backends.cpu.'):
      raise ModuleNotFoundError(f"No module named '{name}'", name=name)
sys.meta_path.insert(0, Deleted())
import backends
backends.configure_host()
from backends import ops
print(backends.installed_cpu(), sorted(ops._REGISTRY), ops.accelerated('causal_attention'))
"""


@pytest.mark.slow  # A fresh interpreter.
def test_deleting_the_cpu_room_alone_leaves_plain_xla():
  done = subprocess.run([sys.executable, '-c', _WITHOUT_CPU_ROOM], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split()[-3:] == ['None', '[]', 'False']


def test_portable_erf_matches_float64_erf_and_uses_no_chlo():
  import math
  x = np.linspace(-6.0, 6.0, 20001, dtype=np.float32)
  expected = np.array([math.erf(v) for v in x.astype(np.float64)])
  with ops.portable():
    portable = jax.jit(ops.erf).lower(x)
  np.testing.assert_allclose(np.asarray(portable.compile()(x)), expected, atol=1e-6, rtol=0)
  assert 'chlo' not in portable.as_text()  # chlo.erf would serialize as a composite.
  np.testing.assert_array_equal(np.asarray(ops.erf(x)), np.asarray(jax.lax.erf(x)))
