"""models/conv.py, backends/cpu/conv_lowering.py and backends/cpu/max_pool.py: every conv
lowering is the same function as `lax.conv_general_dilated` (outputs and both gradients),
the per-shape choice between them, and max_pool equals nnx.max_pool, ties included."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from backends import ops
from core.errors import KilnError
from models import layers
from models.conv import Conv

# Skips the module where backends/cpu/ is deleted (plain XLA: no lowerings to compare).
conv_lowering = pytest.importorskip('backends.cpu.conv_lowering')
cpu_kernels = pytest.importorskip('backends.cpu.kernels')
cpu_max_pool = pytest.importorskip('backends.cpu.max_pool')

# (input shape N,*spatial,C; kernel spatial; C_out; strides; padding; dilation; groups)
CASES = [
    ((2, 9, 9, 3), (1, 1), 5, (1, 1), 'SAME', (1, 1), 1),
    ((2, 9, 9, 3), (1, 1), 5, (2, 2), 'VALID', (1, 1), 1),
    ((2, 8, 8, 4), (3, 3), 6, (1, 1), 'SAME', (1, 1), 1),
    ((2, 8, 8, 4), (3, 3), 6, (2, 2), 'SAME', (1, 1), 1),
    ((2, 9, 7, 4), (3, 3), 6, (2, 2), 'VALID', (1, 1), 1),
    ((2, 8, 8, 4), (3, 3), 6, (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
    ((2, 8, 8, 4), (3, 3), 6, (2, 2), ((1, 1), (1, 1)), (1, 1), 1),  # torchvision stride 2
    # The 7x7 cases compile longest: the ResNet stem stays in the fast tier, the rest are slow.
    pytest.param(((2, 11, 11, 3), (7, 7), 4, (2, 2), 'SAME', (1, 1), 1), marks=pytest.mark.slow),
    ((2, 16, 16, 3), (7, 7), 4, (2, 2), ((3, 3), (3, 3)), (1, 1), 1),  # ResNet stem
    pytest.param(((2, 12, 12, 3), (7, 7), 4, (1, 1), 'VALID', (1, 1), 1), marks=pytest.mark.slow),
    ((2, 9, 9, 4), (3, 3), 6, (1, 1), 'SAME', (2, 2), 1),
    ((2, 9, 9, 4), (3, 3), 6, (2, 2), 'VALID', (2, 1), 1),
    ((2, 8, 8, 6), (3, 3), 4, (1, 1), 'SAME', (1, 1), 2),  # grouped
    ((2, 8, 8, 6), (3, 3), 6, (2, 2), 'SAME', (1, 1), 3),
    ((2, 8, 8, 4), (3, 3), 4, (1, 1), 'SAME', (1, 1), 4),  # depthwise
    ((2, 8, 8, 4), (3, 3), 8, (2, 2), 'SAME', (2, 2), 4),  # depthwise, multiplier 2
    ((2, 1, 1, 8), (3, 3), 6, (1, 1), 'SAME', (1, 1), 1),  # only the centre tap is live
    ((2, 2, 2, 8), (3, 3), 6, (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
    ((2, 2, 2, 8), (3, 3), 6, (2, 2), ((1, 1), (1, 1)), (1, 1), 1),
    ((2, 4, 4, 8), (3, 3), 6, (2, 2), 'SAME', (1, 1), 1),
    ((2, 3, 2, 8), (2, 3), 6, (1, 2), ((0, 1), (2, 0)), (1, 1), 1),  # uneven pads
    ((2, 16, 4), (3,), 6, (1,), 'SAME', (1,), 1),  # 1D (speech front ends)
    ((2, 16, 4), (5,), 4, (1,), ((4, 0),), (2,), 4),  # causal depthwise (Conformer)
    ((2, 5, 5, 5, 2), (3, 3, 3), 3, (2, 1, 1), 'SAME', (1, 1, 1), 1),  # 3D
    # Batches past the direct kernel's shared-patches size (256 output pixels): threads
    # take tiles of whole images and sum their own kernel gradients.
    ((40, 8, 8, 4), (3, 3), 6, (1, 1), 'SAME', (1, 1), 1),
    ((40, 6, 6, 4), (1, 1), 6, (1, 1), 'VALID', (1, 1), 1),  # the input is the patches
    ((300, 2, 2, 4), (3, 3), 6, (2, 2), 'SAME', (1, 1), 1),  # live taps not contiguous
    ((24, 40, 4), (5,), 6, (2,), 'SAME', (2,), 1),
    # Tiles whose output rows split into row classes by their live tap rows: edge rows
    # multiply only their own taps; the second has an output row that reads only padding.
    ((32, 4, 16, 4), (3, 3), 6, (1, 1), 'SAME', (1, 1), 1),
    ((64, 3, 4, 4), (3, 3), 6, (1, 1), ((3, 1), (1, 1)), (1, 1), 1),
    # Few input channels and outputs in whole 16-float vectors take the direct kernel's
    # implicit GEMM: 6-pixel tiles (64 outputs: a remainder of 4), 64-feature blocks (80: a
    # remainder of 16), 6-tap blocks (147, 75, 9 taps), dilation, an input that VALID
    # windows do not reach to the end of (10 wide, windows read 9), and images of more
    # pixels than one kernel-gradient sweep takes.
    pytest.param(((3, 16, 16, 3), (7, 7), 64, (2, 2), ((3, 3), (3, 3)), (1, 1), 1),  # ResNet stem
                 marks=pytest.mark.slow),
    ((2, 10, 10, 3), (5, 5), 80, (2, 2), 'VALID', (1, 1), 1),
    ((2, 11, 9, 1), (3, 3), 48, (1, 1), 'SAME', (2, 2), 1),
    ((2, 40, 2), (5,), 32, (2,), 'SAME', (1,), 1),
    ((1, 33, 33, 1), (3, 3), 16, (1, 1), 'SAME', (1, 1), 1),  # 1,089 pixels: 2 gradient sweeps
]


def _native(x, k, strides, padding, dilation, groups):
  layout = nnx.nn.linear._conv_dimension_numbers(x.shape)
  return lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=layout, feature_group_count=groups)


def _spec(input_shape, kernel_shape, strides, padding) -> conv_lowering.ConvSpec:
  x, k = jnp.zeros(input_shape), jnp.zeros(kernel_shape)
  return conv_lowering.channels_last_spec(
      x, k, strides, padding, dimension_numbers=nnx.nn.linear._conv_dimension_numbers(x.shape))


def _value_and_grads(fn, x, k, cotangent):
  y, vjp = jax.vjp(fn, x, k)
  return (y,) + vjp(cotangent)


@pytest.mark.parametrize('case', CASES,
                         ids=lambda c: f'{c[0]}-k{c[1]}-s{c[3]}-{c[4]}-d{c[5]}-g{c[6]}')
@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_lowerings_match_native_outputs_and_gradients(case):
  shape, kernel_size, c_out, strides, padding, dilation, groups = case
  rng = np.random.default_rng(len(str(case)))
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  k = jnp.asarray(rng.standard_normal(kernel_size + (shape[-1] // groups, c_out)), jnp.float32)
  layout = nnx.nn.linear._conv_dimension_numbers(x.shape)
  spec = conv_lowering.channels_last_spec(x, k, strides, padding, rhs_dilation=dilation,
                                          dimension_numbers=layout, feature_group_count=groups)
  names = conv_lowering.candidates(spec)
  assert 'im2col' in names
  plans = [conv_lowering.Plan.uniform(n) for n in names[1:]]
  plans.append(conv_lowering.Plan(names[-1], 'native', 'im2col'))  # passes mixed
  if cpu_kernels.arch_flags():
    # test_cpu_kernels' recheck of a lower-instruction-set build: only the kernel's plans run
    # code those flags compiled (the rest are XLA's, checked by the suite itself).
    plans = [plan for plan in plans if 'direct' in dataclasses.astuple(plan)]
    if not plans:
      pytest.skip('no plan runs the direct kernel for this case')
  cotangent = jnp.asarray(rng.standard_normal(
      (shape[0],) + spec.out_spatial + (c_out,)), jnp.float32)

  @jax.jit  # One program for the reference and every plan: one compile per case.
  def outputs_and_grads(x, k):
    results = [_value_and_grads(lambda x, k: _native(x, k, strides, padding, dilation, groups),
                                x, k, cotangent)]
    for plan in plans:
      results.append(_value_and_grads(
          lambda x, k, plan=plan: conv_lowering.convolve(x, k, spec, plan), x, k, cotangent))
    return results

  expected, *got = outputs_and_grads(x, k)
  for plan, values in zip(plans, got):
    for what, want, have in zip(('output', 'input grad', 'kernel grad'), expected, values):
      assert have.shape == want.shape, (plan, what)
      np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-4, err_msg=f'{plan} {what}')


def test_dense_covers_the_small_maps_and_drops_padding_only_taps():
  spec = _spec((4, 1, 1, 8), (3, 3, 8, 8), (1, 1), 'SAME')
  assert spec.live_taps() == [(1, 1)]  # A 3x3 conv on a 1x1 map is its centre tap.
  assert 'dense' in conv_lowering.candidates(spec)
  big = _spec((4, 8, 8, 8), (3, 3, 8, 8), (1, 1), 'SAME')
  assert len(big.live_taps()) == 9 and 'dense' not in conv_lowering.candidates(big)


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_conv_layer_keeps_nnx_conv_parameters_and_outputs(monkeypatch):
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  reference = nnx.Conv(3, 5, (3, 3), strides=2, rngs=nnx.Rngs(0))
  for lowering in ('auto',) + conv_lowering.LOWERINGS:
    monkeypatch.setenv(conv_lowering.MODE_ENV, lowering)  # Forced on every conv (eager here).
    layer = Conv(3, 5, (3, 3), strides=2, rngs=nnx.Rngs(0))
    assert jax.tree.map(jnp.shape, nnx.state(layer)) == jax.tree.map(jnp.shape,
                                                                      nnx.state(reference))
    np.testing.assert_allclose(layer(x), reference(x), rtol=1e-5, atol=1e-5)
  with pytest.raises(KilnError, match="conv lowering 'winograd' does not exist"):
    conv_lowering.conv_general_dilated(x, reference.kernel[...], (2, 2), 'SAME',
                                       lowering='winograd')


def test_accelerators_take_native_and_cpu_rules_pick_gemm_forms(monkeypatch):
  monkeypatch.setenv(conv_lowering.MODE_ENV, 'rules')
  tiny = _spec((8, 2, 2, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1)))
  one_by_one = _spec((8, 8, 8, 16), (1, 1, 16, 32), (2, 2), 'VALID')
  for spec in (tiny, one_by_one):
    assert str(conv_lowering.choose(spec, backend='gpu')) == 'native'
    assert str(conv_lowering.choose(spec, backend='tpu')) == 'native'
  assert str(conv_lowering.choose(tiny, backend='cpu')) == 'dense'  # every pixel pair a tap
  assert str(conv_lowering.choose(one_by_one, backend='cpu')) == 'direct'
  centre_tap = _spec((8, 1, 1, 16), (3, 3, 16, 16), (1, 1), 'SAME')  # no padding multiplied
  assert str(conv_lowering.choose(centre_tap, backend='cpu')) == 'direct'
  monkeypatch.setattr(cpu_kernels, 'available', lambda: False)  # e.g. no C++ compiler
  assert str(conv_lowering.choose(one_by_one, backend='cpu')) == 'im2col'
  assert str(conv_lowering.choose(centre_tap, backend='cpu')) == 'dense'
  monkeypatch.setenv(conv_lowering.MODE_ENV, 'auto')  # 8 fake devices: shards, so native
  assert str(conv_lowering.choose(tiny, backend='cpu')) == 'native'
  monkeypatch.setenv(conv_lowering.MODE_ENV, 'native')  # forced, e.g. to compare
  assert str(conv_lowering.choose(tiny, backend='cpu')) == 'native'
  monkeypatch.setenv(conv_lowering.MODE_ENV, 'dense')  # forced where it cannot apply
  assert str(conv_lowering.choose(one_by_one, backend='cpu')) == 'im2col'
  monkeypatch.setenv(conv_lowering.MODE_ENV, 'sometimes')
  with pytest.raises(KilnError, match="KILN_CONV_LOWERING='sometimes' is not"):
    conv_lowering.choose(tiny, backend='cpu')


def test_auto_takes_the_rule_table_only_on_the_instruction_set_it_was_measured_on(monkeypatch):
  if not cpu_kernels.available():
    pytest.skip("Kiln's CPU kernels do not build here")
  assert conv_lowering.auto_mode('cpu', cpu_devices=8) == 'native'  # shards: XLA's own
  assert conv_lowering.auto_mode('gpu', cpu_devices=1) == 'native'
  host_isa, host_key = conv_lowering.instruction_set(), conv_lowering._machine_key()
  assert conv_lowering.auto_mode('cpu', cpu_devices=1) == (
      'rules' if host_isa in conv_lowering.RULE_TABLE_ISAS else 'measure')
  # An AVX2 build (as on an AVX2-only host) has no table: each shape is timed, and cached
  # apart from the AVX-512 build's timings.
  monkeypatch.setenv(cpu_kernels.ARCH_FLAGS_ENV, '-mno-avx512f')
  assert conv_lowering.instruction_set() == 'AVX2'
  assert conv_lowering.auto_mode('cpu', cpu_devices=1) == 'measure'
  assert conv_lowering.auto_source().startswith('timed per shape on this host (no rule table '
                                                'measured on AVX2')
  assert (conv_lowering._machine_key() != host_key) == (host_isa != 'AVX2')


@pytest.mark.slow  # Times each lowering (a small benchmark).
def test_measured_choice_is_cached_on_disk(monkeypatch, tmp_path):
  monkeypatch.setenv('KILN_CACHE_DIR', str(tmp_path))
  monkeypatch.setenv(conv_lowering.MODE_ENV, 'measure')  # auto keeps native on 8 devices
  monkeypatch.setattr(conv_lowering, '_CHOICES', {})
  spec = _spec((4, 2, 2, 8), (3, 3, 8, 8), (1, 1), 'SAME')
  measured = []
  real_measure = conv_lowering.measure
  monkeypatch.setattr(conv_lowering, 'measure',
                      lambda *a, **kw: measured.append(1) or real_measure(*a, **kw))
  # Chosen while a jitted function is being traced, as nnx.Conv does.
  jax.jit(lambda x: x + len(str(conv_lowering.choose(spec, 'cpu'))))(1.0)
  choice = conv_lowering.choose(spec, 'cpu')
  cached = json.loads((tmp_path / conv_lowering.CACHE_FILE).read_text())
  (entry,) = cached.values()
  assert set(entry['seconds']) == set(conv_lowering.PASSES)
  for name, seconds in zip(entry['plan'], entry['seconds'].values()):
    assert set(seconds) == set(conv_lowering.candidates(spec))
    assert name == min(seconds, key=seconds.get)
  assert list(dataclasses.astuple(choice)) == entry['plan']
  monkeypatch.setattr(conv_lowering, '_CHOICES', {})  # A new process reads the disk cache.
  assert conv_lowering.choose(spec, 'cpu') == choice and len(measured) == 1


@pytest.mark.parametrize('window,strides,padding,shape', [
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (2, 10, 10, 3)),  # ResNet's ImageNet stem
    ((2, 2), (2, 2), 'VALID', (2, 9, 8, 3)),  # models/cnn.py
    ((3, 2), (1, 2), 'SAME', (2, 7, 5, 2)),
])
def test_max_pool_matches_nnx_with_ties(window, strides, padding, shape):
  rng = np.random.default_rng(0)
  # ReLU'd, rounded values: most windows hold ties, whose gradient goes to one input.
  x = jnp.asarray(np.maximum(np.round(rng.standard_normal(shape)), 0), jnp.float32)
  reference = lambda x: nnx.max_pool(x, window, strides, padding)  # noqa: E731
  ours = lambda x: cpu_max_pool.max_pool(x, window, strides, padding)  # noqa: E731
  assert layers.max_pool is ops.max_pool  # Models reach the rewrite through backends.ops.
  y, vjp = jax.vjp(ours, x)
  want_y, want_vjp = jax.vjp(reference, x)
  g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  np.testing.assert_array_equal(y, want_y)
  np.testing.assert_allclose(jax.jit(vjp)(g)[0], want_vjp(g)[0], rtol=1e-6, atol=1e-6)
