"""Quantisation (compress/quantize.py): per-channel int8 against its NumPy formula, the
straight-through gradient, every PTQ mode against the float model on a tiny trained CNN
(agreement, stored dtypes and bytes, jax.export), and quantisation-aware training (it
trains, int8_static of it is its eval forward, resume is exact, FSDP equals one device)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from backends import ops
from compress import quantize as quantize_lib
from core.errors import KilnError
from export import artifact
from loop import fields
from tests.checkpoints import latest_state
from loop.state import ModelTemplate
from loop.training import train_and_evaluate
from models.conv import Conv
from tests.stepping import host_batches, run_steps
from tests.tiny import tiny_config

INT8_MODES = ('int8', 'int8_dynamic', 'int8_static')


def _numpy_int8(w, fan_in_axes):
  """Symmetric per-output-channel int8: scale = absmax / 127 over the fan-in dims."""
  scale = np.abs(w).max(axis=fan_in_axes, keepdims=True) / 127.0
  return np.clip(np.round(w / np.where(scale > 0, scale, 1)), -127, 127), scale


@pytest.mark.parametrize('shape, layout, axes', [
    ((6, 5), (0, 1), (0,)),  # Dense [in, out].
    ((3, 3, 4, 5), (0, 3), (0, 1, 2)),  # Conv [kh, kw, in, out].
    ((2, 6, 3, 4), (1, 1), (1,)),  # Scanned fused projection [L, E, 3, H]: per layer, per column.
])
def test_channel_scales_are_absmax_over_fan_in_per_output_channel(shape, layout, axes):
  w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  w[..., 0] = 0.0  # An all-zero channel: scale 0, codes 0, no NaN.
  codes, scale = quantize_lib.quantize_kernel(jnp.asarray(w), layout)
  expected_codes, expected_scale = _numpy_int8(w, axes)
  assert codes.dtype == jnp.int8 and scale.dtype == jnp.float32
  np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
  np.testing.assert_array_equal(codes, expected_codes)
  restored = quantize_lib.dequantize_kernel(codes, scale, jnp.float32)
  assert np.all(np.abs(restored - w) <= expected_scale / 2 + 1e-7)


def test_fake_quant_gradient_is_one_inside_the_range():
  w = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, size=(4, 6)), jnp.float32)
  scale = jnp.full((1, 6), 1 / 127, jnp.float32)
  np.testing.assert_allclose(quantize_lib.fake_quant(w, scale),
                             np.round(np.asarray(w) * 127) / 127, atol=1e-7)
  grad = jax.grad(lambda w: jnp.sum(quantize_lib.fake_quant(w, scale)))(w)
  np.testing.assert_array_equal(grad, np.ones_like(w))


def _layer(kind: str, rngs: nnx.Rngs):
  if kind == 'conv':
    return Conv(4, 5, (3, 3), rngs=rngs,
                kernel_metadata={'logical_axes': (None, None, 'conv_in', 'conv_out')})
  return nnx.Linear(6, 5, rngs=rngs, kernel_metadata={'logical_axes': ('embed', 'mlp')})


class _Single(nnx.Module):
  def __init__(self, kind, rngs):
    self.layer = _layer(kind, rngs)

  def __call__(self, x, *, train=False):
    return self.layer(x)


def _qwix_fake_quant(a, axes):
  """qwix's symmetric int8 (QAT and the qwix PTQ modes): scale = absmax / 127.5 over `axes`,
  codes round(a / scale) in [-128, 127] (its top bucket spans [126.5, 127.5))."""
  scale = np.abs(a).max(axis=axes, keepdims=True) / 127.5
  return (np.clip(np.round(a / scale), -128, 127) * scale).astype(np.float32)


def _with_exact_scale(a, per_column: bool, exponent: int):
  """`a` rescaled so that its absmax (per last-axis column, or overall) is -127.5 * 2^exponent:
  scales are powers of two, so a / scale has no rounding ties left to the order of float
  operations, but for that one element, which rounds to -128 everywhere."""
  top = np.abs(a).max(axis=tuple(range(a.ndim - 1)) if per_column else None, keepdims=True)
  a = a / top * (127.0 * 2.0 ** exponent)
  a[(0,) * (a.ndim - 1) if per_column else (0,) * a.ndim] = -127.5 * 2.0 ** exponent
  return a.astype(np.float32)


@pytest.mark.parametrize('kind, input_shape, fan_in_axes', [
    ('conv', (2, 5, 5, 4), (0, 1, 2)), ('dense', (3, 6), (0,))])
@pytest.mark.slow  # Seconds of compiles: the fast tier stays under 3 minutes.
def test_qat_layer_uses_per_channel_int8_weights_with_straight_through_gradients(
    kind, input_shape, fan_in_axes):
  rng = np.random.default_rng(2)
  template = ModelTemplate(lambda rngs: quantize_lib.qat_model(
      _Single(kind, rngs), '', lambda m: m(jnp.zeros((1, *input_shape[1:])))))
  params, rest = template.split(template.build_model(nnx.Rngs(0)))
  kernel = _with_exact_scale(rng.normal(size=params['layer']['kernel'].shape), True, -7)
  params = {**params, 'layer': {**params['layer'], 'kernel': jnp.asarray(kernel)}}
  # Activations: one static scale, the batch's range (no statistics yet: this batch's own).
  x = _with_exact_scale(rng.normal(size=input_shape), False, -5)
  x_q, w_q = _qwix_fake_quant(x, None), _qwix_fake_quant(kernel, fan_in_axes)
  assert np.abs(np.round(w_q * 2 ** 7)).max() == 128  # The tie went to the code -128.

  def float_op(inputs, w):
    model = template.merge({**params, 'layer': {**params['layer'], 'kernel': w}}, rest)
    return type(model)._unquantized_type.__call__(model, inputs)  # The float layer.

  def qat_loss(p, g):
    return jnp.sum(template.merge(p, rest)(x) * g)

  out = template.merge(params, rest)(x)
  np.testing.assert_allclose(out, float_op(x_q, w_q), rtol=1e-5, atol=1e-5)
  g = np.random.default_rng(3).normal(size=out.shape).astype(np.float32)
  qat_grad = jax.grad(qat_loss)(params, g)['layer']['kernel']
  # d fake_quant(w)/dw = 1: the kernel's gradient is the float layer's, whose input is the
  # fake-quantised activation (conv) or, as qwix's dot_general keeps it, the original one.
  residual = x_q if kind == 'conv' else x
  float_grad = jax.grad(lambda w: jnp.sum(float_op(residual, w) * g))(jnp.asarray(w_q))
  np.testing.assert_allclose(qat_grad, float_grad, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- PTQ
@pytest.fixture(scope='module')
def trained(devices):
  """A tiny digits CNN after 25 steps on one device, an eval batch and calibration batches."""
  exp, state, _ = run_steps(tiny_config(), devices[:1], num_steps=25)
  model = exp.template.merge(jax.device_get(state.params), jax.device_get(state.model_state))
  images = next(exp.task.eval_batches(64))['image']
  calibration = [(batch['image'],) for batch in host_batches(exp, 4)]
  return exp, model, images, calibration


def _outputs(model, images):
  with ops.portable():
    return np.asarray(model(images, train=False))


@pytest.mark.slow  # Seconds of compiles: the fast tier stays under 3 minutes.
@pytest.mark.parametrize('mode', quantize_lib.MODES)
def test_quantized_model_answers_like_the_float_one_from_less_memory(mode, trained):
  exp, model, images, calibration = trained
  before = jax.tree.map(np.copy, nnx.to_pure_dict(nnx.state(model)))
  quantized = quantize_lib.quantize(model, mode, (images[:1],), calibration,
                                    layout=exp.template.kernel_layout())
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)), before)
  reference, out = _outputs(model, images), _outputs(quantized, images)
  ratio = quantize_lib.state_bytes(quantized) / quantize_lib.state_bytes(model)
  dtypes = {np.dtype(x.dtype) for x in jax.tree.leaves(nnx.state(quantized))}
  if mode in INT8_MODES:
    assert (out.argmax(-1) == reference.argmax(-1)).mean() >= 0.95
    assert np.dtype(np.int8) in dtypes and ratio <= 0.3, (dtypes, ratio)
  else:
    half = np.dtype(quantize_lib.HALF[mode])
    tolerance = 1e-2 if mode == 'fp16' else 6e-2
    np.testing.assert_allclose(out, reference, rtol=tolerance, atol=tolerance)
    assert half in dtypes and 0.45 < ratio <= 0.55, (dtypes, ratio)


@pytest.mark.slow  # Seconds of compiles: the fast tier stays under 3 minutes.
def test_int8_keeps_excluded_layers_float_and_stores_codes_and_scales(trained):
  exp, model, images, _ = trained
  quantized = quantize_lib.quantize(model, 'int8', (images[:1],), exclude='classifier|norm')
  stored = nnx.to_pure_dict(nnx.state(quantized.model, nnx.Param))
  assert stored['classifier']['kernel'].dtype == np.float32
  assert stored['hidden']['kernel'].dtype == np.int8
  assert stored['stages'][0][0]['conv']['kernel'].dtype == np.int8
  scales = dict(zip(quantized.scaled, (s.get_value() for s in quantized.scales)))
  assert 'classifier/kernel' not in scales
  kernel = np.asarray(nnx.to_pure_dict(nnx.state(model, nnx.Param))['hidden']['kernel'])
  np.testing.assert_allclose(scales['hidden/kernel'], _numpy_int8(kernel, (0,))[1], rtol=1e-6)


@pytest.mark.slow  # jax.export per mode; the fast tier keeps the fast check of each mode above.
@pytest.mark.parametrize('mode', quantize_lib.MODES)
def test_jax_export_of_a_quantized_predict_fn(mode, trained):
  exp, model, images, calibration = trained
  quantized = quantize_lib.quantize(model, mode, (images[:1],), calibration)
  serving = exp.task.serving()
  predict = artifact.predict_fn(quantized, serving)
  exported = jax.export.export(jax.jit(predict))(artifact.input_specs(serving))
  restored = jax.export.deserialize(exported.serialize())
  inputs = serving.inputs_from_batch({'image': images})
  np.testing.assert_allclose(restored.call(inputs)['logits'], predict(inputs)['logits'],
                             rtol=1e-5, atol=1e-5)
  if mode in INT8_MODES:  # The artifact stores int8 constants, not float ones.
    assert 'xi8>' in exported.mlir_module()


@pytest.mark.slow  # Seconds of compiles: the fast tier stays under 3 minutes.
def test_bad_settings_are_one_line_errors(trained):
  _, model, images, _ = trained
  with pytest.raises(KilnError, match=r"mode 'int4' does not exist: choose one of int8, "
                                      r'int8_dynamic, int8_static, fp16, bf16$'):
    quantize_lib.quantize(model, 'int4', (images[:1],))
  with pytest.raises(KilnError, match='pass calibration batches'):
    quantize_lib.quantize(model, 'int8_static', (images[:1],))
  with pytest.raises(KilnError, match=r"exclude='\(' is not a valid regex"):
    quantize_lib.quantize(model, 'int8', (images[:1],), exclude='(')
  config = tiny_config()
  config.quantization.mode = 'int4'
  with pytest.raises(KilnError, match=r'config\.quantization\.mode') as error:
    fields.validate(config)
  assert '\n' not in str(error.value)


# ----------------------------------------------------------------------------- QAT
def _qat_config():
  config = tiny_config()
  config.quantization.mode = 'int8'
  config.model.dropout_rate = 0.0
  return config


@pytest.mark.slow  # A QAT training run.
def test_qat_trains_and_int8_static_of_it_is_its_eval_forward(devices):
  exp, state, outputs = run_steps(_qat_config(), devices[:1], num_steps=12)
  losses = [float(metrics['loss']) for metrics, _ in outputs]
  assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3, losses
  model = exp.template.merge(jax.device_get(state.params), jax.device_get(state.model_state))
  assert quantize_lib.is_qat(model)
  counts = [int(v) for k, v in jax.tree_util.tree_flatten_with_path(
      jax.device_get(state.model_state))[0] if 'count' in jax.tree_util.keystr(k)]
  assert counts and set(counts) == {12}  # Every quantised op saw every training batch.
  images = next(exp.task.eval_batches(64))['image']
  qat_eval = _outputs(model, images)
  np.testing.assert_array_equal(_outputs(model, images), qat_eval)  # Eval updates nothing.
  served = quantize_lib.quantize(model, 'int8_static', (images[:1],))  # No calibration needed.
  np.testing.assert_allclose(_outputs(served, images), qat_eval, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # Three tiny QAT runs (straight, stopped, resumed).
def test_qat_run_resumes_exactly(tmp_path, devices):
  config = _qat_config()
  config.num_train_steps, config.checkpoint_every_steps, config.eval_every_steps = 10, 5, 5
  once = train_and_evaluate(config, str(tmp_path / 'once'))
  train_and_evaluate(config, str(tmp_path / 'twice'), stop_at_step=5)
  twice = train_and_evaluate(config, str(tmp_path / 'twice'))
  assert once['steps'] == twice['steps'] == 10
  a, b = latest_state(str(tmp_path / 'once')), latest_state(str(tmp_path / 'twice'))
  jax.tree.map(np.testing.assert_array_equal, a['params'], b['params'])
  jax.tree.map(np.testing.assert_array_equal, a['model_state'], b['model_state'])
  counts = [int(c) for k, c in jax.tree_util.tree_flatten_with_path(a['model_state'])[0]
            if 'count' in jax.tree_util.keystr(k)]
  assert counts and set(counts) == {10}  # The statistics were checkpointed and restored.
  # The run's eval reported the fake-quantised model: what int8_static of it serves.
  loaded = artifact.load(str(tmp_path / 'once'))
  images = [batch['image'] for batch in loaded.exp.task.eval_batches(loaded.exp.host_eval_batch)]
  served = quantize_lib.quantize(loaded.model, 'int8_static', (images[0][:1],))
  total = None
  for batch in loaded.exp.task.eval_batches(loaded.exp.host_eval_batch):
    metrics = loaded.exp.task.evaluate(served, batch)
    total = metrics if total is None else total.merge(metrics)
  assert abs(float(total.compute()['accuracy']) - once['final_eval']['accuracy']) <= 1 / 359


@pytest.mark.slow  # Two compiles of the QAT train step.
def test_qat_under_fsdp_matches_one_device(devices):
  def config(data, fsdp):
    c = _qat_config()
    c.mesh.data, c.mesh.fsdp = data, fsdp
    return c
  _, one, one_out = run_steps(config(-1, 1), devices[:1], num_steps=4)
  _, many, many_out = run_steps(config(2, 4), devices, num_steps=4)
  # Not to float rounding (1e-5, as pruning and LoRA): another summation order moves an
  # activation across a rounding boundary now and then, and that code moves a whole step.
  np.testing.assert_allclose([m['loss'] for m, _ in many_out], [m['loss'] for m, _ in one_out],
                             rtol=5e-3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=5e-3, atol=1e-3),
               jax.device_get(many.model_state), jax.device_get(one.model_state))
  counts = [int(c) for k, c in jax.tree_util.tree_flatten_with_path(
      jax.device_get(many.model_state))[0] if 'count' in jax.tree_util.keystr(k)]
  assert counts and set(counts) == {4}
  specs = [x.sharding.spec for x in jax.tree.leaves(many.params)]
  assert any('fsdp' in str(spec) for spec in specs), specs
