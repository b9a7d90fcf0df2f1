"""backends.cpu.kernels: the compiled attention kernel against XLA's formulation, its dropout,
its sharding, and the Philox words behind the Transformer's dropout masks."""

import ctypes
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from core.errors import KilnError
from backends import ops
from models.transformer import causal_attend, rotary_tables
from core import logical_axes
from parallel import sharding
from tests.tiny import REPO

# Skips the module where backends/cpu/ is deleted (plain XLA: nothing here to test).
cpu_kernels = pytest.importorskip('backends.cpu.kernels')



def _heads_major(t):
  return t.transpose(0, 2, 1, 3)


def _xla_attention(q, k, v, drop=None):
  """The model's XLA path on token-major [B, T, N, H] arrays."""
  return _heads_major(causal_attend(*map(_heads_major, (q, k, v)), drop=drop))


def _qkv(shape, seed=0):
  q, k, v, g = (jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(seed), 4))
  return q * shape[-1] ** -0.5, k, v, g


# One row, one partial block, whole, ragged; 130 also has whole and partial blocks, so 50 and
# 64 are left to the slow tier.
@pytest.mark.parametrize('length', [1, pytest.param(50, marks=pytest.mark.slow),
                                    pytest.param(64, marks=pytest.mark.slow), 130])
@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_attention_and_gradients_equal_xla(length):
  q, k, v, g = _qkv((2, length, 3, 16))
  np.testing.assert_allclose(cpu_kernels.causal_attention(q, k, v), _xla_attention(q, k, v),
                             rtol=1e-5, atol=1e-5)
  kernel = jax.grad(lambda *a: (cpu_kernels.causal_attention(*a) * g).sum(), (0, 1, 2))
  xla = jax.grad(lambda *a: (_xla_attention(*a) * g).sum(), (0, 1, 2))
  for ours, reference in zip(jax.jit(kernel)(q, k, v), xla(q, k, v)):
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)
  assert cpu_kernels.causal_attention(q.astype(jnp.bfloat16), k, v).dtype == jnp.bfloat16


def _dropped_weights(q, k, key, rate):
  """The kernel's dropped attention weights [B, T, N, S], read out with v = identity."""
  batch, length, heads, _ = q.shape
  eye = jnp.broadcast_to(jnp.eye(length)[None, :, None, :], (batch, length, heads, length))
  return cpu_kernels.causal_attention(q, k, eye, dropout_rate=rate, key=key)


def test_attention_dropout_is_inverted_dropout_on_the_probabilities():
  batch, length, heads = 2, 96, 3
  q, k, _, _ = _qkv((batch, length, heads, length))
  key, rate = jax.random.key(3), 0.2
  dropped = _dropped_weights(q, k, key, rate)
  scores = jnp.einsum('btnh,bsnh->btns', q, k)
  visible = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
  probabilities = jax.nn.softmax(jnp.where(visible[None, :, None], scores, -jnp.inf), axis=-1)
  kept = dropped != 0
  scale = 65536 / cpu_kernels.keep_threshold(rate)
  np.testing.assert_allclose(dropped, jnp.where(kept, probabilities * scale, 0.0), atol=1e-6)
  visible_count = int(visible.sum()) * batch * heads
  keep_fraction = float(kept.sum()) / visible_count  # 14k draws: 4 sigma is 0.014.
  assert abs(keep_fraction - (1 - rate)) < 0.014, keep_fraction
  assert not bool(jnp.where(visible[None, :, None], False, kept).any())  # Future stays out.
  np.testing.assert_array_equal(_dropped_weights(q, k, key, rate), dropped)  # Same key.
  other = _dropped_weights(q, k, jax.random.key(4), rate) != 0
  assert float((other != kept).mean()) > 0.1  # Another key, another mask.
  assert (_dropped_weights(q, k, key, 0.0) != 0).sum() == visible_count  # Rate 0 keeps all.


@pytest.mark.slow  # Eager gradients through the kernel and through the reference.
def test_attention_dropout_gradients_use_the_forward_mask():
  q, k, v, g = _qkv((2, 70, 2, 16), seed=1)
  key = jax.random.key(5)
  wide = jnp.zeros((2, 70, 2, 70))  # Masks depend on positions only: read them out with
  mask = _heads_major((_dropped_weights(wide, wide, key, 0.3) != 0).astype(jnp.float32))  # H=T.
  scale = 65536 / cpu_kernels.keep_threshold(0.3)

  def replayed(w):  # The XLA path with the kernel's mask, block by block.
    rows, columns = w.shape[-2:]
    return w * mask[..., columns - rows:columns, :columns] * scale

  kernel = lambda *a: cpu_kernels.causal_attention(*a, dropout_rate=0.3, key=key)
  xla = lambda *a: _xla_attention(*a, drop=replayed)
  np.testing.assert_allclose(kernel(q, k, v), xla(q, k, v), rtol=1e-5, atol=1e-5)
  for ours, reference in zip(jax.grad(lambda *a: (kernel(*a) * g).sum(), (0, 1, 2))(q, k, v),
                             jax.grad(lambda *a: (xla(*a) * g).sum(), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


def test_sharded_attention_equals_one_device_masks_included(devices):
  """Batch over 'data' x 'fsdp' and heads over 'tensor': each device runs its shard, and
  its dropout masks are the single-device ones (counters are global)."""
  mesh = Mesh(np.asarray(devices).reshape(2, 2, 2), ('data', 'fsdp', 'tensor'))
  rules = sharding.parse_rules([('batch', ('data', 'fsdp')), ('heads', 'tensor')], mesh)
  q, k, v, g = _qkv((8, 40, 4, 16), seed=2)
  key = jax.random.key(6)

  def loss(q, k, v):
    return (cpu_kernels.causal_attention(q, k, v, dropout_rate=0.25, key=key) * g).sum()
  expected, expected_grads = jax.value_and_grad(loss, (0, 1, 2))(q, k, v)
  with logical_axes.activate(mesh, rules):
    sharded, sharded_grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)
  np.testing.assert_allclose(sharded, expected, rtol=1e-5)
  for ours, reference in zip(sharded_grads, expected_grads):
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


def _rotary_tables(length, dim):
  """The model's constant [T, H/2] tables for positions 0..T-1."""
  return rotary_tables(np.arange(length)[None], dim // 2)


def _unpacked(qkv, scale, rotary, **dropout):
  """The packed call's definition: q * scale, k and v sliced out of qkv, q and k turned."""
  q, k, v = (qkv[:, :, i] for i in range(3))
  if rotary is not None:
    q, k = ops.apply_rotary(q, *rotary), ops.apply_rotary(k, *rotary)
  return cpu_kernels.causal_attention(q * scale, k, v, **dropout)


@pytest.mark.parametrize('turned', [False, True])
def test_packed_attention_equals_its_definition_gradients_and_masks_included(turned):
  """Against the unpacked kernel on scaled, turned slices (same dropout masks), and without
  dropout against plain XLA (backends.ops' portable path)."""
  batch, length, heads, dim = 2, 21, 3, 16
  qkv, g = (jax.random.normal(key, shape) for key, shape in zip(
      jax.random.split(jax.random.key(9), 2),
      ((batch, length, 3, heads, dim), (batch, length, heads, dim))))
  rotary = _rotary_tables(length, dim) if turned else None
  scale = dim ** -0.5
  for dropout in ({}, {'dropout_rate': 0.3, 'key': jax.random.key(4)}):
    def packed(qkv):
      return (cpu_kernels.causal_attention_packed(qkv, scale=scale, rotary=rotary, **dropout)
              * g).sum()
    value, grad = jax.jit(jax.value_and_grad(packed))(qkv)
    expected, expected_grad = jax.value_and_grad(
        lambda qkv: (_unpacked(qkv, scale, rotary, **dropout) * g).sum())(qkv)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)
  with ops.use('xla'):
    xla_value, xla_grad = jax.value_and_grad(
        lambda qkv: (ops.causal_attention_packed(qkv, scale=scale, rotary=rotary) * g).sum())(qkv)
  value, grad = jax.value_and_grad(
      lambda qkv: (cpu_kernels.causal_attention_packed(qkv, scale=scale, rotary=rotary)
                   * g).sum())(qkv)
  np.testing.assert_allclose(value, xla_value, rtol=1e-5)
  np.testing.assert_allclose(grad, xla_grad, rtol=1e-4, atol=1e-5)


def test_sharded_packed_attention_equals_one_device(devices):
  mesh = Mesh(np.asarray(devices).reshape(2, 2, 2), ('data', 'fsdp', 'tensor'))
  rules = sharding.parse_rules([('batch', ('data', 'fsdp')), ('heads', 'tensor')], mesh)
  batch, length, heads, dim = 8, 24, 4, 8
  qkv = jax.random.normal(jax.random.key(2), (batch, length, 3, heads, dim))
  g = jax.random.normal(jax.random.key(3), (batch, length, heads, dim))
  rotary = _rotary_tables(length, dim)

  def loss(qkv):
    return (cpu_kernels.causal_attention_packed(qkv, scale=0.5, rotary=rotary,
                                                dropout_rate=0.25, key=jax.random.key(6))
            * g).sum()
  expected, expected_grad = jax.value_and_grad(loss)(qkv)
  with logical_axes.activate(mesh, rules):
    sharded, sharded_grad = jax.jit(jax.value_and_grad(loss))(qkv)
  np.testing.assert_allclose(sharded, expected, rtol=1e-5)
  np.testing.assert_allclose(sharded_grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_packed_attention_names_bad_shapes():
  with pytest.raises(KilnError, match=r'qkv \[B, T, 3, N, H\], got \(2, 5, 4, 8\)'):
    cpu_kernels.causal_attention_packed(jnp.zeros((2, 5, 4, 8)), scale=1.0)
  with pytest.raises(KilnError, match=r'rotary tables \[T, H/2\] = \[5, 4\]'):
    cpu_kernels.causal_attention_packed(jnp.zeros((2, 5, 3, 1, 8)), scale=1.0,
                                        rotary=_rotary_tables(6, 8))


def test_random_bits_are_uniform_and_reproducible():
  key = jax.random.key(0)
  words = np.asarray(jax.jit(cpu_kernels.random_bits, static_argnums=1)(key, (1000, 37)))
  assert words.shape == (1000, 37) and words.dtype == np.uint32
  np.testing.assert_array_equal(np.asarray(cpu_kernels.random_bits(key, (1000, 37))), words)
  bits = np.unpackbits(words.view(np.uint8)).reshape(-1, 32)
  assert np.abs(bits.mean(0) - 0.5).max() < 0.02  # 37k draws per bit: 4 sigma is 0.01.
  halves = np.concatenate([words & 0xFFFF, words >> 16]).ravel()
  histogram = np.bincount(halves >> 12, minlength=16) / halves.size  # 16 equal bins.
  assert np.abs(histogram - 1 / 16).max() < 0.005
  other = np.asarray(cpu_kernels.random_bits(jax.random.key(1), (1000, 37)))
  assert (other != words).mean() > 0.99


def test_kernel_dropout_keeps_the_rate_and_the_mean():
  from models.dropout import Dropout
  x = jnp.ones((64, 512))
  with ops.use('cpu'):
    y = Dropout(0.3)(x, deterministic=False, rngs=nnx.Rngs(dropout=0))
    again = Dropout(0.3)(x, deterministic=False, rngs=nnx.Rngs(dropout=0))
  assert abs(float((y == 0).mean()) - 0.3) < 0.01  # 33k draws: 4 sigma is 0.01.
  assert abs(float(y.mean()) - 1.0) < 0.02  # Kept values scaled by 1 / keep probability.
  np.testing.assert_array_equal(y, again)


@pytest.mark.slow  # Eager GPT gradients through both attention paths: ~8 s on 2 cores.
def test_gpt_with_kernels_equals_gpt_without():
  from models.transformer import GPT
  tokens = jax.random.randint(jax.random.key(1), (2, 80), 0, 65)

  def loss_and_grads(kernels):
    model = GPT(vocab_size=65, max_len=80, num_layers=2, num_heads=2, embed_dim=32,
                positions='rotary', rngs=nnx.Rngs(0))
    loss = lambda m: jax.nn.log_softmax(m(tokens)).mean()
    with ops.use(kernels):  # config.backend.cpu_kernels for this trace.
      assert ops.accelerated('causal_attention') == (kernels == 'cpu')
      value, grads = nnx.value_and_grad(loss)(model)
    return value, jax.tree.leaves(nnx.state(grads, nnx.Param))
  value, grads = loss_and_grads('cpu')
  expected, expected_grads = loss_and_grads('xla')
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  for ours, reference in zip(grads, expected_grads):
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-7)


def test_traced_positions_turn_slices_for_the_unpacked_kernel():
  """Positions unknown when tracing (a caller's own) have no constant tables for the packed
  kernel: q and k are turned by XLA and the unpacked kernel attends, as plain XLA does."""
  from models.transformer import GPT
  model = GPT(vocab_size=65, max_len=24, num_layers=1, num_heads=2, embed_dim=32,
              positions='rotary', rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 65)
  positions = jnp.broadcast_to(jnp.arange(16) + 5, (2, 16))

  def hidden(kernels):
    with ops.use(kernels):
      return jax.jit(lambda p: model.transformer(tokens, causal=True, positions=p)[0])(positions)
  np.testing.assert_allclose(hidden('cpu'), hidden('xla'), rtol=1e-5, atol=1e-5)


def test_bad_kernel_settings_name_the_fix(monkeypatch, tmp_path):
  with pytest.raises(KilnError, match=r"config.backend.cpu_kernels='gpu' must be one of auto, "
                                      r"xla, cpu"):
    with ops.use('gpu'):
      pass
  monkeypatch.setenv('CXX', 'no-such-compiler')
  monkeypatch.setenv('KILN_CACHE_DIR', str(tmp_path))
  with pytest.raises(KilnError, match=r"no C\+\+ compiler 'no-such-compiler' on PATH .*"
                                      r"config.backend.cpu_kernels='xla'"):
    cpu_kernels.build()
  assert list(tmp_path.iterdir()) == []  # Nothing half-built left behind.
  monkeypatch.delenv('CXX')
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  monkeypatch.setenv('KILN_CACHE_DIR', str(blocker / 'cache'))  # Cannot be created.
  monkeypatch.setattr(cpu_kernels, '_state', {})  # As in a fresh process.
  with pytest.raises(KilnError, match=r"could not be built or loaded .* set \$KILN_CACHE_DIR "
                                      r"to a writable folder, or set config.backend.cpu_kernels="
                                      r"'xla'"):
    with ops.use('cpu'):
      pass
  assert not cpu_kernels.available()  # 'auto' then falls back to XLA.
  assert not ops.accelerated('causal_attention') and not ops.accelerated('random_bits')


# Rows: one, several chunks with a ragged last one (I=5: 4,096 rows a chunk; I=300: 873);
# inputs: a partial register tile, whole tiles; outputs: a partial panel, whole panels and a
# ragged one; two directions side by side. The last three have x wider than g, so threads
# split out's rows instead of its panels.
@pytest.mark.parametrize('rows, inputs, outputs, directions', [
    (1, 3, 5, 1), (7000, 5, 70, 1), (300, 16, 64, 1), (96, 13, 40, 2), (300, 70, 5, 1),
    (2000, 300, 20, 1), (96, 40, 13, 2)])
def test_weight_grad_equals_the_xla_dot(rows, inputs, outputs, directions):
  x = jax.random.normal(jax.random.key(0), (rows, directions * inputs))
  g = jax.random.normal(jax.random.key(1), (rows, directions * outputs))
  expected = jnp.einsum('ndi,ndo->dio', x.reshape(rows, directions, inputs),
                        g.reshape(rows, directions, outputs), precision='highest')
  ours = cpu_kernels.weight_grad(x, g, directions)
  assert ours.shape == (directions, inputs, outputs)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.sqrt(rows))


def test_dense_layers_equal_xla_outputs_and_gradients():
  """nnx.Linear through ops.dot_general and ops.dense on 3-D inputs: the kernel's gradient
  path against plain XLA; bfloat16 and a contraction that is no dense layer's stay plain."""
  layer = nnx.Linear(24, 40, dot_general=ops.dot_general, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (3, 11, 24))
  g = jax.random.normal(jax.random.key(3), (3, 11, 40))

  def grads(kernels):
    with ops.use(kernels):
      assert ops.accelerated('dense') == (kernels == 'cpu')
      loss = lambda m, x: ((m(x) * g).sum() + (ops.dense(x, m.kernel[...]) * g).sum())
      return nnx.grad(loss, argnums=(0, 1))(layer, x)
  (model_grads, x_grad), (expected_model, expected_x) = grads('cpu'), grads('xla')
  np.testing.assert_allclose(x_grad, expected_x, rtol=1e-5, atol=1e-5)
  for ours, reference in zip(jax.tree.leaves(model_grads), jax.tree.leaves(expected_model)):
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)
  with ops.use('cpu'):
    half = jax.jit(ops.dense).lower(x.astype(jnp.bfloat16), layer.kernel[...].astype(
        jnp.bfloat16)).as_text()
    batched = jax.jit(lambda a, b: ops.dot_general(a, b, (((2,), (1,)), ((0,), (0,))))).lower(
        x, jnp.ones((3, 24, 5))).as_text()
    kernel_grad = jax.jit(jax.grad(lambda x, w: (ops.dense(x, w) * g).sum(), 1)).lower(
        x, layer.kernel[...]).as_text()
  assert 'KilnWeightGrad' in kernel_grad
  assert 'KilnWeightGrad' not in half and 'dot_general' in batched


def test_per_example_dense_gradients_under_vmap_equal_xla():
  """DP-SGD's per-example gradients (vmap of grad): XLA's batched dot, not one kernel call
  per example, with the same values."""
  x = jax.random.normal(jax.random.key(4), (5, 7, 12))
  w = jax.random.normal(jax.random.key(5), (12, 9))

  def per_example(kernels):
    with ops.use(kernels):
      one = jax.grad(lambda w, x: jnp.sum(jnp.sin(ops.dense(x, w))))
      step = jax.jit(jax.vmap(one, in_axes=(None, 0)))
      return step(w, x), step.lower(w, x).as_text()
  (ours, text), (expected, _) = per_example('cpu'), per_example('xla')
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
  assert 'KilnWeightGrad' not in text


@pytest.mark.parametrize('width, use_bias', [(128, False), (37, True)])
def test_layer_norm_equals_nnx_layer_norm_outputs_and_gradients(width, use_bias):
  """ops.LayerNorm through the kernel against nnx.LayerNorm's own code (the same parameters),
  3-D inputs; 37 features leave a partial vector on both instruction sets. Under 'xla' and
  for bfloat16 no kernel is lowered."""
  norm = ops.LayerNorm(width, use_bias=use_bias, rngs=nnx.Rngs(0))
  norm.scale[...] = jax.random.normal(jax.random.key(6), (width,))
  if use_bias:
    norm.bias[...] = jax.random.normal(jax.random.key(7), (width,))
  x = 2.0 * jax.random.normal(jax.random.key(8), (3, 11, width)) + 0.5
  g = jax.random.normal(jax.random.key(9), (3, 11, width))
  loss = lambda m, x: (m(x) * g).sum()

  def run(kernels):
    with ops.use(kernels):
      step = jax.jit(nnx.value_and_grad(loss, argnums=(0, 1)))
      return step(norm, x), step.lower(norm, x).as_text()
  ((value, (grads, x_grad)), text), ((expected, (expected_grads, expected_x)), plain) = (
      run('cpu'), run('xla'))
  np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(x_grad, expected_x, rtol=1e-5, atol=1e-5)
  for ours, reference in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)
  assert 'KilnLayerNormForward' in text and 'KilnLayerNormBackward' in text
  assert 'KilnLayerNorm' not in plain
  with ops.use('cpu'):
    half = jax.jit(lambda x: norm(x)).lower(x.astype(jnp.bfloat16)).as_text()
  assert 'KilnLayerNorm' not in half


def test_weight_grad_rejects_mismatched_shapes():
  with pytest.raises(KilnError, match=r'weight_grad needs x \[N, D\*I\] and g \[N, D\*O\] '
                                      r'with D=2, got \(4, 3\) and \(4, 6\)'):
    cpu_kernels.weight_grad(jnp.ones((4, 3)), jnp.ones((4, 6)), 2)


@pytest.mark.slow  # Seven small compiles: ~6 s.
def test_gradients_are_the_same_bits_call_after_call():
  """The kernels that sum over a batch (conv kernel gradients, narrow and general, and the
  LayerNorm's scale and bias gradients) once summed per thread in the order the threads
  happened to take the items: 6, 50 and 42 of 50 calls on one input differed from the first
  in the last bits, and so did two same-seed training runs. The others ride along."""
  keys = jax.random.split(jax.random.key(11), 9)
  geometry = ((1, 1), ((1, 1), (1, 1)), (1, 1))
  narrow_x, wide_x = jax.random.normal(keys[0], (64, 8, 8, 1)), jax.random.normal(
      keys[1], (64, 8, 8, 32))
  conv_grad = jax.random.normal(keys[2], (64, 8, 8, 64))
  norm_x = jax.random.normal(keys[3], (512, 384))
  weights = jnp.arange(384.0)
  q, k, v, g = _qkv((4, 40, 2, 16))
  lstm_x = jax.random.normal(keys[4], (8, 12, 5))
  lstm_kernels = jax.random.normal(keys[5], (2, 8, 32)) / 4
  lstm_input_kernel = jax.random.normal(keys[6], (5, 64)) / 4
  mask = jnp.arange(12)[None, :] < jnp.array([12, 3, 9, 12, 1, 7, 12, 5])[:, None]

  def norm_loss(scale, bias):
    return (cpu_kernels.layer_norm(norm_x, scale, bias, 1e-5) ** 2 * weights).sum()

  def lstm_loss(input_kernel, kernels):
    out = cpu_kernels.lstm(lstm_x, input_kernel, mask, kernels, reverse=(False, True))
    return (out * jnp.cos(jnp.arange(16.0))).sum()

  calls = {
      'narrow conv': jax.jit(lambda: cpu_kernels.conv2d_kernel_grad(
          narrow_x, conv_grad[..., :32], (3, 3, 1, 32), *geometry)),
      'general conv': jax.jit(lambda: cpu_kernels.conv2d_kernel_grad(
          wide_x, conv_grad, (3, 3, 32, 64), *geometry)),
      'conv input': jax.jit(lambda: cpu_kernels.conv2d_input_grad(
          conv_grad, jax.random.normal(keys[7], (3, 3, 32, 64)), wide_x.shape, *geometry)),
      'layer norm': jax.jit(lambda: jax.grad(norm_loss, argnums=(0, 1))(
          jnp.ones(384), jnp.zeros(384))),
      'attention': jax.jit(lambda: jax.grad(
          lambda q, k, v: (cpu_kernels.causal_attention(q, k, v) * g).sum(),
          argnums=(0, 1, 2))(q, k, v)),
      'lstm': jax.jit(lambda: jax.grad(lstm_loss, argnums=(0, 1))(lstm_input_kernel,
                                                                  lstm_kernels)),
      'weight grad': jax.jit(lambda: cpu_kernels.weight_grad(norm_x, conv_grad.reshape(-1, 64)[
          :512])),
  }
  for name, call in calls.items():
    first = [np.asarray(leaf) for leaf in jax.tree.leaves(call())]
    for _ in range(20):
      again = [np.asarray(leaf) for leaf in jax.tree.leaves(call())]
      for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b, err_msg=name)


LOWER_ISA = ('-mno-avx512f',)  # The AVX2 (and scalar) paths of csrc/cpu_kernels.cc.
# Attention, dropout and Philox checks above, every conv lowering against native (direct =
# the compiled kernel) and the LSTM recurrence against its scan, rerun against the
# lower-instruction-set build.
_RECHECKED = [f'tests/test_cpu_kernels.py::test_{name}' for name in (
    'attention_and_gradients_equal_xla', 'attention_dropout_is_inverted_dropout_on_the_'
    'probabilities', 'attention_dropout_gradients_use_the_forward_mask',
    'random_bits_are_uniform_and_reproducible', 'gpt_with_kernels_equals_gpt_without',
    'packed_attention_equals_its_definition_gradients_and_masks_included',
    'weight_grad_equals_the_xla_dot', 'dense_layers_equal_xla_outputs_and_gradients',
    'per_example_dense_gradients_under_vmap_equal_xla',
    'layer_norm_equals_nnx_layer_norm_outputs_and_gradients')] + [
    'tests/test_conv.py::test_lowerings_match_native_outputs_and_gradients',
    'tests/test_lstm_kernel.py::test_kernel_outputs_and_gradients_equal_the_scan']


def _narrow_conv(kernels):
  """A 3-channel 7x7/2 stem with 80 features (the narrow conv's vector tiles and their
  remainder), output and kernel gradient."""
  x = jax.random.normal(jax.random.key(3), (3, 13, 11, 3))
  w = jax.random.normal(jax.random.key(4), (7, 7, 3, 80))
  g = jax.random.normal(jax.random.key(5), (3, 7, 6, 80))
  geometry = ((2, 2), ((3, 3), (3, 3)), (1, 1))
  return {'narrow_conv': kernels.conv2d(x, w, g.shape, *geometry),
          'narrow_kernel_grad': kernels.conv2d_kernel_grad(x, g, w.shape, *geometry)}


_DUMP = """
import sys
import jax, numpy as np
from backends.cpu import kernels
from tests.test_cpu_kernels import _narrow_conv
q, k, v = (jax.random.normal(key, (2, 70, 3, 16)) for key in jax.random.split(jax.random.key(0), 3))
x = jax.random.normal(jax.random.key(1), (4, 9, 9, 8))
w = jax.random.normal(jax.random.key(2), (3, 3, 8, 16))
np.savez(sys.argv[1], library=kernels.build(),
         bits=kernels.random_bits(jax.random.key(7), (999, 33)),
         attention=kernels.causal_attention(q, k, v, dropout_rate=0.25, key=jax.random.key(8)),
         conv=kernels.conv2d(x, w, (4, 5, 5, 16), (2, 2), ((1, 1), (1, 1)), (1, 1)),
         **_narrow_conv(kernels))
"""


@pytest.fixture(scope='module')
def lower_isa_cache(tmp_path_factory):
  """A cache folder holding the kernels built with LOWER_ISA (one ~20 s build per session)."""
  cache = tmp_path_factory.mktemp('kiln_cache_lower_isa')
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('KILN_CACHE_DIR', str(cache))
    library = cpu_kernels.build(LOWER_ISA)
  return cache, library


@pytest.mark.slow
def test_build_for_a_lower_instruction_set_is_keyed_apart_and_computes_the_same(lower_isa_cache,
                                                                             tmp_path):
  if not cpu_kernels.available():
    pytest.skip("Kiln's CPU kernels do not build here")
  cache, library = lower_isa_cache
  compiler = os.environ.get('CXX') or 'g++'
  lower = cpu_kernels.target_fingerprint(compiler, LOWER_ISA)
  assert b'__AVX512F__' not in lower and b'__AVX2__' in lower
  host = cpu_kernels.target_fingerprint(compiler)
  # Extra flags are part of the key, so the two builds never share a file on any host.
  assert os.path.basename(library) != os.path.basename(cpu_kernels.build())
  if b'__AVX512F__' in host:  # The resolved instruction sets differ too: a host without
    assert host != lower  # AVX-512 sharing this cache never loads the AVX-512 library.
  env = dict(os.environ, KILN_CACHE_DIR=str(cache),
             **{cpu_kernels.ARCH_FLAGS_ENV: ' '.join(LOWER_ISA)})
  # Each build registers the same FFI names, so the lower one runs in its own processes.
  dump = tmp_path / 'lower.npz'
  subprocess.run([sys.executable, '-c', _DUMP, str(dump)], cwd=REPO, env=env, check=True,
                 timeout=600)
  lower_results = np.load(dump, allow_pickle=False)
  assert str(lower_results['library']) == library  # The fixture's build, found by its key.
  # The lower build runs 8-float AVX2 registers, not the portable fallback.
  assert ctypes.CDLL(library).KilnVectorLanes() == 8
  assert ctypes.CDLL(cpu_kernels.build()).KilnVectorLanes() == (
      16 if b'__AVX512F__' in host else 8 if b'__AVX2__' in host else 0)
  np.testing.assert_array_equal(lower_results['bits'],
                                cpu_kernels.random_bits(jax.random.key(7), (999, 33)))
  q, k, v = (jax.random.normal(key, (2, 70, 3, 16))
             for key in jax.random.split(jax.random.key(0), 3))
  np.testing.assert_allclose(
      lower_results['attention'],
      cpu_kernels.causal_attention(q, k, v, dropout_rate=0.25, key=jax.random.key(8)),
      rtol=1e-5, atol=1e-6)
  x = jax.random.normal(jax.random.key(1), (4, 9, 9, 8))
  w = jax.random.normal(jax.random.key(2), (3, 3, 8, 16))
  np.testing.assert_allclose(
      lower_results['conv'],
      cpu_kernels.conv2d(x, w, (4, 5, 5, 16), (2, 2), ((1, 1), (1, 1)), (1, 1)),
      rtol=1e-5, atol=1e-5)
  for name, values in _narrow_conv(cpu_kernels).items():
    np.testing.assert_allclose(lower_results[name], values, rtol=1e-5, atol=1e-4, err_msg=name)
  result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                           *_RECHECKED], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert ' failed' not in result.stdout and ' passed' in result.stdout
  assert sorted(p.name for p in cache.glob('*.so')) == [os.path.basename(library)]
