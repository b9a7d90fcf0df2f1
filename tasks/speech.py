"""Speech tasks: utterance classification, CTC and RNN-T transcription.

All three read the same batches (input_pipeline.audio): normalized log-mel 'features'
with their valid 'frames', SpecAugment applied on the device during training. Eval
reports the task's rate over every eval utterance once (padding masked), overall and,
where the data names speakers (FSDD's speakers.json), per speaker and per accent, as
`<metric>_speaker_<name>` and `<metric>_accent_<group>`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics
from flax import nnx, struct

from core.errors import KilnError
from input_pipeline import audio
from models import IMAGE_CLASSIFIERS, create_model
from models.spectrogram_image import SpectrogramImage
from tasks import decoding
from tasks import fairness
from tasks.base import Batch, Distilled, Serving, Task
from tasks.ctc import ctc_loss, frame_mask
from tasks.rnnt_loss import rnnt_loss
from tasks.spec_augment import spec_augment

SPACE_ID = audio.CHARS.index(' ') + 1


@struct.dataclass
class Rate(metrics.Metric):
  """sum(numerator) / sum(denominator) over examples: accuracy (correct / examples) or an
  error rate (edit errors / reference words), not a mean of per-utterance rates."""
  numerator: jax.Array
  denominator: jax.Array

  def merge(self, other: 'Rate') -> 'Rate':
    return type(self)(self.numerator + other.numerator, self.denominator + other.denominator)

  def compute(self) -> jax.Array:
    return jnp.where(self.denominator > 0, self.numerator / jnp.maximum(self.denominator, 1e-9),
                     jnp.nan)

  @classmethod
  def empty(cls) -> 'Rate':
    return cls(jnp.array(0.0), jnp.array(0.0))


def rate(numerator: str, denominator: str | None = None, speakers: tuple[int, ...] | None = None
         ) -> type[Rate]:
  """A Rate over model outputs `numerator` / `denominator` (1 per example if None),
  restricted to examples whose 'speaker' is in `speakers` when given."""

  @struct.dataclass
  class _Rate(Rate):
    @classmethod
    def from_model_output(cls, mask=None, **outputs) -> Rate:
      num = outputs[numerator].astype(jnp.float32)
      den = jnp.ones_like(num) if denominator is None else outputs[denominator].astype(jnp.float32)
      weight = jnp.ones_like(num) if mask is None else mask.astype(jnp.float32)
      if speakers is not None:
        weight = weight * jnp.isin(outputs['speaker'], jnp.array(speakers)).astype(jnp.float32)
      return cls(jnp.sum(num * weight), jnp.sum(den * weight))
  return _Rate


def metrics_collection(name: str, fields: dict[str, type[metrics.Metric]]):
  return struct.dataclass(type(name, (metrics.Collection,), {'__annotations__': fields}))


class SpeechTask(Task):
  """Shared data loading, model input and SpecAugment; subclasses add the head's loss."""

  # Overall rate metrics: name -> (numerator output, denominator output or None).
  rates: dict[str, tuple[str, str | None]]
  group_rate: str  # The rate reported per speaker and per accent.

  def load_data(self, process_index, process_count):
    self.source = audio.load(self.config, process_index, process_count)
    if self.source.transcribed != self.transcribes:
      kind = 'transcripts' if self.transcribes else 'class labels'
      raise KilnError(f"config.task='{self.config.task}' needs {kind} but dataset "
                      f"'{self.config.dataset.name}' has none: pick a "
                      f"{'transcribed' if self.transcribes else 'labelled'} dataset")
    self.groups = self._load_groups()
    self.metrics_class = self._eval_metrics()
    self.train_metrics_class = metrics_collection(
        'SpeechTrainMetrics', {'loss': metrics.Average.from_output('loss')})

  transcribes = False

  def _eval_metrics(self):
    fields = {'loss': metrics.Average.from_output('loss')}
    fields.update({name: rate(*args) for name, args in self.rates.items()})
    src = self.source
    num, den = self.rates[self.group_rate]
    for i, speaker in enumerate(src.speakers):
      fields[f'{self.group_rate}_speaker_{fairness.slug(speaker)}'] = rate(num, den, (i,))
    for a, accent in enumerate(src.accents):
      members = tuple(i for i, s in enumerate(src.speaker_accent) if s == a)
      fields[f'{self.group_rate}_accent_{fairness.slug(accent)}'] = rate(num, den, members)
    if self.groups is not None:
      fields.update(self._group_fields(fields))
    return metrics_collection(f'{type(self).__name__}Metrics', fields)

  # --- fairness: groups of speakers (config.fairness.group), from speakers.json ---
  def _group_fields(self, existing) -> dict:
    """The per-group and gap metrics config.fairness.group adds (tasks/fairness.py)."""
    raise NotImplementedError

  def _load_groups(self) -> fairness.Groups | None:
    feature = self.config.get('fairness', {}).get('group', '')
    if not feature:
      return None
    src = self.source
    available = (('speaker',) if src.speakers else ()) + tuple(src.speaker_features)
    fairness.check_feature(feature, available, f"dataset '{self.config.dataset.name}'")
    if feature == 'speaker':
      names, table = src.speakers, list(range(len(src.speakers)))
    else:
      values = src.speaker_features[feature]
      names = tuple(sorted(set(values)))
      table = [names.index(v) for v in values]
    train_speakers = fairness.whole_split_feature(src.train, 'speaker')
    train_groups = np.asarray(table, np.int32)[train_speakers[train_speakers >= 0]]
    self.speaker_group = tuple(table)  # Group of each speaker.
    return fairness.Groups(feature, tuple(names),
                           lambda batch: fairness.lookup(table, self._speaker(batch)),
                           fairness.train_counts(src.train, train_groups, len(names)))

  def _group_outputs(self, batch) -> dict:
    return {} if self.groups is None else {'group': self.groups.of_batch(batch)}
  # --- end fairness ---

  @property
  def num_train_examples(self):
    train = self.source.train
    return train.num_examples * (1 if train.sliced else train.process_count)

  @property
  def model_input_shape(self):
    return (self.source.max_frames, self.source.num_mels)

  def build_model(self, rngs, norm_axis_name=None):
    if self.config.model.name in IMAGE_CLASSIFIERS:  # Classification overrides this method.
      raise KilnError(f"config.model.name='{self.config.model.name}' gives one answer per "
                      f"utterance, but task '{self.config.task}' labels frames: choose a "
                      "frame-wise encoder (lstm, conformer; transducer for RNN-T)")
    return create_model(self.config.model, rngs, input_dim=self.source.num_mels,
                        num_outputs=self.source.num_classes, vocab_size=self.source.num_classes,
                        max_label_len=self.source.max_label_len, norm_axis_name=norm_axis_name)

  def augment(self, batch: Batch, rngs: nnx.Rngs) -> jax.Array:
    a = self.config.audio
    if not (a.freq_masks or a.time_masks):
      return batch['features']
    return spec_augment(rngs.dropout(), batch['features'], batch['frames'],
                        freq_masks=a.freq_masks, freq_width=a.freq_width,
                        time_masks=a.time_masks, time_width=a.time_width,
                        time_width_fraction=a.time_width_fraction)

  def _speaker(self, batch):
    return batch.get('speaker', jnp.full(batch['frames'].shape, -1, jnp.int32))

  # --- serving: clients send log-mel features (input_pipeline.audio.batch_features) ---
  def _speech_serving(self, forward, score, predicted_labels, metric: str) -> Serving:
    a = self.config.audio
    max_frames = audio.eval_max_frames(a)
    return Serving(
        inputs={'features': ((max_frames, self.source.num_mels), 'float32'),
                'frames': ((), 'int32')},
        forward=forward,
        inputs_from_batch=lambda batch: {'features': np.asarray(batch['features'], np.float32),
                                         'frames': np.asarray(batch['frames'], np.int32)},
        score=score, predicted_labels=predicted_labels, metric=metric,
        preprocessing={'features': {
            'function': 'input_pipeline.audio.batch_features', 'kind': 'log-mel power',
            'num_mels': a.num_mels, 'window_ms': a.window_ms, 'hop_ms': a.hop_ms,
            'max_frames': max_frames, 'window': 'hann', 'log_floor': audio.LOG_FLOOR,
            'normalization': 'per utterance and mel bin: zero mean, unit variance over the '
                             'valid frames; zero past them'},
            'frames': 'valid frames of each utterance (at most max_frames)'})
  # --- end serving ---


class SpeechClassification(SpeechTask):
  """One label per utterance: frame logits averaged over the valid frames (the same as
  classifying the mean-pooled encoder output, since the head is linear)."""
  rates = {'accuracy': ('correct', None)}
  group_rate = 'accuracy'

  def build_model(self, rngs, norm_axis_name=None):
    """A speech encoder, or an image classifier (config.model.name in IMAGE_CLASSIFIERS)
    over the log-mel frames as a one-channel image [max_frames, num_mels, 1]."""
    if self.config.model.name not in IMAGE_CLASSIFIERS:
      return super().build_model(rngs, norm_axis_name)
    a = self.config.audio
    if audio.eval_max_frames(a) != a.max_frames:
      raise KilnError(f"config.model.name='{self.config.model.name}' sees a fixed image of "
                      f'config.audio.max_frames={a.max_frames} frames, but '
                      f'config.audio.eval_max_frames={a.eval_max_frames}: set it to 0')
    return SpectrogramImage(create_model(
        self.config.model, rngs, num_classes=self.source.num_classes,
        input_shape=(*self.model_input_shape, 1), norm_axis_name=norm_axis_name))

  def _logits(self, model, features, batch, train, rngs=None):
    frame_logits, frames = model(features, batch['frames'], train=train, rngs=rngs)
    weights = frame_mask(frames, frame_logits.shape[1])[..., None]
    return (frame_logits * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)

  fairness_gaps = fairness.GAPS

  def _group_fields(self, existing):
    return fairness.eval_fields(self.groups, self.source.num_classes, 'accuracy', existing)

  def _example_losses(self, logits, batch):
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    return per_example, self.train_metrics_class.single_from_model_output(loss=per_example)

  def _train_loss(self, logits, batch):
    per_example, batch_metrics = self._example_losses(logits, batch)
    return per_example.mean(), batch_metrics

  def example_train_losses(self, model, batch, rngs):
    return self._example_losses(
        self._logits(model, self.augment(batch, rngs), batch, True, rngs), batch)

  def loss(self, model, batch, rngs):
    per_example, batch_metrics = self.example_train_losses(model, batch, rngs)
    return per_example.mean(), batch_metrics

  def distillation_outputs(self, model, batch, rngs, teacher):
    # The teacher hears the student's SpecAugmented features: the same input, so the soft
    # term compares the two models' views of one utterance.
    features = self.augment(batch, rngs)
    logits = self._logits(model, features, batch, True, rngs)
    loss, batch_metrics = self._train_loss(logits, batch)
    teacher_logits = jax.lax.stop_gradient(self._logits(teacher, features, batch, False))
    return Distilled(loss, batch_metrics, logits, teacher_logits,
                     jnp.ones(logits.shape[:-1], jnp.float32))

  def evaluate(self, model, batch):
    return self._score(self._logits(model, batch['features'], batch, False), batch)

  def serving(self):
    return self._speech_serving(
        lambda model, inputs: {'logits': self._logits(model, inputs['features'], inputs, False)},
        lambda model, outputs, batch: self._score(outputs['logits'], batch),
        lambda outputs: np.argmax(outputs['logits'], -1), metric='accuracy')

  def _score(self, logits, batch):
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    predicted = jnp.argmax(logits, -1)
    return self.metrics_class.single_from_model_output(
        loss=per_example, correct=predicted == batch['label'], speaker=self._speaker(batch),
        mask=batch['mask'], label=batch['label'], predicted=predicted,
        **self._group_outputs(batch))


class _Transcription(SpeechTask):
  transcribes = True
  group_rate = 'wer'
  fairness_gaps = ('worst_group_wer', 'group_wer_gap')

  def _group_fields(self, existing):
    fields = {}
    groups = self.groups
    for g, name in enumerate(groups.names):
      field = f'wer_{groups.feature}_{fairness.slug(name)}'
      if field not in existing:
        fields[field] = rate('word_errors', 'words',
                             tuple(i for i, s in enumerate(self.speaker_group) if s == g))
    return {**fields, **fairness.error_rate_fields(groups, 'wer', 'word_errors', 'words')}

  @property
  def rates(self):
    rates = {'wer': ('word_errors', 'words'), 'cer': ('char_errors', 'chars')}
    if self.config.decoding.beam_size > 0:
      rates.update({'beam_wer': ('beam_word_errors', 'words'),
                    'beam_cer': ('beam_char_errors', 'chars')})
    return rates

  def load_data(self, process_index, process_count):
    if self.config.decoding.beam_size < 0:
      raise KilnError(f'config.decoding.beam_size={self.config.decoding.beam_size} must be >= 0 '
                      '(0: greedy decoding only)')
    super().load_data(process_index, process_count)

  def _scores(self, hyp, hyp_len, batch, prefix=''):
    word_errors, words, char_errors, chars = decoding.error_counts(
        hyp, hyp_len, batch['labels'], batch['label_len'], SPACE_ID)
    return {f'{prefix}word_errors': word_errors, 'words': words,
            f'{prefix}char_errors': char_errors, 'chars': chars}

  def _eval_outputs(self, per_utterance, greedy, beam, batch):
    outputs = {'loss': per_utterance, 'speaker': self._speaker(batch), 'mask': batch['mask'],
               **self._group_outputs(batch)}
    outputs.update(self._scores(*greedy, batch))
    if beam is not None:
      outputs.update(self._scores(*beam, batch, prefix='beam_'))
    return self.metrics_class.single_from_model_output(**outputs)


class SpeechCTC(_Transcription):
  """Encoder frame logits over blank + characters, trained with CTC; impossible
  utterance/transcript pairs (too few frames) are left out of the loss."""

  def _loss(self, model, features, batch, train, rngs=None):
    logits, frames = model(features, batch['frames'], train=train, rngs=rngs)
    return self._ctc(logits, frames, batch)

  def _ctc(self, logits, frames, batch):
    per_utterance, feasible = ctc_loss(logits, frames, batch['labels'], batch['label_len'])
    return logits, frames, jnp.where(feasible, per_utterance, 0.0), feasible

  def loss(self, model, batch, rngs):
    _, _, per_utterance, feasible = self._loss(model, self.augment(batch, rngs), batch, True, rngs)
    loss = per_utterance.sum() / jnp.maximum(feasible.sum(), 1)
    return loss, self.train_metrics_class.single_from_model_output(
        loss=per_utterance, mask=feasible)

  def evaluate(self, model, batch):
    return self._score(*model(batch['features'], batch['frames'], train=False), batch)

  def serving(self):
    # Frame logits and their valid count; greedy or beam decoding is the server's.
    def forward(model, inputs):
      logits, frames = model(inputs['features'], inputs['frames'], train=False)
      return {'logits': logits, 'frames': frames}
    return self._speech_serving(
        forward, lambda model, outputs, batch: self._score(outputs['logits'], outputs['frames'],
                                                           batch),
        lambda outputs: np.argmax(outputs['logits'], -1), metric='wer')

  def _score(self, logits, frames, batch):
    logits, frames, per_utterance, _ = self._ctc(logits, frames, batch)
    log_probs = jax.nn.log_softmax(logits, -1)
    greedy = decoding.ctc_greedy(log_probs, frames)
    beam = None
    if self.config.decoding.beam_size > 0:
      beam = decoding.ctc_beam_search(log_probs, frames, self.config.decoding.beam_size,
                                      batch['labels'].shape[-1])  # Eval's own label width.
    return self._eval_outputs(per_utterance, greedy, beam, batch)


class SpeechRNNT(_Transcription):
  """Transducer: encoder, prediction network and joint network, with the RNN-T loss of
  tasks/rnnt_loss.py; greedy and beam decoding from tasks/decoding.py."""
  prediction_method = 'joint_lattice'  # The loss scores its logits; __call__ is not used.

  def _loss(self, model, features, batch, train, rngs=None):
    encoded, frames = model.encode(features, batch['frames'], train=train, rngs=rngs)
    logits = model.joint_lattice(encoded, batch['labels'], train=train, rngs=rngs)
    return encoded, frames, rnnt_loss(logits, jnp.maximum(frames, 1), batch['labels'],
                                      batch['label_len'])

  def loss(self, model, batch, rngs):
    _, _, per_utterance = self._loss(model, self.augment(batch, rngs), batch, True, rngs)
    return per_utterance.mean(), self.train_metrics_class.single_from_model_output(
        loss=per_utterance)

  def evaluate(self, model, batch):
    encoded, frames, per_utterance = self._loss(model, batch['features'], batch, False)
    per_utterance = jnp.where(batch['mask'] > 0, per_utterance, 0.0)
    greedy, beam = self.transcribe(model, encoded, frames, batch['labels'].shape[-1],
                                   self.config.decoding)  # Eval's own label width.
    return self._eval_outputs(per_utterance, greedy, beam, batch)

  @staticmethod
  def transcribe(model, encoded, frames, max_len: int, options):
    """Encoder outputs -> (greedy (ids, lengths), beam (ids, lengths) or None), as `options`
    (config.decoding's fields) sets them. The beam's answer is the one of its n-best and
    greedy's with the highest p(y | x) over every alignment (its own scores only count the
    alignments it kept), so it never scores below greedy's under the model."""
    projected = model.project_encoder(encoded)
    args = (model.joint_step, model.predict_step, model.initial_prediction(encoded.shape[0]),
            projected, frames, max_len)
    greedy = decoding.rnnt_greedy(*args, options.max_symbols_per_frame)
    if options.beam_size == 0:
      return greedy, None
    # Runs trained before the field existed lack it: their beams take greedy's budget too.
    beam_symbols = options.get('beam_max_symbols_per_frame', 0) or options.max_symbols_per_frame
    ids, lengths, scores = decoding.rnnt_beam_search(*args, options.beam_size, beam_symbols)
    live = jnp.pad(scores > decoding.NEG / 2, ((0, 0), (0, 1)), constant_values=True)
    return greedy, decoding.most_likely(
        functools.partial(SpeechRNNT.log_prob, model, encoded, frames),
        jnp.concatenate([ids, greedy[0][:, None]], 1),
        jnp.concatenate([lengths, greedy[1][:, None]], 1), live)

  @staticmethod
  def log_prob(model, encoded, frames, labels, label_len):
    """log p(labels | x) over every alignment, per utterance [B]."""
    return -rnnt_loss(model.joint_lattice(encoded, labels), jnp.maximum(frames, 1), labels,
                      label_len)
