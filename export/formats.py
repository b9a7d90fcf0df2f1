"""Writers and runners for each export format.

Routes (the pinned versions decide them):
  jax           `jax.export` of the jitted predict function, batch dim symbolic ('b'),
                serialized to DIR/model.jax; runs with `jax.export.deserialize(...).call`.
  saved_model   `jax2tf.convert` (native serialization: the StableHLO rides in one
                XlaCallModule op) in a tf.function with named inputs and a None batch dim,
                saved in TF Serving's layout DIR/1/ with signature `serving_default`.
  tflite*       `TFLiteConverter.from_saved_model` of that SavedModel (fp32; fp16 weights;
                dynamic-range int8 weights; full-integer int8 with a representative dataset
                of real training inputs, float in and out), DIR/model.tflite, run with
                ai-edge-litert's signature runner.
  onnx          tf2onnx from the fp32 TFLite model (tf2onnx cannot read XlaCallModule, and
                jax2onnx releases after 0.13.0 conflict with the orbax pin), inputs and
                outputs renamed to the signature's names, DIR/model.onnx, run with
                onnxruntime.
"""

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable

import jax
import numpy as np

from core import integrity
from core.errors import KilnError
from export.artifact import input_specs
from tasks.base import Serving

TFLITE_FORMATS = ('tflite', 'tflite_fp16', 'tflite_dynamic', 'tflite_int8')
# jax_<mode>: the model quantised in JAX (compress/quantize.py) and exported as `jax` is.
QUANTIZED_JAX_FORMATS = {'jax_int8': 'int8', 'jax_int8_dynamic': 'int8_dynamic',
                         'jax_int8_static': 'int8_static', 'jax_fp16': 'fp16',
                         'jax_bf16': 'bf16'}
FORMATS = ('jax', 'saved_model', *TFLITE_FORMATS, 'onnx', *QUANTIZED_JAX_FORMATS)
SAVED_MODEL_VERSION = '1'  # TF Serving serves DIR/<version>/; a first export is version 1.
SIGNATURE = 'serving_default'

Predict = Callable[[dict], dict]
Runner = Callable[[dict], dict]


def artifact_path(fmt: str, out_dir: str) -> str:
  """The file (or SavedModel folder) a format writes inside `out_dir`."""
  if fmt == 'jax' or fmt in QUANTIZED_JAX_FORMATS:
    return os.path.join(out_dir, 'model.jax')
  if fmt == 'saved_model':
    return os.path.join(out_dir, SAVED_MODEL_VERSION)
  if fmt == 'onnx':
    return os.path.join(out_dir, 'model.onnx')
  return os.path.join(out_dir, 'model.tflite')


def artifact_bytes(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def _unsupported(fmt: str, error: Exception) -> KilnError:
  """A converter's failure as one line naming the operation it could not handle."""
  text = ' '.join(str(error).split())
  op = (re.search(r"failed to legalize operation '([^']+)'", text)
        or re.search(r"'([a-z_]+\.[A-Za-z0-9_.]+)' op", text)
        or re.search(r'[Oo]p(?:eration)? type (?:not supported|unsupported)[^A-Za-z]*(\w+)', text)
        or re.search(r'(\w+) is not supported', text))
  what = f"operation '{op.group(1)}'" if op else f'this model ({text[:160]})'
  # TFLite failing rules out ONNX too: ONNX is converted from the TFLite model.
  others = ('jax',) if fmt == 'saved_model' else ('jax', 'saved_model')
  return KilnError(f"format '{fmt}' cannot convert {what}: export another format "
                   f"({', '.join(others)}) or change the model")


@contextlib.contextmanager
def _quiet_stderr():
  """Silences C++ diagnostics written straight to fd 2 (the MLIR converter prints each
  failing op's whole call stack there); the exception still carries the message."""
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


# ----------------------------------------------------------------------------- jax

def write_jax(predict: Predict, serving: Serving, path: str) -> None:
  exported = jax.export.export(jax.jit(predict))(input_specs(serving))
  with open(path, 'wb') as f:
    f.write(exported.serialize())


def run_jax(path: str) -> Runner:
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  call = jax.jit(exported.call)
  return lambda inputs: jax.tree.map(np.asarray, call(inputs))


# ----------------------------------------------------------------------------- SavedModel

def write_saved_model(predict: Predict, serving: Serving, path: str) -> None:
  try:
    _write_saved_model(predict, serving, path)
  except KilnError:
    raise
  except Exception as e:  # jax2tf and tf.saved_model raise many types.
    raise _unsupported('saved_model', e) from e


def _write_saved_model(predict: Predict, serving: Serving, path: str) -> None:
  import tensorflow as tf
  from jax.experimental import jax2tf

  names = list(serving.inputs)
  polymorphic = [f"(b, {', '.join(str(d) for d in shape)})" if shape else '(b,)'
                 for shape, _ in serving.inputs.values()]
  converted = jax2tf.convert(lambda *args: predict(dict(zip(names, args))),
                             polymorphic_shapes=polymorphic, with_gradient=False)
  module = tf.Module()
  module.serve = tf.function(converted, autograph=False, input_signature=[
      tf.TensorSpec([None, *shape], tf.as_dtype(dtype), name=name)
      for name, (shape, dtype) in serving.inputs.items()])
  tf.saved_model.save(module, path, signatures={SIGNATURE: module.serve})


def run_saved_model(path: str) -> Runner:
  import tensorflow as tf
  serve = tf.saved_model.load(path).signatures[SIGNATURE]
  return lambda inputs: {name: value.numpy() for name, value in serve(
      **{key: tf.constant(value) for key, value in inputs.items()}).items()}


# ----------------------------------------------------------------------------- TFLite

def tflite_model(saved_model: str, fmt: str, calibration: Iterable[dict]) -> bytes:
  """The SavedModel converted as `fmt` asks; int8 ranges come from `calibration` (batches
  of real training inputs, fed one example at a time as the converter expects)."""
  import tensorflow as tf

  converter = tf.lite.TFLiteConverter.from_saved_model(saved_model, signature_keys=[SIGNATURE])
  if fmt != 'tflite':
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  if fmt == 'tflite_fp16':
    converter.target_spec.supported_types = [tf.float16]
  if fmt == 'tflite_int8':
    def representative():
      for batch in calibration:
        for i in range(len(next(iter(batch.values())))):
          yield {name: value[i:i + 1] for name, value in batch.items()}
    converter.representative_dataset = representative
    # Every op in int8 (or the conversion fails, naming the op); float in and out, so the
    # signature stays the fp32 one.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  try:
    with _quiet_stderr():
      return converter.convert()
  except Exception as e:  # The converter raises ConverterError, RuntimeError, ValueError...
    raise _unsupported(fmt, e) from e


def run_tflite(path: str) -> Runner:
  from ai_edge_litert.interpreter import Interpreter
  interpreter = Interpreter(model_path=path)
  runner = interpreter.get_signature_runner(SIGNATURE)
  return lambda inputs: runner(**inputs)  # The runner resizes to each batch's shape.


# ----------------------------------------------------------------------------- ONNX

def _tflite_tensors(path: str) -> tuple[dict, dict, dict]:
  """({TFLite tensor name: signature name} of the inputs, of the outputs,
  {tensor name: shape signature (-1 for the batch-dependent dims)})."""
  from ai_edge_litert.interpreter import Interpreter
  interpreter = Interpreter(model_path=path)
  runner = interpreter.get_signature_runner(SIGNATURE)
  details = interpreter.get_tensor_details()
  tensors = {t['index']: t['name'] for t in details}
  return ({tensors[d['index']]: name for name, d in runner.get_input_details().items()},
          {tensors[d['index']]: name for name, d in runner.get_output_details().items()},
          {t['name']: [int(d) for d in t['shape_signature']] for t in details})


def _static_reshapes(graph, shapes: dict) -> None:
  """Gives every Reshape whose TFLite shape has at most one batch-dependent dim a constant
  target (that dim -1). tf2onnx rebuilds TFLite's run-time shape arithmetic for a dynamic
  batch wrongly (e.g. [B, 4, 32, 16] asked for [B, 4, 2048, 2048] in attention), so the
  ONNX model failed at any batch size; a constant target with one -1 is exact."""
  import onnx
  for node in graph.node:
    shape = shapes.get(node.output[0]) if node.op_type == 'Reshape' else None
    if shape is None or sum(d < 0 for d in shape) > 1 or 0 in shape:
      continue
    target = f'{node.output[0]}/static_shape'
    graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(shape, np.int64), target))
    node.input[1] = target


def onnx_from_tflite(tflite_path: str, path: str) -> None:
  import onnx
  import tf2onnx

  inputs, outputs, shapes = _tflite_tensors(tflite_path)
  try:
    with _quiet_stderr():
      proto, _ = tf2onnx.convert.from_tflite(tflite_path, opset=17)
  except Exception as e:
    raise _unsupported('onnx', e) from e
  graph = proto.graph
  _static_reshapes(graph, shapes)
  renames = {**inputs, **outputs}  # Clients call the model with the signature's names.
  for value in [*graph.input, *graph.output]:
    value.name = renames.get(value.name, value.name)
  for node in graph.node:
    node.input[:] = [renames.get(name, name) for name in node.input]
    node.output[:] = [renames.get(name, name) for name in node.output]
  onnx.checker.check_model(proto)
  onnx.save(proto, path)


def run_onnx(path: str) -> Runner:
  import onnxruntime
  session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
  names = [o.name for o in session.get_outputs()]
  return lambda inputs: dict(zip(names, session.run(names, inputs)))


# ----------------------------------------------------------------------------- entry points

def write(fmt: str, predict: Predict, serving: Serving, out_dir: str,
          calibration: Callable[[], Iterable[dict]]) -> str:
  """Writes `fmt`'s artifact into `out_dir` (which exists); returns its path."""
  if fmt not in FORMATS:
    raise KilnError(f"--format={fmt} is not a format: choose one of {', '.join(FORMATS)}")
  path = artifact_path(fmt, out_dir)
  if fmt == 'jax' or fmt in QUANTIZED_JAX_FORMATS:  # `predict` already runs the quantised model.
    write_jax(predict, serving, path)
  elif fmt == 'saved_model':
    write_saved_model(predict, serving, path)
  else:  # TFLite and ONNX start from a SavedModel, kept only as a step.
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
      saved_model = os.path.join(scratch, 'saved_model')
      write_saved_model(predict, serving, saved_model)
      if fmt == 'onnx':
        tflite = os.path.join(scratch, 'model.tflite')
        with open(tflite, 'wb') as f:
          f.write(tflite_model(saved_model, 'tflite', ()))
        onnx_from_tflite(tflite, path)
      else:
        content = tflite_model(saved_model, fmt, calibration() if fmt == 'tflite_int8' else ())
        with open(path, 'wb') as f:
          f.write(content)
  return path


def runner(fmt: str, path: str) -> Runner:
  """A callable that runs the artifact at `path` on a dict of batched NumPy inputs, once the
  files of its export folder match their manifest (core/integrity.py)."""
  integrity.verify_export(os.path.dirname(os.path.abspath(path)))
  if fmt == 'jax' or fmt in QUANTIZED_JAX_FORMATS:
    return run_jax(path)
  if fmt == 'saved_model':
    return run_saved_model(path)
  if fmt == 'onnx':
    return run_onnx(path)
  return run_tflite(path)


def replace_dir(tmp_dir: str, out_dir: str) -> None:
  """Moves a finished export into place: readers see the old folder or the whole new one."""
  if os.path.exists(out_dir):
    old = tempfile.mkdtemp(prefix='.old-', dir=os.path.dirname(os.path.abspath(out_dir)))
    os.replace(out_dir, os.path.join(old, 'export'))
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(old)
  else:
    os.replace(tmp_dir, out_dir)
