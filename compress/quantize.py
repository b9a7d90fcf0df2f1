"""Quantisation: a trained model made smaller after training (PTQ), or trained with the
quantisation it will be served with (QAT).

`quantize(model, mode, example_inputs, calibration, exclude)` returns a model called exactly
like the original (`model(*inputs, train=False)`), whose state holds the compact values, so
that a function closing over it (export/artifact.predict_fn, jax.export) stores them:

- 'int8': weights int8, symmetric per output channel (scale = absmax / 127 over each
  channel's fan-in dims, which `core.logical_axes.kernel_matrix_dims` names), activations
  float. Kiln's own small implementation (`StoredWeights`): qwix refuses weight-only int8
  for convolutions ("conv_general_dilated requires same act_qtype and weight_qtype"). The
  int8 codes and float32 scales are the state; a call rebuilds the float kernels
  (codes * scale) and runs the float model.
- 'int8_dynamic': qwix PTQ (`qwix.PtqProvider`): int8 weights per output channel and int8
  activations whose scales come from each batch as it runs.
- 'int8_static': qwix PTQ with fixed activation scales. Each quantised op's input range is
  the mean, over the `calibration` batches (real training inputs), of the batch's absmax,
  collected by a quantised-training model (`qat_model`) and turned into the PTQ model's
  scales by `qwix.quantize_params`. A QAT-trained model holds these statistics from
  training and they are used as they are (no calibration needed): the PTQ model computes
  what the QAT model's eval forward computes.
- 'fp16' / 'bf16': every float parameter stored in half precision and upcast to its own
  dtype at use (the computation is the model's).
qwix's own int8 (the three qwix modes and QAT) maps absmax to 127.5 and rounds into
[-128, 127]; 'int8' keeps codes in [-127, 127] (scale absmax / 127).

Quantisation-aware training (`config.quantization.mode='int8'`, `qat`): the forward runs
qwix's quantised-training ops (`qwix.QtProvider`): weights fake-quantised to int8 per output
channel, activations to int8 with static scales (the running mean of each training batch's
absmax, kept in the model state as `quant_stats` variables, so checkpoints carry them and
resume is exact), and straight-through gradients (the rounding counts as the identity).
Statistics update only in train-mode forwards: eval uses them as a served model would.

Where qwix falls short, and what is written here instead:
- Static activation scales for convolutions: qwix 0.1.8's quantised-training conv collects
  its statistics inside its custom_vjp forward, and an NNX module cannot be mutated from
  that inner trace (flax TraceContextError under jit, eval_shape and grad). `QatProvider`
  replaces that one op: statistics collected outside, then a conv of fake-quantised operands
  (`fake_quant`: x + stop_gradient(dequantize(quantize(x)) - x), the straight-through
  estimator, which gives the gradients qwix's own conv backward computes).
- qwix keeps each statistic as one variable holding a dict {count, sum_of_absmax}; Kiln's
  model state is a pure dict that `ModelTemplate.merge` writes back into variables, which
  cannot address keys inside a variable's value. `QatProvider` keeps one array variable per
  key ('<op>_lhs_count', '<op>_lhs_sum_of_absmax'), regrouped for qwix.quantize_params.
- qwix averages the examples' ranges within a batch, which clips every example wider than
  the mean one (int8_static of a tiny digits CNN agreed with it on 95% of a held-out batch,
  98% with the batch's maximum): `QatProvider` takes each batch's widest example.
- qwix PTQ swaps a parameter for its quantised form in the shape the op sees, so a kernel
  the module reshapes before use (the Transformer's fused attention projections) would be
  swapped for its reshaped form and break the module. Only ops whose right operand is a
  parameter in its stored shape are quantised (in QAT too, so that PTQ and QAT quantise the
  same ops); products of two activations (attention scores) stay float. 'int8' covers
  every kernel.
- qwix patches the code of `jax.lax.dot_general`; inside a jitted jax.numpy function
  (`x @ w` is jnp.matmul) it sees the call only when JAX traces that function afresh, not
  on a cache hit. The providers run with qwix's disable_jit=True, so every forward sees
  the same ops.
- qwix intercepts only plain-XLA ops: quantised models run their forward under
  `backends.ops.portable()` (Kiln's compiled CPU kernels would bypass the quantisation).
"""

import contextlib
import contextvars
import math
import re
from collections.abc import Callable, Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from qwix._src import averaging
from qwix._src.core import conv_general, qarray
from qwix._src.providers import ptq
from qwix._src.utils import flax_util

from backends import ops
from compress import pruning as pruning_lib
from core.errors import KilnError
from core.logical_axes import FAN_OUT_KEY, LOGICAL_AXES_KEY, kernel_matrix_dims
from core.paths import path_string

MODES = ('int8', 'int8_dynamic', 'int8_static', 'fp16', 'bf16')
QAT_MODES = ('none', 'int8')  # config.quantization.mode values.
DEFAULT_EXCLUDE = r'bias$|scale$|norm|embed'  # As config.pruning.exclude: layers kept float.
QTYPE = 'int8'
QMAX = 127  # Symmetric int8: codes in [-127, 127], so that -q is always representable.
HALF = {'fp16': jnp.float16, 'bf16': jnp.bfloat16}
# Static activation scales are one per tensor: each op's input range is reduced over its
# batch and (sequences) time dims, so it does not depend on the length served. Axis 1 of a
# conv's or a dense layer's per-example range is already 1 (qwix reduced it).
ACT_BATCH_AXES = (0, 1)

Layout = pruning_lib.Layout


# ----------------------------------------------------------------------------- int8 kernels
def fan_in_axes(layout: Layout) -> tuple[int, ...]:
  """The dims of a kernel with `layout` (stacked, fan_in) that one output channel spans;
  stacked dims (scanned layers) are separate matrices, each with its own scales."""
  stacked, fan_in = layout
  return tuple(range(stacked, stacked + fan_in))


def channel_scales(w: jax.Array, layout: Layout) -> jax.Array:
  """absmax / 127 per output channel (float32, w's rank, 1 on the fan-in dims)."""
  absmax = jnp.max(jnp.abs(jnp.asarray(w, jnp.float32)), axis=fan_in_axes(layout),
                   keepdims=True)
  return absmax / QMAX


def quantize_kernel(w: jax.Array, layout: Layout) -> tuple[jax.Array, jax.Array]:
  """(int8 codes round(w / scale), float32 scales): symmetric, per output channel. An
  all-zero channel has scale 0 and codes 0."""
  scale = channel_scales(w, layout)
  safe = jnp.where(scale > 0, scale, 1.0)
  codes = jnp.clip(jnp.round(jnp.asarray(w, jnp.float32) / safe), -QMAX, QMAX)
  return codes.astype(jnp.int8), scale


def dequantize_kernel(codes: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  return (codes.astype(jnp.float32) * scale).astype(dtype)


def fake_quant(x: jax.Array, scale: jax.Array, zero_point: jax.Array | None = None,
               qtype=QTYPE) -> jax.Array:
  """x quantised to `qtype` with `scale` and dequantised again, with the straight-through
  estimator's gradient: identity (d/dx = 1), as if there were no rounding."""
  restored = qarray.dequantize(qarray.quantize_with_scale_zero_point(x, qtype, scale,
                                                                       zero_point))
  return x + jax.lax.stop_gradient(restored.astype(x.dtype) - x)


def kernel_layouts(model: nnx.Module) -> dict[str, Layout | None]:
  """'a/b/kernel' -> (stacked, fan_in) for every parameter of `model` (None for vectors),
  from its variables' logical-axes metadata as `ModelTemplate.kernel_layout()` reads it."""
  out = {}
  state = nnx.state(model, nnx.Param)
  for path, variable in jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    metadata = variable.get_metadata()
    out[path_string(path)] = kernel_matrix_dims(
        np.shape(variable.get_value()), metadata.get(LOGICAL_AXES_KEY),
        metadata.get(FAN_OUT_KEY, 1))
  return out


class KernelScale(nnx.Variable):
  """Per-output-channel float32 scales of an int8 kernel (`StoredWeights`)."""


class StoredWeights(nnx.Module):
  """A model whose parameters are stored compactly (int8 codes with per-channel scales, or
  half precision) and restored to their own dtype when it is called.

  `model` holds the compact values in place of the float ones (same variables, same paths
  under 'model/'); the scales sit in `scales`, in the order of `scaled`. Calling it rebuilds
  the float model and calls it with the same arguments."""

  def __init__(self, model: nnx.Module, restore: dict[str, str], scales: dict[str, jax.Array]):
    self.model = model
    self.restore = tuple(sorted(restore.items()))  # ('a/b/kernel', its float dtype) pairs.
    self.scaled = tuple(sorted(scales))
    self.scales = nnx.List([KernelScale(scales[path]) for path in self.scaled])

  def float_model(self) -> nnx.Module:
    graphdef, state = nnx.split(self.model)
    scales = dict(zip(self.scaled, (s.get_value() for s in self.scales)))
    restore = dict(self.restore)

    def restored(path, value):
      name = path_string(path)
      if name not in restore:
        return value
      if name in scales:
        return dequantize_kernel(value, scales[name], restore[name])
      return jnp.asarray(value).astype(restore[name])
    values = jax.tree_util.tree_map_with_path(restored, nnx.to_pure_dict(state))
    state = jax.tree.map(lambda x: x, state)  # Fresh variables: the stored ones stay as they are.
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)

  def __call__(self, *args, **kwargs):
    return self.float_model()(*args, **kwargs)


def _stored(model: nnx.Module, convert: Callable[[str, jax.Array], tuple | None]) -> StoredWeights:
  """StoredWeights of a copy of `model` whose parameters `convert(path, value)` maps to
  (stored value, scale or None), or None to keep as they are."""
  model = nnx.clone(model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  graphdef, state = nnx.split(model)
  restore, scales, stored = {}, {}, {}
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_string(path)
    converted = convert(name, value)
    if converted is None:
      continue
    stored[name], scale = converted
    restore[name] = jnp.dtype(value.dtype).name
    if scale is not None:
      scales[name] = scale
  values = jax.tree_util.tree_map_with_path(
      lambda path, value: stored.get(path_string(path), value), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, values)
  return StoredWeights(nnx.merge(graphdef, state), restore, scales)


def _int8_weights(model: nnx.Module, exclude: str, layout: dict | None) -> StoredWeights:
  layouts = kernel_layouts(model) if layout is None else pruning_lib.flat_layouts(layout)
  chosen = pruning_lib.prunable_layouts(layouts, exclude)

  def convert(name, value):
    if name not in chosen or not jnp.issubdtype(value.dtype, jnp.floating):
      return None
    return quantize_kernel(value, chosen[name])
  return _stored(model, convert)


def _half_weights(model: nnx.Module, dtype) -> StoredWeights:
  def convert(_, value):
    if not jnp.issubdtype(value.dtype, jnp.floating) or value.dtype == dtype:
      return None
    return jnp.asarray(value).astype(dtype), None
  return _stored(model, convert)


# ----------------------------------------------------------------------------- qwix
_OBSERVE = contextvars.ContextVar('kiln_quant_observe', default=False)


@contextlib.contextmanager
def _observing(on: bool = True):
  """Quantised-training statistics update in forwards traced inside (training, calibration);
  outside, the stored statistics are used as they are (eval: the served model's scales)."""
  token = _OBSERVE.set(_OBSERVE.get() or bool(on))
  try:
    yield
  finally:
    _OBSERVE.reset(token)


def _stored_weight(x) -> bool:
  """Whether `x`, an op's right operand, is a parameter of the calling module used in its
  stored shape (qwix PTQ replaces a parameter by its quantised form, so a parameter the
  module reshapes first, e.g. attention's fused [E, 3, N, H] kernel, cannot be quantised)."""
  if isinstance(x, ptq.WithAux):
    return True
  name = flax_util.find_param(x)
  if name is None:
    return False
  stored = getattr(flax_util.get_current_module(), name)
  return tuple(stored.shape) == tuple(x.shape)


class _WeightOps:
  """Quantises dot_general and einsum only where the right operand is a stored weight:
  the products of two activations (attention scores) stay float, so train and eval forwards
  quantise the same ops (their statistics have one layout), and PTQ and QAT agree."""

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None, *, out_sharding=None):
    if not _stored_weight(rhs):
      return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                 preferred_element_type=preferred_element_type,
                                 out_sharding=out_sharding)
    return super().dot_general(lhs, rhs, dimension_numbers, precision,
                               preferred_element_type, out_sharding=out_sharding)

  def einsum(self, einsum_str, *operands, **kwargs):
    if len(operands) != 2 or not _stored_weight(operands[1]):
      return jnp.einsum(einsum_str, *operands, **kwargs)
    return super().einsum(einsum_str, *operands, **kwargs)


class PtqProvider(_WeightOps, qwix.PtqProvider):
  """qwix's PTQ provider on the ops `_WeightOps` picks."""


class QatProvider(_WeightOps, qwix.QtProvider):
  """qwix's quantised-training provider with array-valued statistics, updated only while
  `_observing`, and a conv whose static activation scales work under tracing (see the
  module docstring)."""

  def _update_and_get_quant_stat(self, name, batch_axes, calibration):
    # A batch's range is its widest example's (qwix averages the examples' ranges, which
    # clips every example wider than the mean one); batches are averaged as qwix does.
    calibration = {key: (jnp.min if key == 'min' else jnp.max)(
        value, axis=tuple(batch_axes), keepdims=True) for key, value in calibration.items()}
    aggregator = averaging.SimpleMovingAverage()
    initial = aggregator.init(calibration)
    variables = {key: flax_util.get_or_create_variable('quant_stats', f'{name}_{key}',
                                                       lambda key=key: initial[key])
                 for key in initial}
    stat = {key: variable.get_value() for key, variable in variables.items()}
    if _OBSERVE.get() and flax_util.should_update_quant_stats():
      stat = aggregator.update(stat, calibration)
      for key, variable in variables.items():
        variable.set_value(stat[key])
    return aggregator.get_calibration(stat, calibration)

  def conv_general_dilated(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                           batch_group_count=1, precision=None, preferred_element_type=None,
                           out_sharding=None):
    rule, op_id = self._get_current_rule_and_op_id('conv_general_dilated')
    options = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                   dimension_numbers=dimension_numbers,
                   feature_group_count=feature_group_count,
                   batch_group_count=batch_group_count, precision=precision,
                   preferred_element_type=preferred_element_type, out_sharding=out_sharding)
    if rule is None or rule.weight_qtype is None:
      return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
    dnums = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)

    def quantized(x, for_lhs):
      qtype = rule.act_qtype if for_lhs else rule.weight_qtype
      if qtype is None:
        return x
      how = conv_general.get_how_to_quantize(
          dimension_numbers=dnums, for_lhs=for_lhs, qtype=qtype,
          calibration_method=(rule.act_calibration_method if for_lhs
                              else rule.weight_calibration_method))
      calibration = qarray.calibrate(x, how)
      if for_lhs and rule.act_static_scale:
        calibration = self._update_and_get_quant_stat(f'{op_id}_lhs', rule.act_batch_axes,
                                                      calibration)
      scale, zero_point = qarray.compute_scale_zero_point(calibration, qtype)
      return fake_quant(x, scale, zero_point, qtype)
    return jax.lax.conv_general_dilated(quantized(lhs, True), quantized(rhs, False),
                                        window_strides, padding, **options)


def _compile(exclude: str, what: str = 'quantization exclude') -> re.Pattern | None:
  try:
    return re.compile(exclude) if exclude else None
  except re.error as e:
    raise KilnError(f"{what}='{exclude}' is not a valid regex ({e}): fix the pattern") from e


def _rules(model: nnx.Module, exclude: str, rule_type, **quantized) -> list:
  """qwix rules: no quantisation in the modules owning a kernel `exclude` matches, then
  `quantized` settings everywhere else."""
  pattern = _compile(exclude)
  excluded = sorted({name.rsplit('/', 1)[0] if '/' in name else ''
                     for name, layout in kernel_layouts(model).items()
                     if layout is not None and pattern is not None and pattern.search(name)})
  rules = [rule_type(module_path='|'.join(re.escape(m) for m in excluded))] if excluded else []
  return rules + [rule_type(module_path='.*', **quantized)]


def _subclass(model: nnx.Module, around: Callable[[dict], contextlib.AbstractContextManager],
              **attributes) -> nnx.Module:
  """`model` (in place) as an instance of a subclass of its class whose __call__ runs the
  original inside `around(kwargs)`: how qwix itself intercepts an NNX model."""
  base = type(model)

  def __call__(self, *args, **kwargs):
    with around(kwargs):
      return base.__call__(self, *_as_arrays(args), **kwargs)
  model.__class__ = type(base.__name__, (base,), {'__call__': __call__, **attributes})
  return model


def _portable(_kwargs):
  return ops.portable()


def _batch(inputs) -> tuple:
  """A batch of positional model inputs as a tuple (a lone array is one input)."""
  return (inputs,) if isinstance(inputs, (np.ndarray, jax.Array)) else tuple(inputs)


def _as_arrays(args: tuple) -> tuple:
  """Host (NumPy) inputs as jax.Arrays: qwix's dtype promotion skips anything else."""
  return tuple(jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in args)


@contextlib.contextmanager
def _qat_scope(kwargs):
  with ops.portable(), _observing(kwargs.get('train', False)):
    yield


def is_qat(model) -> bool:
  """Whether `model` is a quantisation-aware-training model (`qat_model`)."""
  return getattr(type(model), '_kiln_qat', False)


def qat_model(model: nnx.Module, exclude: str, example_forward: Callable[[nnx.Module], object]
              ) -> nnx.Module:
  """A quantised-training copy of `model`: int8 fake-quant weights (per output channel) and
  activations (static scales from `quant_stats`, updated in train-mode forwards), except in
  layers whose kernel `exclude` matches. `example_forward(model)` runs one eval forward
  (any inputs of the right shape) that creates the statistics variables."""
  rules = _rules(model, exclude, qwix.QtRule, weight_qtype=QTYPE, act_qtype=QTYPE,
                 act_static_scale=True, act_batch_axes=ACT_BATCH_AXES)
  with ops.portable():
    qt = qwix.quantize_model(model, QatProvider(rules, disable_jit=True), skip_nnx_init=True)
  qt = _subclass(qt, _qat_scope, _kiln_qat=True)
  example_forward(qt)  # Creates the statistics (count 0: scales from the batch itself).
  return qt


def qat(settings, build_model: Callable[[nnx.Rngs], nnx.Module],
        example_forward: Callable[[nnx.Module], object]) -> Callable[[nnx.Rngs], nnx.Module]:
  """`build_model` followed by `qat_model` when config.quantization (`settings`) asks for
  quantisation-aware training; `build_model` itself when its mode is 'none'."""
  if settings.mode not in QAT_MODES:
    raise KilnError(f"config.quantization.mode='{settings.mode}' must be one of "
                    f"{', '.join(QAT_MODES)}")
  if settings.mode == 'none':
    return build_model
  _compile(settings.exclude, 'config.quantization.exclude')

  def build_quantized(rngs: nnx.Rngs):
    return qat_model(build_model(rngs), settings.exclude, example_forward)
  return build_quantized


def _without_statistics(model: nnx.Module) -> nnx.Module:
  """A copy of `model`, its arrays on the device (qwix's dtype promotion takes only
  jax.Arrays), without quantised-training statistics variables."""
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))
  for _, module in nnx.iter_modules(model):
    for name in [n for n, v in vars(module).items() if isinstance(v, qwix.QuantStat)]:
      delattr(module, name)
  return model


def _statistics(model: nnx.Module) -> dict:
  """The quant_stats of a `qat_model` as qwix.quantize_params reads them:
  {module path..., '<op>_lhs': {'count': n, 'sum_of_absmax': s}}."""
  grouped = {}
  values = nnx.to_pure_dict(nnx.state(model, qwix.QuantStat))
  for path, value in flax.traverse_util.flatten_dict(values).items():
    *module, name = path
    if name.endswith('_count'):
      op, key = name[:-len('_count')], 'count'
    else:
      op, key = name.split('_sum_of_', 1)
      key = f'sum_of_{key}'
    grouped.setdefault((*module, op), {})[key] = jnp.asarray(value)
  for path, stat in grouped.items():
    if int(stat['count']) == 0:
      raise KilnError(f"int8_static has no activation statistics for {'/'.join(map(str, path))}: "
                      'pass calibration batches (real training inputs)')
  return flax.traverse_util.unflatten_dict(grouped)


def _observe(model: nnx.Module, batches: Iterable[tuple]) -> int:
  """Runs `model` in eval mode on each batch with statistics updating (one compiled
  forward); the updated statistics stay in `model`. Returns the number of batches."""
  graphdef, state = nnx.split(model)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)

  @jax.jit
  def forward(values, inputs):
    current = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(current, values)
    module = nnx.merge(graphdef, current)
    with _observing():
      module(*inputs, train=False)
    return nnx.to_pure_dict(nnx.state(module))

  values, count = nnx.to_pure_dict(state), 0
  for inputs in batches:
    values = forward(values, _batch(inputs))
    count += 1
  nnx.replace_by_pure_dict(state, values)
  nnx.update(model, state)
  return count


def _abstract(build: Callable[[], nnx.Module]) -> nnx.Module:
  """The model `build()` returns, traced (shapes only): qwix derives a model from a first
  forward pass, and tracing it costs one trace where running it eagerly compiles every op."""
  with ops.portable():
    return nnx.eval_shape(build)


def _filled(model: nnx.Module, *sources, fresh: type | None = None) -> nnx.Module:
  """`model` (in place) with each value from the first of `sources` (pure dicts) that has
  its path; zeros for variables of type `fresh` (new statistics) that none has."""
  flat = [flax.traverse_util.flatten_dict(source) for source in sources]
  fresh_paths = set() if fresh is None else set(
      flax.traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, fresh))))

  def value(path, leaf):
    keys = tuple(getattr(k, 'key', getattr(k, 'idx', None)) for k in path)
    for source in flat:
      if keys in source:
        return jnp.asarray(source[keys])
    if keys not in fresh_paths:
      raise ValueError(f"quantised model has no value for {'/'.join(map(str, keys))}")
    return jnp.zeros(leaf.shape, leaf.dtype)
  state = nnx.state(model)
  values = jax.tree_util.tree_map_with_path(value, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, values)
  nnx.update(model, state)
  return model


def _ptq(model: nnx.Module, example_inputs: tuple, exclude: str, static: bool) -> nnx.Module:
  """qwix PTQ of `model` (its quant_stats give the static activation scales), built as qwix
  recommends for large models: the quantised model traced, then qwix.quantize_params."""
  source = _without_statistics(model)
  rules = _rules(source, exclude, qwix.QuantizationRule, weight_qtype=QTYPE, act_qtype=QTYPE,
                 act_static_scale=static, act_batch_axes=ACT_BATCH_AXES)
  quantized = _abstract(lambda: qwix.quantize_model(
      source, PtqProvider(rules, disable_jit=True), *_as_arrays(example_inputs), train=False))
  params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(nnx.state(source, nnx.Param)))
  values = qwix.quantize_params(params, quantized, _statistics(model) if static else {})
  _filled(quantized, values, nnx.to_pure_dict(nnx.state(source, nnx.Not(nnx.Param))))
  return _subclass(quantized, _portable)


# ----------------------------------------------------------------------------- the entry
def quantize(model: nnx.Module, mode: str, example_inputs: tuple,
             calibration: Iterable[tuple] = (), exclude: str = DEFAULT_EXCLUDE,
             layout: dict | None = None) -> nnx.Module:
  """`model` quantised by `mode` (one of MODES; see the module docstring), called as the
  original: `quantized(*inputs, train=False)`.

  `example_inputs`: one batch of the model's positional inputs (any values; qwix runs the
  model once to find its ops). `calibration`: batches of real training inputs (tuples like
  `example_inputs`) for 'int8_static' (unused for a QAT-trained model, whose statistics
  come from training). `exclude`: a regex on 'a/b/kernel' paths whose layers stay float
  (the int8 modes). `layout`: `ModelTemplate.kernel_layout()`; read from the model's
  variables when None. `model` itself is left as it was."""
  if mode not in MODES:
    raise KilnError(f"quantization mode '{mode}' does not exist: choose one of "
                    f"{', '.join(MODES)}")
  _compile(exclude)
  example_inputs = _batch(example_inputs)
  if mode in HALF:
    return _half_weights(model, HALF[mode])
  if mode == 'int8':
    return _int8_weights(model, exclude, layout)
  if mode == 'int8_dynamic':
    return _ptq(model, example_inputs, exclude, static=False)
  if not is_qat(model):  # int8_static of a float model: statistics from the calibration.
    observed = _filled(_abstract(lambda: qat_model(
        model, exclude, lambda m: m(*_as_arrays(example_inputs), train=False))),
        nnx.to_pure_dict(nnx.state(model)), fresh=qwix.QuantStat)
    if not _observe(observed, calibration):
      raise KilnError('int8_static calibrates activation scales on real inputs: pass '
                      'calibration batches (e.g. config.export.calibration_batches > 0)')
    model = observed
  return _ptq(model, example_inputs, exclude, static=True)


def state_bytes(model: nnx.Module) -> int:
  """Bytes of every array in `model`'s state (what an artifact closing over it stores)."""
  return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(nnx.state(model)))
