"""backends.ops.lstm: the compiled CPU recurrence against the plain `lax.scan` (outputs and
gradients), in one and both directions with padding, inside the LSTM encoder, and sharded
over the batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from backends import ops
from core import logical_axes
from models.recurrent import LSTMEncoder
from parallel import sharding

# Skips the module where backends/cpu/ is deleted (plain XLA: nothing here to test).
cpu_kernels = pytest.importorskip('backends.cpu.kernels')

# Batch 11 splits into blocks of unequal rows; H = 24 leaves a partial column panel in the
# backward matmul ([4H, H]); lengths cover empty, one frame, partial and full utterances.
BATCH, LENGTH, FEATURES, HIDDEN = 11, 17, 5, 24
FRAMES = jnp.array([17, 0, 1, 9, 16, 17, 3, 12, 17, 5, 8])


def _inputs(directions: int, seed: int = 0):
  """-> (x, input kernel, mask, hidden kernels, out_grad, bias)."""
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (BATCH, LENGTH, FEATURES))
  input_kernel = jax.random.normal(keys[4], (FEATURES, directions * 4 * HIDDEN))
  kernels = 0.3 * jax.random.normal(keys[1], (directions, HIDDEN, 4 * HIDDEN))
  out_grad = jax.random.normal(keys[2], (BATCH, LENGTH, directions * HIDDEN))
  bias = jax.random.normal(keys[3], (directions * 4 * HIDDEN,))
  mask = jnp.arange(LENGTH)[None, :] < FRAMES[:, None]
  return x, input_kernel, mask, kernels, out_grad, bias


def _value_and_grads(mode: str, x, input_kernel, mask, kernels, out_grad, bias, reverse,
                     calls: int = 1):
  """(outputs, gradients) of the layer; a list of `calls` of them from one compiled program
  where calls > 1."""
  def lstm(x, input_kernel, kernels, bias):
    return ops.lstm(x, input_kernel, mask, kernels, reverse=reverse, bias=bias)

  def loss(*args):
    return (lstm(*args) * out_grad).sum()
  step = jax.jit(lambda *args: (lstm(*args), jax.grad(loss, (0, 1, 2, 3))(*args)))
  with ops.use(mode):  # Traced on the first call, so the mode holds.
    results = [step(x, input_kernel, kernels, bias) for _ in range(calls)]
  return results if calls > 1 else results[0]


# The bidirectional case runs both directions' code paths; the single ones are slow-tier.
@pytest.mark.parametrize('reverse', [pytest.param((False,), marks=pytest.mark.slow),
                                     pytest.param((True,), marks=pytest.mark.slow),
                                     (False, True)],
                         ids=['forward', 'reversed', 'bidirectional'])
def test_kernel_outputs_and_gradients_equal_the_scan(reverse):
  x, input_kernel, mask, kernels, out_grad, bias = _inputs(len(reverse))
  expected, expected_grads = _value_and_grads('xla', x, input_kernel, mask, kernels, out_grad,
                                              bias, reverse)
  ours, grads = _value_and_grads('cpu', x, input_kernel, mask, kernels, out_grad, bias, reverse)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
  padded = ~np.tile(np.asarray(mask)[..., None], (1, 1, len(reverse) * HIDDEN))
  assert not np.asarray(ours)[padded].any()  # Padded frames output exactly 0.
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(grads[2]).max()) > 0.1  # Gradients reach the hidden kernels.


def test_batch_blocks_add_their_kernel_gradients_in_a_fixed_order():
  """A batch that the kernel splits into blocks (one per pool thread, of at least 8 rows):
  each block's share of the kernels' gradients is computed a few column panels at a time by
  whichever thread is free, and the shares are added after. Gradients equal the scan's, and
  two calls give the same bits (which thread took a panel must not matter). H = 20: 4H = 80
  columns end in a partial column panel of the weight gradient on AVX-512, and in a task of
  one panel on AVX2."""
  batch, length, features, hidden = 37, 9, 7, 20
  keys = jax.random.split(jax.random.key(5), 5)
  x = jax.random.normal(keys[0], (batch, length, features))
  input_kernel = jax.random.normal(keys[1], (features, 4 * hidden)) / 2
  kernels = 0.3 * jax.random.normal(keys[2], (1, hidden, 4 * hidden))
  out_grad = jax.random.normal(keys[3], (batch, length, hidden))
  bias = jax.random.normal(keys[4], (4 * hidden,))
  mask = jnp.arange(length)[None, :] < (jnp.arange(batch) % (length + 1))[:, None]
  expected, expected_grads = _value_and_grads('xla', x, input_kernel, mask, kernels, out_grad,
                                              bias, (False,))
  (ours, grads), (_, again) = _value_and_grads('cpu', x, input_kernel, mask, kernels,
                                               out_grad, bias, (False,), calls=2)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  for first, second in zip(grads, again):
    np.testing.assert_array_equal(first, second)


@pytest.mark.slow  # Two encoders' compiles, forward and backward.
@pytest.mark.parametrize('bidirectional', [False, True], ids=['lstm', 'bilstm'])
def test_encoder_with_kernel_equals_encoder_without(bidirectional):
  """The whole encoder (frame stacking, stacked layers, head) on the kernel and on the
  scan: same parameters, same outputs, same gradients for every parameter."""
  model = LSTMEncoder(input_dim=FEATURES, num_outputs=7, hidden_dim=HIDDEN, num_layers=2,
                      bidirectional=bidirectional, frame_stack=2, dropout_rate=0.0,
                      rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  features = jax.random.normal(jax.random.key(1), (BATCH, LENGTH, FEATURES))
  target = jax.random.normal(jax.random.key(2), (BATCH, (LENGTH + 1) // 2, 7))

  def loss(params):
    outputs, frames = nnx.merge(graphdef, params)(features, FRAMES)
    return (outputs * target).sum(), (outputs, frames)
  results = {}
  for mode in ('xla', 'cpu'):
    with ops.use(mode):
      results[mode] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  (_, (expected, expected_frames)), expected_grads = results['xla']
  (_, (ours, frames)), grads = results['cpu']
  np.testing.assert_array_equal(frames, expected_frames)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(expected_grads)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.slow  # Compiles for an 8-device mesh.
def test_sharded_kernel_equals_one_device(devices):
  """Batch over 'data' x 'fsdp': each device runs the kernel on its own rows (shard_map),
  and outputs and gradients are those of one device."""
  mesh = Mesh(np.asarray(devices).reshape(4, 2, 1), ('data', 'fsdp', 'tensor'))
  rules = sharding.parse_rules([('batch', ('data', 'fsdp'))], mesh)
  keys = jax.random.split(jax.random.key(3), 5)
  x = jax.random.normal(keys[0], (16, LENGTH, FEATURES))
  input_kernel = jax.random.normal(keys[4], (FEATURES, 8 * HIDDEN))
  bias = jax.random.normal(keys[3], (8 * HIDDEN,))
  kernels = 0.3 * jax.random.normal(keys[1], (2, HIDDEN, 4 * HIDDEN))
  out_grad = jax.random.normal(keys[2], (16, LENGTH, 2 * HIDDEN))
  mask = jnp.arange(LENGTH)[None, :] < jnp.arange(16)[:, None] + 2

  def loss(x, input_kernel, kernels, bias):
    return (cpu_kernels.lstm(x, input_kernel, mask, kernels, reverse=(False, True), bias=bias)
            * out_grad).sum()
  args = (x, input_kernel, kernels, bias)
  expected, expected_grads = jax.value_and_grad(loss, (0, 1, 2, 3))(*args)
  with logical_axes.activate(mesh, rules):
    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3)))
    sharded, sharded_grads = step(*args)
    assert 'shard_map' in str(jax.make_jaxpr(step)(*args))
  np.testing.assert_allclose(sharded, expected, rtol=1e-5)
  for ours, reference in zip(sharded_grads, expected_grads):
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


def test_bad_shapes_name_the_problem():
  x, input_kernel, mask, kernels, _, _ = _inputs(2)
  with pytest.raises(Exception, match=r'lstm needs x \[B, T, F\], input kernel \[F, D\*4H\]'):
    cpu_kernels.lstm(x, input_kernel, mask, kernels, reverse=(False,))
  with pytest.raises(Exception, match=r'input kernel \[F, D\*4H\].*got.*\(6, 192\)'):
    cpu_kernels.lstm(x, jnp.zeros((FEATURES + 1, 8 * HIDDEN)), mask, kernels,
                     reverse=(False, True))
