"""export.py: every format written, run in its own runtime and checked against JAX on
held-out data; TF Serving's SavedModel contract; bad input and failed checks."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from core import integrity
from core.errors import KilnError
from export import artifact, exporter, formats
from loop.training import train_and_evaluate
from tests.test_integrity import _flip_byte
from tests.tiny import REPO, tiny_config


@pytest.fixture(scope='module')
def trained_dir(tmp_path_factory):
  """A tiny digits CNN trained for 40 steps (its held-out accuracy is well above chance),
  its dense layer wide enough that weights, not graph overhead, make an artifact's bytes."""
  workdir = str(tmp_path_factory.mktemp('run'))
  c = tiny_config()
  c.model.dense_features = 256
  c.compilation_cache_dir = ''
  train_and_evaluate(c, workdir)
  return workdir


@pytest.fixture(scope='module')
def trained(trained_dir):
  return artifact.load(trained_dir)


@pytest.fixture(scope='module')
def exports(trained, tmp_path_factory):
  """fmt -> (folder, export.json) for each format, exported once for the module."""
  root = tmp_path_factory.mktemp('exports')
  done = {}

  def get(fmt):
    if fmt not in done:
      out = str(root / fmt)
      done[fmt] = (out, exporter.export(trained.workdir, fmt, out, trained=trained))
    return done[fmt]
  return get


def _read(out):
  with open(os.path.join(out, exporter.EXPORT_JSON)) as f:
    return json.load(f)


@pytest.mark.slow  # Every test that exports shares one trained run (~30 s to train).
def test_jax_artifact_is_bit_identical_at_any_batch_size(trained, exports):
  out, report = exports('jax')
  assert report == _read(out)
  assert report['max_abs_diff'] == 0.0 and report['label_agreement'] == 1.0
  assert report['accuracy'] == report['jax_accuracy'] > 0.5  # Ten classes: chance is 0.1.
  assert report['split'] == 'eval' and report['examples'] == 359  # The whole held-out split.
  run = formats.runner('jax', report['path'])
  live = jax.jit(artifact.predict_fn(trained.model, trained.serving))
  batch = next(iter(trained.exp.task.eval_batches(64)))
  inputs = trained.serving.inputs_from_batch(batch)
  for size in (1, 5, 64):  # The batch dim is symbolic: one artifact serves every size.
    part = {k: v[:size] for k, v in inputs.items()}
    np.testing.assert_array_equal(run(part)['logits'], np.asarray(live(part)['logits']))
  with open(os.path.join(out, exporter.SIGNATURE_JSON)) as f:
    signature = json.load(f)
  assert signature['inputs'] == {'image': {'shape': [None, 8, 8, 1], 'dtype': 'float32'}}
  assert signature['outputs']['logits']['shape'] == [None, 10]


@pytest.mark.slow  # TensorFlow conversion of each format (~5-15 s each).
@pytest.mark.parametrize('fmt', ['saved_model', 'tflite', 'onnx'])
def test_float_formats_match_jax(exports, fmt):
  out, report = exports(fmt)
  assert report['max_abs_diff'] < 1e-4
  assert report['label_agreement'] >= 0.999
  assert report['accuracy'] == pytest.approx(report['jax_accuracy'], abs=1e-3)
  assert report['latency_ms_p50'] > 0 and report['latency_ms_p99'] >= report['latency_ms_p50']
  assert os.path.exists(report['path']) and report['passed']


@pytest.mark.slow  # Reuses the module's exports (built by the tests above when run together).
@pytest.mark.parametrize('fmt', ['saved_model', 'tflite', 'onnx'])
def test_every_export_carries_a_manifest_and_a_flipped_byte_is_refused(exports, fmt, tmp_path):
  out, report = exports(fmt)
  files = {os.path.relpath(os.path.join(root, name), out).replace(os.sep, '/')
           for root, _, names in os.walk(out) for name in names} - {integrity.MANIFEST_FILE}
  with open(os.path.join(out, integrity.MANIFEST_FILE)) as f:
    assert set(json.load(f)['files']) == files
  assert {exporter.EXPORT_JSON, exporter.SIGNATURE_JSON} < files and integrity.verify_export(out)
  copy = str(tmp_path / fmt)
  shutil.copytree(out, copy)
  biggest = max(files, key=lambda name: os.path.getsize(os.path.join(copy, name)))
  _flip_byte(os.path.join(copy, biggest))  # One byte, in the weights.
  with pytest.raises(KilnError) as caught:
    formats.runner(fmt, os.path.join(copy, os.path.relpath(report['path'], out)))
  message = str(caught.value)
  assert '\n' not in message and f'file {biggest} has SHA-256' in message, message


@pytest.mark.slow
def test_quantised_tflite_formats_are_smaller_and_still_agree(exports):
  fp32 = exports('tflite')[1]
  fp16, dynamic, int8 = (exports(f)[1] for f in ('tflite_fp16', 'tflite_dynamic', 'tflite_int8'))
  # Graph overhead weighs more in a model this small than in the MNIST CNN (benchmarks/export.py).
  assert fp16['bytes'] < 0.65 * fp32['bytes']
  assert dynamic['bytes'] < 0.5 * fp32['bytes'] and int8['bytes'] < 0.5 * fp32['bytes']
  assert fp16['label_agreement'] >= 0.99
  for report in (dynamic, int8):
    assert report['label_agreement'] >= 0.95
    assert report['accuracy'] >= report['jax_accuracy'] - 0.03


@pytest.mark.slow  # A fresh Python process with TensorFlow.
def test_saved_model_serves_any_batch_size_without_kiln(exports, tmp_path):
  out, _ = exports('saved_model')
  script = textwrap.dedent(f"""
      import importlib.abc, sys
      class NoKiln(importlib.abc.MetaPathFinder):  # The server has TF, not Kiln.
        def find_spec(self, name, path=None, target=None):
          if name.split('.')[0] in {sorted(_kiln_packages())!r}:
            raise ImportError('kiln is not installed here: ' + name)
      sys.meta_path.insert(0, NoKiln())
      import numpy as np, tensorflow as tf
      serve = tf.saved_model.load({os.path.join(out, formats.SAVED_MODEL_VERSION)!r}
                                  ).signatures['serving_default']
      for size in (1, 3, 7):
        logits = serve(image=tf.zeros([size, 8, 8, 1]))['logits']
        assert logits.shape == (size, 10), logits.shape
      print('served')
  """)
  done = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300, env={**os.environ, 'PYTHONPATH': ''})
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'served' in done.stdout


def _kiln_packages():
  return {name for name in os.listdir(REPO)
          if os.path.exists(os.path.join(REPO, name, '__init__.py'))} | {'train'}


@pytest.mark.slow
def test_failed_agreement_check_fails_with_one_line_but_keeps_the_report(trained, tmp_path):
  out = str(tmp_path / 'strict')
  with pytest.raises(KilnError, match=r'min_agreement\.jax=1\.5.*export\.json'):
    exporter.export(trained.workdir, 'jax', out, min_agreement=1.5, trained=trained)
  report = _read(out)
  assert report['passed'] is False and report['label_agreement'] == 1.0
  assert os.listdir(tmp_path) == ['strict']  # No temporary folder left beside it.


def test_bad_input_gets_one_line(tmp_path):
  with pytest.raises(KilnError, match='--format=tflite_int4 is not a format: choose one of'):
    exporter.export(str(tmp_path), 'tflite_int4', str(tmp_path / 'x'))
  with pytest.raises(KilnError, match='holds no config.json: point --workdir at a folder'):
    exporter.export(str(tmp_path), 'jax', str(tmp_path / 'x'))
  assert not os.path.exists(tmp_path / 'x')


@pytest.mark.slow  # A subprocess: the entry point's flags and exit status.
def test_export_cli_writes_and_reports(trained_dir, tmp_path):
  out = tmp_path / 'cli'
  done = subprocess.run([sys.executable, 'export.py', f'--workdir={trained_dir}', '--format=jax',
                         f'--out={out}', '--max_examples=100'], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'jax:' in done.stdout and 'agreement 100.0000%' in done.stdout
  assert _read(out)['examples'] == 100
  done = subprocess.run([sys.executable, 'export.py', f'--workdir={tmp_path}', '--format=jax',
                         f'--out={out}'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode != 0
  assert done.stderr.strip().splitlines()[-1].startswith('error: ')


@pytest.mark.slow
@pytest.mark.parametrize('fmt,max_ratio', [('jax_int8', 0.4), ('jax_int8_dynamic', 0.4),
                                           ('jax_int8_static', 0.4), ('jax_fp16', 0.6),
                                           ('jax_bf16', 0.6)])
def test_models_quantised_in_jax_export_smaller_and_agree(exports, fmt, max_ratio):
  fp32 = exports('jax')[1]
  out, report = exports(fmt)
  assert report['bytes'] < max_ratio * fp32['bytes']
  assert report['label_agreement'] >= 0.95 and report['passed']
  assert report['accuracy'] >= report['jax_accuracy'] - 0.03
  assert report['max_abs_diff'] > 0  # Quantised: compared with the float JAX model.
  assert os.path.basename(report['path']) == 'model.jax'


@pytest.mark.slow  # Trains a tiny GPT, then TensorFlow, TFLite and ONNX conversions.
def test_gpt_logits_export_to_onnx_at_any_batch_size(tmp_path):
  """The Transformer's route through TFLite to ONNX: GELU's erf in plain ops and reshape
  targets fixed from TFLite's shape signatures (tf2onnx mis-built them for a free batch)."""
  from tests.tiny import tiny_gpt_config
  c = tiny_gpt_config()
  c.num_train_steps = c.eval_every_steps = c.checkpoint_every_steps = 10
  c.compilation_cache_dir = ''
  train_and_evaluate(c, str(tmp_path / 'gpt'))
  report = exporter.export(str(tmp_path / 'gpt'), 'onnx', str(tmp_path / 'onnx'))
  assert report['metric'] == 'loss' and report['label_agreement'] == 1.0
  assert report['max_abs_diff'] < 1e-4
  assert report['loss'] == pytest.approx(report['jax_loss'], rel=1e-5)
  run = formats.runner('onnx', report['path'])
  tokens = np.zeros((3, 32), np.int32)
  assert run({'tokens': tokens})['logits'].shape[:2] == (3, 32)
