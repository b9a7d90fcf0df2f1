"""Task.serving(): what export and serving run reproduces the task's own eval.

For every task with a signature, the eval metrics of a batch equal the metrics `score`
computes from `forward` on `inputs_from_batch` of that batch (images are given back as [0, 1]
pixels and normalised inside the forward pass), and the inputs match the declared specs.
"""

import numpy as np
import pytest
from flax import nnx

from configs import speech_ctc_lstm, speech_digits, yolo_mnist_canvas
from loop.experiment import build_experiment
from tests.tiny import tiny_bert_classify_config, tiny_config, tiny_gpt_config


def _speech(get_config, name, task, train_split, eval_split):
  def make():
    c = get_config()
    c.dataset.name = f'tfds:{name}'
    c.dataset.train_split, c.dataset.eval_split = train_split, eval_split
    c.audio.max_frames = 50
    c.batch_size = c.eval_batch_size = 8
    return c
  make.mock = True
  return make


def _mnist_normalised():
  c = tiny_config()
  c.augment.mean, c.augment.std = (0.5,), (0.25,)  # Inputs arrive in [0, 1]; the model normalises.
  return c


def _detection():
  c = yolo_mnist_canvas.get_config()
  c.detection.num_train_canvases = 32
  c.detection.num_eval_canvases = 16
  c.batch_size = c.eval_batch_size = 8
  return c


CASES = {
    'classification': (tiny_config, 'accuracy'),
    'classification_normalised': (_mnist_normalised, 'accuracy'),
    'detection': (_detection, 'map50'),
    'causal_lm': (tiny_gpt_config, 'loss'),
    'sequence_classification': (tiny_bert_classify_config, 'accuracy'),
    'speech_classification': (_speech(speech_digits.get_config, 'speech_commands',
                                      'speech_classification', 'train', 'test'), 'accuracy'),
    'speech_ctc': (_speech(speech_ctc_lstm.get_config, 'librispeech', 'speech_ctc',
                           'train_clean100', 'test_clean'), 'wer'),
}


FAST = ('classification_normalised',)  # The rest run eagerly for long.


@pytest.mark.parametrize('case', [
    case if case in FAST else pytest.param(case, marks=pytest.mark.slow) for case in sorted(CASES)])
def test_serving_forward_and_score_reproduce_eval(case):
  import tensorflow_datasets as tfds
  make, metric = CASES[case]
  config = make()
  if getattr(make, 'mock', False):
    with tfds.testing.mock_data(num_examples=6):
      exp = build_experiment(config)
      batch = next(iter(exp.task.eval_batches(8)))
  else:
    exp = build_experiment(config)
    batch = next(iter(exp.task.eval_batches(exp.host_eval_batch)))
  model = exp.template.build_model(nnx.Rngs(0))
  serving = exp.task.serving()
  assert serving.metric == metric

  inputs = serving.inputs_from_batch(batch)
  assert set(inputs) == set(serving.inputs)
  size = len(batch['mask'])
  for name, (shape, dtype) in serving.inputs.items():
    assert inputs[name].shape == (size, *shape) and inputs[name].dtype == np.dtype(dtype)

  outputs = serving.forward(model, inputs)
  served = serving.score(model, outputs, batch).compute()
  evaluated = exp.task.evaluate(model, batch).compute()
  assert set(served) == set(evaluated)
  for key, value in evaluated.items():
    np.testing.assert_allclose(served[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
  labels = np.asarray(serving.predicted_labels(outputs))
  assert labels.shape[0] == size
