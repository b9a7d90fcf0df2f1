"""The served model: one pure predict function compiled ahead of time for each batch-size
bucket (1, 2, 4, ... max_batch_size), so that no request ever waits on a compile.

A request of n examples runs in the smallest bucket >= n, padded with copies of its last row
(a copy is a valid input for every task, where zeros may not be: an all-padding BERT row). The
model comes from a trained workdir (loop/trained.py: the newest checkpoint, LoRA merged, EMA
where the run evaluated with it) or from a `jax` export folder (model.jax + signature.json).
"""

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from core import integrity
from core.errors import KilnError
from input_pipeline import audio
from loop import trained as trained_lib
from tasks import detection

# Tasks whose `logits` name a class per example: the server adds probabilities and classes.
CLASSIFIERS = ('classification', 'sequence_classification', 'speech_classification')
SPEECH = ('speech_classification', 'speech_ctc')  # Tasks on log-mel features: they take WAVs.
EXPORT_FILE, SIGNATURE_FILE = 'model.jax', 'signature.json'  # What export.py --format=jax writes.


def buckets(max_batch_size: int) -> tuple[int, ...]:
  """1, 2, 4, ... up to max_batch_size (always included)."""
  if max_batch_size < 1:
    raise KilnError(f'--max_batch_size={max_batch_size} must be at least 1')
  sizes, size = [], 1
  while size < max_batch_size:
    sizes.append(size)
    size *= 2
  return (*sizes, max_batch_size)


def with_class_outputs(predict: Callable[[dict], dict]) -> Callable[[dict], dict]:
  """`predict` plus softmax probabilities and the argmax class of its `logits`, computed in
  the same compiled program."""
  def predict_with_classes(inputs):
    outputs = dict(predict(inputs))
    logits = outputs['logits'].astype(jnp.float32)
    outputs['probabilities'] = jax.nn.softmax(logits, axis=-1)
    outputs['classes'] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return outputs
  return predict_with_classes


def with_detections(predict: Callable[[dict], dict], model, config) -> Callable[[dict], dict]:
  """`predict` plus the detector's boxes, scores and classes after NMS (tasks/detection's
  `decode`, the eval's own; empty slots have score 0 and class -1), in the same program."""
  def predict_with_boxes(inputs):
    outputs = dict(predict(inputs))
    outputs['boxes'], outputs['scores'], outputs['classes'] = detection.decode(
        model, outputs['raw'], config)
    return outputs
  return predict_with_boxes


@dataclasses.dataclass
class ServedModel:
  """A model ready to answer: its signature, compiled buckets and the task's extras."""
  name: str  # The {name} of /v1/models/{name}.
  version: int  # The checkpoint step (TF Serving's model version).
  task: str  # config.task of the run.
  inputs: dict[str, tuple[tuple[int, ...], np.dtype]]  # One example's shape and dtype per input.
  predict: Callable[[dict], dict]  # Batched inputs -> batched outputs (traceable).
  max_batch_size: int
  preprocessing: dict[str, Any] = dataclasses.field(default_factory=dict)
  label_names: tuple[str, ...] | None = None  # Class i's name, where the data has names.
  tokenizer: Any = None  # Text tasks: turns request text into tokens (and generated ids back).
  audio_spec: audio.FeatureSpec | None = None  # Speech tasks: how a WAV becomes features.
  outputs: dict[str, tuple[tuple[int, ...], np.dtype]] = dataclasses.field(default_factory=dict)
  _compiled: dict[int, Any] = dataclasses.field(default_factory=dict)

  @property
  def buckets(self) -> tuple[int, ...]:
    return buckets(self.max_batch_size)

  @property
  def ready(self) -> bool:
    return len(self._compiled) == len(self.buckets)

  def specs(self, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {name: jax.ShapeDtypeStruct((batch, *shape), dtype)
            for name, (shape, dtype) in self.inputs.items()}

  def compile(self) -> None:
    """Compiles and runs every bucket once (warm-up): after this, requests only execute."""
    out = jax.eval_shape(self.predict, self.specs(1))
    self.outputs = {name: (tuple(v.shape[1:]), np.dtype(v.dtype)) for name, v in out.items()}
    jitted = jax.jit(self.predict)
    for size in self.buckets:
      compiled = jitted.lower(self.specs(size)).compile()
      zeros = {name: np.zeros((size, *shape), dtype)
               for name, (shape, dtype) in self.inputs.items()}
      jax.block_until_ready(compiled(zeros))
      self._compiled[size] = compiled
      logging.info('Compiled %s for batch %d', self.name, size)

  def bucket(self, n: int) -> int:
    for size in self.buckets:
      if size >= n:
        return size
    raise KilnError(f'{n} examples exceed max_batch_size={self.max_batch_size}')

  def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Batched numpy inputs (n <= max_batch_size rows, dtypes as declared) -> numpy outputs."""
    n = len(next(iter(inputs.values())))
    size = self.bucket(n)
    padded = {}
    for name, value in inputs.items():
      if size > n:
        value = np.concatenate([value, np.repeat(value[-1:], size - n, axis=0)])
      padded[name] = value
    outputs = self._compiled[size](padded)
    return {name: np.asarray(value)[:n] for name, value in outputs.items()}


def from_trained(trained: trained_lib.Trained, name: str, max_batch_size: int) -> ServedModel:
  """A loaded run (loop.trained.load) as a ServedModel (not yet compiled)."""
  serving, task = trained.serving, trained.config.task
  predict = trained_lib.predict_fn(trained.model, serving)
  if task in CLASSIFIERS:
    predict = with_class_outputs(predict)
  elif task == 'detection':
    predict = with_detections(predict, trained_lib.host_model(trained.model),
                              trained.config.detection)
  source = getattr(trained.exp.task, 'source', None)
  label_names = getattr(source, 'label_names', None) or getattr(source, 'class_names', None)
  audio_spec = None
  if task in SPEECH and getattr(source, 'sample_rate', 0):
    config_audio = trained.config.audio
    audio_spec = audio.FeatureSpec.from_config(config_audio, source.sample_rate).for_eval(
        config_audio)
  return ServedModel(
      name=name, version=int(trained.step), task=task,
      inputs={k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in serving.inputs.items()},
      predict=predict, max_batch_size=max_batch_size, preprocessing=serving.preprocessing,
      label_names=tuple(label_names) if label_names else None,
      tokenizer=getattr(trained.exp.task, 'tokenizer', None), audio_spec=audio_spec)


def from_export(folder: str, name: str, max_batch_size: int) -> ServedModel:
  """A `jax` export folder (export.py --format=jax) as a ServedModel: the batch-polymorphic
  artifact is compiled per bucket like a live model. No tokenizer travels with an export, so
  text tasks take token ids only. Its files are checked against the export's manifest first."""
  integrity.verify_export(folder)
  try:
    with open(os.path.join(folder, SIGNATURE_FILE)) as f:
      signature = json.load(f)
    with open(os.path.join(folder, EXPORT_FILE), 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
  except (OSError, ValueError) as e:
    raise KilnError(f"'{folder}' is not a readable jax export ({e}): write one with "
                    'export.py --format=jax') from None
  task = signature.get('task', '')
  predict = exported.call
  if task in CLASSIFIERS and 'logits' in signature.get('outputs', {}):
    predict = with_class_outputs(predict)
  version = 1
  try:
    with open(os.path.join(folder, 'export.json')) as f:
      version = int(json.load(f).get('step', 1))
  except (OSError, ValueError):
    pass
  return ServedModel(
      name=name, version=version, task=task,
      inputs={k: (tuple(v['shape'][1:]), np.dtype(v['dtype']))
              for k, v in signature['inputs'].items()},
      predict=predict, max_batch_size=max_batch_size,
      preprocessing=signature.get('preprocessing', {}))


def is_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, EXPORT_FILE))


def _numbered(folder: str) -> dict[int, str]:
  """Sub-folders named by a number (written elsewhere and renamed into place when complete,
  as Orbax and TF Serving's version folders are)."""
  try:
    names = os.listdir(folder)
  except OSError:
    return {}
  return {int(n): os.path.join(folder, n) for n in names
          if n.isdigit() and os.path.isdir(os.path.join(folder, n))}


def version_folders(path: str) -> dict[int, str]:
  """TF Serving's layout, DIR/<version>/, each a jax export or a trained workdir; {} when
  `path` is itself a model."""
  if is_export(path) or os.path.isfile(os.path.join(path, 'config.json')):
    return {}
  return _numbered(path)


def latest_version(path: str) -> int | None:
  """The version `load(path)` would serve now: the newest DIR/<version>/, else a workdir's
  newest checkpoint step, else an export's step; None when there is none yet."""
  versions = version_folders(path)
  if versions:
    return max(versions)
  if is_export(path):
    try:
      with open(os.path.join(path, 'export.json')) as f:
        return int(json.load(f).get('step', 1))
    except (OSError, ValueError):
      return 1
  steps = _numbered(os.path.join(path, 'checkpoints'))
  return max(steps) if steps else None


def load(path: str, name: str, max_batch_size: int, defaults=None) -> ServedModel:
  """A trained workdir, a jax export folder, or the newest DIR/<version>/ of either,
  uncompiled; `defaults` fill config sections an older run predates (the entry point passes
  configs/base.py's)."""
  buckets(max_batch_size)  # Checks it before the (slow) load.
  versions = version_folders(path)
  if versions:
    version = max(versions)
    model = load(versions[version], name, max_batch_size, defaults)
    model.version = version
    return model
  if is_export(path):
    return from_export(path, name, max_batch_size)
  return from_trained(trained_lib.load(path, defaults), name, max_batch_size)
