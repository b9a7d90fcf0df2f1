"""One export: a trained workdir -> an artifact folder, verified, with its export.json.

The folder is built under a temporary name beside --out and renamed into place once the
artifact is written and measured, so a failed conversion never leaves half an export. Its
SHA-256 manifest (core/integrity.py) is written before the artifact is loaded for
verification, and again, over every file, as the last write before the rename. A
verified artifact whose label agreement falls under config.export.min_agreement[format]
is still written (to be inspected) but the export fails with one line.
"""

import itertools
import os
import platform
import shutil
import tempfile

import jax

from core import integrity
from core.errors import KilnError
from core.io import write_json_atomic
from compress import quantize
from export import artifact, formats, verify

EXPORT_JSON = 'export.json'
SIGNATURE_JSON = 'signature.json'


def calibration_inputs(trained: artifact.Trained, batches: int) -> list[dict]:
  """Serving inputs of the first `batches` training batches: real data for int8 ranges."""
  exp = trained.exp
  stream = exp.task.train_batches(exp.host_batch, 0)
  return [trained.serving.inputs_from_batch(batch)
          for batch in itertools.islice(stream, batches)]


def quantized_model(trained: artifact.Trained, mode: str):
  """The trained model quantised in JAX by `mode` (compress/quantize.py); int8_static
  calibrates on config.export.calibration_batches training batches (a QAT run brings its
  own statistics)."""
  calibration = calibration_inputs(trained, trained.config.export.calibration_batches)
  args = [artifact.model_inputs(trained, inputs) for inputs in calibration]
  return quantize.quantize(trained.model, mode, args[0], args,
                           exclude=trained.config.quantization.exclude,
                           layout=trained.exp.template.kernel_layout())


def signature(trained: artifact.Trained, predict) -> dict:
  """What a client needs to call the artifact: inputs, outputs, pre-processing."""
  serving = trained.serving
  outputs = jax.eval_shape(predict, artifact.input_specs(serving, 1))
  return {
      'task': trained.config.task, 'model': trained.config.model.name,
      'signature_name': formats.SIGNATURE,
      'inputs': {name: {'shape': [None, *shape], 'dtype': dtype}
                 for name, (shape, dtype) in serving.inputs.items()},
      'outputs': {name: {'shape': [None, *value.shape[1:]], 'dtype': str(value.dtype)}
                  for name, value in outputs.items()},
      'preprocessing': serving.preprocessing, 'metric': serving.metric,
  }


def export(workdir: str, fmt: str, out_dir: str, *, max_examples: int | None = None,
           min_agreement: float | None = None, trained: artifact.Trained | None = None,
           defaults=None) -> dict:
  """Writes `fmt` of `workdir`'s newest checkpoint to `out_dir` and returns export.json's
  content. `trained` reuses a loaded run (benchmarks export one run many ways); `defaults`
  fill config sections the run predates (artifact.read_config)."""
  if fmt not in formats.FORMATS:
    raise KilnError(f"--format={fmt} is not a format: choose one of "
                    f"{', '.join(formats.FORMATS)}")
  trained = trained or artifact.load(workdir, defaults)
  settings = trained.config.export
  threshold = settings.min_agreement[fmt] if min_agreement is None else min_agreement
  max_examples = settings.max_eval_examples if max_examples is None else max_examples
  live = artifact.predict_fn(trained.model, trained.serving)
  predict = live
  if fmt in formats.QUANTIZED_JAX_FORMATS:
    predict = artifact.predict_fn(quantized_model(trained, formats.QUANTIZED_JAX_FORMATS[fmt]),
                                  trained.serving)
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix='.tmp-export-', dir=parent)
  try:
    path = formats.write(fmt, predict, trained.serving, tmp_dir,
                         lambda: calibration_inputs(trained, settings.calibration_batches))
    write_json_atomic(os.path.join(tmp_dir, SIGNATURE_JSON), signature(trained, predict))
    integrity.write_manifest(tmp_dir)  # The verification below loads what serving will load.
    run = formats.runner(fmt, path)
    try:
      measured = {**verify.compare(trained, run, jax.jit(live), max_examples),
                  **verify.latency_ms(run, verify.first_example(trained), settings.latency_runs)}
    except (RuntimeError, ValueError) as e:  # The runtime refused what the converter wrote.
      message = ' '.join(str(e).split())[:200]
      raise KilnError(f"the {fmt} artifact fails in its own runtime ({message}): export "
                      'another format') from e
    report = {
        'format': fmt, 'workdir': os.path.abspath(workdir), 'step': trained.step,
        'bytes': formats.artifact_bytes(path), **measured,
        'min_agreement': threshold, 'host': platform.processor() or platform.machine(),
        'jax': jax.__version__,
    }
    report['passed'] = report['label_agreement'] >= threshold
    report['path'] = os.path.join(os.path.abspath(out_dir), os.path.relpath(path, tmp_dir))
    write_json_atomic(os.path.join(tmp_dir, EXPORT_JSON), report)
    integrity.write_manifest(tmp_dir)
    formats.replace_dir(tmp_dir, out_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  if not report['passed']:
    raise KilnError(f"{fmt} export agrees with JAX on {report['label_agreement']:.4%} of "
                    f"held-out labels, under config.export.min_agreement.{fmt}={threshold}: "
                    f'see {os.path.join(out_dir, EXPORT_JSON)}; use a less lossy format or '
                    'lower the threshold')
  return report


def summary_line(report: dict) -> str:
  metric = report['metric']
  return (f"{report['format']}: {report['bytes']:,} bytes, {metric} {report[metric]:.4f} "
          f"(JAX {report['jax_' + metric]:.4f}), agreement {report['label_agreement']:.4%}, "
          f"max |diff| {report['max_abs_diff']:.2e}, p50 {report['latency_ms_p50']:.2f} ms")

