"""Speech on the host: WAV reading, log-mel features, FSDD and TFDS sources.

SpecAugment runs on the device, inside the train step: tasks/spec_augment.py.

Every example is a dict of fixed-shape arrays, so that one compiled step serves every
batch: 'features' float32[max_frames, num_mels] (per-utterance normalized log-mel,
zero past the utterance), 'frames' int32 (valid frames), 'label' int32 (classification:
the class) or 'labels' int32[max_label_len] + 'label_len' int32 (transcription: the
transcript's character ids, 0 past the end), 'speaker' int32 (index into
`SpeechSource.speakers`, -1 where unknown) and 'index' int32 (position in its split).
Eval examples take config.audio.eval_max_frames / eval_max_label_len when these are set,
so that long test utterances are scored whole.

Sources ('config.dataset.name'):
- 'fsdd': the Free Spoken Digit Dataset's WAV files, one digit per utterance, with the
  official split (recording index 0-4 test, 5-49 train).
- 'fsdd_connected': 1-5 recordings of one speaker joined by short silences, labelled
  with the words ("three one four"). Train utterances use only train recordings and
  test utterances only test recordings, so no test recording reaches training.
- 'tfds:spoken_digit' (FSDD in TFDS; its one split is cut by the same index rule),
  'tfds:speech_commands' (keyword classes), 'tfds:librispeech' (transcripts).

Features are computed with tf.signal (25 ms Hann windows every 10 ms, a mel filter bank,
log), the same code for the in-memory FSDD sets and the streaming TFDS ones.
"""

import dataclasses
import json
import re
import wave
from pathlib import Path

import numpy as np
import tensorflow as tf

from core.errors import KilnError
from input_pipeline import sources
from input_pipeline.sources import TFDS_PREFIX, HostSplit

# Transcript alphabet: id 0 is the CTC / RNN-T blank (and label padding), then these.
CHARS = " abcdefghijklmnopqrstuvwxyz'"
VOCAB_SIZE = len(CHARS) + 1
DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
LOCAL_SPEECH_SOURCES = ('fsdd', 'fsdd_connected')
TFDS_SPEECH = {  # TFDS name -> (audio feature, label feature or None, transcript feature or None)
    'spoken_digit': ('audio', 'label', None),
    'speech_commands': ('audio', 'label', None),
    'librispeech': ('speech', None, 'text'),
}
FSDD_TEST_INDICES = range(0, 5)  # The official FSDD split: recordings 0-4 of each are test.
_FSDD_NAME = re.compile(r'^(?P<digit>\d)_(?P<speaker>[A-Za-z]+)_(?P<index>\d+)\.wav$')
_SUBSAMPLE_STREAM = 0x73756273  # Keeps the subsample's draw apart from other uses of split_seed.
LOG_FLOOR = 1e-6  # Added to mel energies before the log, so digital silence stays finite.


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """How waveforms become frames; taken from config.audio."""
  sample_rate: int
  num_mels: int
  window_ms: float
  hop_ms: float
  max_frames: int

  @property
  def window(self) -> int:
    return int(round(self.sample_rate * self.window_ms / 1000))

  @property
  def hop(self) -> int:
    return int(round(self.sample_rate * self.hop_ms / 1000))

  @property
  def fft_length(self) -> int:
    return 1 << (self.window - 1).bit_length()

  @classmethod
  def from_config(cls, audio, sample_rate: int) -> 'FeatureSpec':
    if audio.num_mels < 1 or audio.max_frames < 1 or not 0 < audio.hop_ms <= audio.window_ms:
      raise KilnError(f'config.audio: num_mels={audio.num_mels} and max_frames='
                      f'{audio.max_frames} must be >= 1 and 0 < hop_ms={audio.hop_ms} <= '
                      f'window_ms={audio.window_ms}')
    return cls(sample_rate, audio.num_mels, audio.window_ms, audio.hop_ms, audio.max_frames)

  def for_eval(self, audio) -> 'FeatureSpec':
    """The spec of eval utterances: config.audio.eval_max_frames frames (0: max_frames), so
    that long test utterances can be scored whole while training keeps shorter windows."""
    return dataclasses.replace(self, max_frames=eval_max_frames(audio))


def eval_label_len(audio) -> int:
  """Characters per padded eval transcript: config.audio.eval_max_label_len (0: the
  training max_label_len), so that references are scored uncut."""
  return _eval_size(audio, 'max_label_len')


def eval_max_frames(audio) -> int:
  """Frames per padded eval utterance: config.audio.eval_max_frames (0: max_frames)."""
  return _eval_size(audio, 'max_frames')


def _eval_size(audio, field: str) -> int:
  """config.audio.eval_<field>, or the training <field> where it is 0."""
  size = audio[f'eval_{field}']
  if size < 0:
    raise KilnError(f'config.audio.eval_{field}={size} must be >= 0 (0 keeps {field})')
  return size or audio[field]


@dataclasses.dataclass(frozen=True)
class SpeechSource:
  train: HostSplit
  eval: HostSplit
  num_mels: int
  max_frames: int
  num_classes: int  # Classification: labels; transcription: VOCAB_SIZE (blank included).
  max_label_len: int  # Transcription: characters per padded transcript; 0 for classes.
  speakers: tuple[str, ...] = ()  # Speaker i of the 'speaker' field; () if unknown.
  accents: tuple[str, ...] = ()  # Accent groups from speakers.json.
  speaker_accent: tuple[int, ...] = ()  # Accent index of each speaker.
  # speakers.json's text fields (accent, gender, ...) -> each speaker's value ('unknown' if none).
  speaker_features: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  class_names: tuple[str, ...] = ()
  sample_rate: int = 0  # Hz of the waveforms the features came from (serve/ reads WAVs at it).

  @property
  def transcribed(self) -> bool:
    return self.max_label_len > 0


# ----------------------------------------------------------------------------- features

def read_wav(path) -> np.ndarray:
  """Mono 16-bit PCM WAV -> float32 samples in [-1, 1)."""
  with wave.open(str(path)) as f:
    if f.getsampwidth() != 2 or f.getnchannels() != 1:
      raise KilnError(f"'{path}' is not mono 16-bit PCM: convert it (e.g. sox in.wav -b 16 -c 1 "
                      'out.wav)')
    raw = f.readframes(f.getnframes())
  return np.frombuffer(raw, '<i2').astype(np.float32) / 32768.0


def num_frames(num_samples, spec: FeatureSpec):
  """Frames tf.signal.stft yields for a waveform (windows wholly inside it), at least 1."""
  return np.maximum(1 + (np.asarray(num_samples) - spec.window) // spec.hop, 1)


def log_mel(waveforms: tf.Tensor, spec: FeatureSpec) -> tf.Tensor:
  """[..., samples] float32 -> [..., frames, num_mels] log mel energies (power spectrum)."""
  short = tf.maximum(spec.window - tf.shape(waveforms)[-1], 0)  # Clips shorter than a window.
  paddings = tf.concat([tf.zeros([tf.rank(waveforms) - 1, 2], tf.int32), [[0, short]]], 0)
  waveforms = tf.pad(waveforms, paddings)
  stft = tf.signal.stft(waveforms, spec.window, spec.hop, spec.fft_length,
                        window_fn=tf.signal.hann_window, pad_end=False)
  power = tf.math.square(tf.abs(stft))
  weights = tf.signal.linear_to_mel_weight_matrix(
      spec.num_mels, spec.fft_length // 2 + 1, spec.sample_rate, 20.0, spec.sample_rate / 2)
  return tf.math.log(tf.tensordot(power, weights, 1) + LOG_FLOOR)


def normalize_and_pad(features: tf.Tensor, frames: tf.Tensor, max_frames: int) -> tf.Tensor:
  """Per utterance and mel bin: zero mean, unit variance over its valid frames, which
  removes the recording's gain and channel colour; frames past `frames` become 0 and
  the result is cut or padded to `max_frames`."""
  length = tf.shape(features)[-2]
  frames = tf.convert_to_tensor(frames)[..., None, None]  # Broadcasts over [..., T, M].
  valid = tf.cast(tf.range(length)[:, None] < frames, features.dtype)
  count = tf.maximum(tf.reduce_sum(valid, -2, keepdims=True), 1.0)
  mean = tf.reduce_sum(features * valid, -2, keepdims=True) / count
  var = tf.reduce_sum(tf.square(features - mean) * valid, -2, keepdims=True) / count
  out = (features - mean) * tf.math.rsqrt(var + 1e-5) * valid
  out = out[..., :max_frames, :]
  pad = tf.maximum(max_frames - tf.shape(out)[-2], 0)
  paddings = tf.concat([tf.zeros([tf.rank(out) - 2, 2], tf.int32), [[0, pad], [0, 0]]], 0)
  return tf.pad(out, paddings)


def utterance_features(waveform: tf.Tensor, spec: FeatureSpec) -> tuple[tf.Tensor, tf.Tensor]:
  """One waveform -> (features [max_frames, num_mels], valid frames (cut at max_frames))."""
  feats = log_mel(waveform, spec)
  frames = tf.minimum(tf.shape(feats)[0], spec.max_frames)
  out = normalize_and_pad(feats, frames, spec.max_frames)
  return tf.ensure_shape(out, [spec.max_frames, spec.num_mels]), frames


def batch_features(waveforms: list[np.ndarray], spec: FeatureSpec, chunk: int = 256
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Many waveforms -> ([N, max_frames, num_mels] float32, [N] int32 frames), computed in
  zero-padded chunks (padding only adds frames past each utterance's end, which are cut)."""
  feats, frames = [], []
  for start in range(0, len(waveforms), chunk):
    part = waveforms[start:start + chunk]
    lengths = np.array([len(w) for w in part])
    padded = np.zeros((len(part), max(lengths.max(), spec.window)), np.float32)
    for row, w in enumerate(part):
      padded[row, :len(w)] = w
    valid = np.minimum(num_frames(lengths, spec), spec.max_frames).astype(np.int32)
    mel = log_mel(tf.constant(padded), spec)
    feats.append(normalize_and_pad(mel, tf.constant(valid), spec.max_frames).numpy())
    frames.append(valid)
  return np.concatenate(feats), np.concatenate(frames)


# ----------------------------------------------------------------------------- text

def encode_text(text: str, max_label_len: int) -> tuple[np.ndarray, int]:
  """Transcript -> (ids [max_label_len], length); lower-cased, characters outside CHARS
  dropped, longer transcripts cut."""
  ids = [CHARS.index(c) + 1 for c in text.lower() if c in CHARS][:max_label_len]
  out = np.zeros(max_label_len, np.int32)
  out[:len(ids)] = ids
  return out, len(ids)


def decode_ids(ids) -> str:
  """Character ids (0 = blank, skipped) -> text."""
  return ''.join(CHARS[i - 1] for i in ids if 0 < i <= len(CHARS))


def tf_encode_text(text: tf.Tensor, max_label_len: int) -> tuple[tf.Tensor, tf.Tensor]:
  """encode_text for a string tensor inside tf.data."""
  chars = tf.strings.unicode_split(tf.strings.lower(text), 'UTF-8')
  table = tf.constant(list(CHARS))
  match = tf.cast(tf.equal(chars[:, None], table[None, :]), tf.int32)
  known = tf.reduce_any(match > 0, 1)
  ids = tf.boolean_mask(tf.argmax(match, 1, output_type=tf.int32) + 1, known)[:max_label_len]
  length = tf.shape(ids)[0]
  return tf.ensure_shape(tf.pad(ids, [[0, max_label_len - length]]), [max_label_len]), length


# ----------------------------------------------------------------------------- FSDD

@dataclasses.dataclass(frozen=True)
class Recording:
  digit: int
  speaker: str
  index: int
  path: Path

  @property
  def is_test(self) -> bool:
    return self.index in FSDD_TEST_INDICES


def fsdd_dir(data_dir: str) -> Path:
  """The FSDD folder (holding recordings/ and speakers.json), checked."""
  root = Path(data_dir).expanduser() if data_dir else sources.shared_datasets_dir() / 'fsdd'
  if not (root / 'recordings').is_dir() or not any((root / 'recordings').glob('*.wav')):
    raise KilnError(f"no FSDD recordings in '{root / 'recordings'}': point config.dataset."
                    'data_dir (or $KILN_DATASETS) at the folder holding recordings/')
  return root


def list_recordings(root: Path) -> list[Recording]:
  """Every '{digit}_{speaker}_{index}.wav', sorted by (speaker, digit, index)."""
  found = []
  for path in (root / 'recordings').glob('*.wav'):
    m = _FSDD_NAME.match(path.name)
    if m is None:
      raise KilnError(f"FSDD file '{path.name}' is not named '<digit>_<speaker>_<index>.wav': "
                      'rename or remove it')
    found.append(Recording(int(m['digit']), m['speaker'], int(m['index']), path))
  return sorted(found, key=lambda r: (r.speaker, r.digit, r.index))


def official_split(recordings: list[Recording]) -> tuple[list[Recording], list[Recording]]:
  """(train, test): index 5-49 train, 0-4 test, as the FSDD authors publish it."""
  return [r for r in recordings if not r.is_test], [r for r in recordings if r.is_test]


def read_speakers(root: Path, speakers: list[str]
                  ) -> tuple[tuple[str, ...], tuple[int, ...], dict[str, tuple[str, ...]]]:
  """(accent names, accent index per speaker, every text field of speakers.json -> each
  speaker's value) from speakers.json; 'unknown' where a speaker or field is absent."""
  meta = {}
  if (root / 'speakers.json').is_file():
    meta = json.loads((root / 'speakers.json').read_text())
  names = sorted({k for entry in meta.values() for k, v in entry.items() if isinstance(v, str)})
  features = {name: tuple(str(meta.get(s, {}).get(name, 'unknown')) for s in speakers)
              for name in names}
  per_speaker = features.get('accent', ('unknown',) * len(speakers))
  accents = tuple(sorted(set(per_speaker)))
  return accents, tuple(accents.index(a) for a in per_speaker), features


def subsample_speaker(train: list[Recording], speaker: str, fraction: float, seed: int,
                      speakers: list[str]) -> list[Recording]:
  """`train` with only `fraction` of `speaker`'s recordings (at least one), drawn by `seed`:
  an under-represented group for fairness experiments."""
  if speaker not in speakers:
    raise KilnError(f'config.dataset.subsample_speaker={speaker!r} is not an FSDD speaker: '
                    f"choose one of {', '.join(speakers)}, or '' to keep every recording")
  theirs = [i for i, r in enumerate(train) if r.speaker == speaker]
  keep = max(1, int(round(fraction * len(theirs))))
  kept = set(np.random.default_rng([seed, _SUBSAMPLE_STREAM]).permutation(theirs)[:keep].tolist())
  return [r for i, r in enumerate(train) if r.speaker != speaker or i in kept]


def _split(features, frames, extra: dict, process_index, process_count) -> HostSplit:
  n = len(frames)
  examples = tf.data.Dataset.from_tensor_slices(
      {'features': features, 'frames': frames, 'index': np.arange(n, dtype=np.int32), **extra})
  return HostSplit(examples, n, n, process_index, process_count, sliced=True)


def connected_utterances(recordings: list[Recording], count: int, rng: np.random.Generator,
                         audio, spec: FeatureSpec):
  """`count` connected-digit utterances: per utterance one speaker, 1..max_digits of that
  speaker's `recordings` (drawn with replacement) joined by silences of
  U[min_silence_ms, max_silence_ms]; digits that would run past max_frames are left off
  (at least one is kept). Returns (waveforms, transcripts, speaker names, recordings
  used per utterance)."""
  by_speaker: dict[str, list[Recording]] = {}
  for r in recordings:
    by_speaker.setdefault(r.speaker, []).append(r)
  names = sorted(by_speaker)
  cache: dict[Path, np.ndarray] = {}
  limit = (spec.max_frames - 1) * spec.hop + spec.window
  waves, texts, speakers, used = [], [], [], []
  for _ in range(count):
    speaker = names[rng.integers(len(names))]
    picks = rng.integers(len(by_speaker[speaker]), size=rng.integers(1, audio.max_digits + 1))
    parts, words, total, recs = [], [], 0, []
    for i in picks:
      rec = by_speaker[speaker][i]
      if rec.path not in cache:
        cache[rec.path] = read_wav(rec.path)
      gap_ms = rng.uniform(audio.min_silence_ms, audio.max_silence_ms) if parts else 0.0
      gap = np.zeros(int(gap_ms * spec.sample_rate / 1000), np.float32)
      if words and total + len(gap) + len(cache[rec.path]) > limit:
        break
      parts += [gap, cache[rec.path]]
      total += len(gap) + len(cache[rec.path])
      words.append(DIGIT_WORDS[rec.digit])
      recs.append(rec)
    waves.append(np.concatenate(parts))
    texts.append(' '.join(words))
    speakers.append(speaker)
    used.append(recs)
  return waves, texts, speakers, used


def load_fsdd(config, process_index: int, process_count: int) -> SpeechSource:
  """'fsdd' (digit classes) or 'fsdd_connected' (transcripts), official split."""
  dataset, audio = config.dataset, config.audio
  root = fsdd_dir(dataset.data_dir)
  recordings = list_recordings(root)
  spec = FeatureSpec.from_config(audio, 8000)
  speakers = sorted({r.speaker for r in recordings})
  accents, speaker_accent, speaker_features = read_speakers(root, speakers)
  train_recs, test_recs = official_split(recordings)
  if dataset.get('subsample_speaker', ''):
    train_recs = subsample_speaker(train_recs, dataset.subsample_speaker,
                                   dataset.subsample_fraction, dataset.split_seed, speakers)
  if not train_recs or not test_recs:
    raise KilnError(f"FSDD in '{root}' needs recordings with index 0-4 (test) and 5-49 "
                    '(train): restore the missing files')
  common = dict(num_mels=spec.num_mels, max_frames=spec.max_frames, speakers=tuple(speakers),
                accents=accents, speaker_accent=speaker_accent,
                speaker_features=speaker_features, sample_rate=spec.sample_rate)

  if dataset.name == 'fsdd':
    def split(recs, split_spec):
      feats, frames = batch_features([read_wav(r.path) for r in recs], split_spec)
      return _split(feats, frames, {
          'label': np.array([r.digit for r in recs], np.int32),
          'speaker': np.array([speakers.index(r.speaker) for r in recs], np.int32)},
          process_index, process_count)
    return SpeechSource(split(train_recs, spec), split(test_recs, spec.for_eval(audio)),
                        num_classes=10, max_label_len=0, class_names=DIGIT_WORDS, **common)

  if audio.max_digits < 1 or audio.num_train_utterances < 1 or audio.num_eval_utterances < 1:
    raise KilnError(f'config.audio.max_digits={audio.max_digits}, num_train_utterances='
                    f'{audio.num_train_utterances} and num_eval_utterances='
                    f'{audio.num_eval_utterances} must all be >= 1')
  # Fixed by split_seed, not the training seed; the test set draws from its own stream.
  train_rng, test_rng = (np.random.default_rng([dataset.split_seed, i]) for i in (0, 1))

  def split(recs, count, rng, features_spec, label_len):
    # Utterances are composed to fit the training window; eval may pad them further.
    waves, texts, names, _ = connected_utterances(recs, count, rng, audio, spec)
    feats, frames = batch_features(waves, features_spec)
    encoded = [encode_text(t, label_len) for t in texts]
    return _split(feats, frames, {
        'labels': np.stack([ids for ids, _ in encoded]),
        'label_len': np.array([n for _, n in encoded], np.int32),
        'speaker': np.array([speakers.index(s) for s in names], np.int32)},
        process_index, process_count)
  return SpeechSource(split(train_recs, audio.num_train_utterances, train_rng, spec,
                            audio.max_label_len),
                      split(test_recs, audio.num_eval_utterances, test_rng,
                            spec.for_eval(audio), eval_label_len(audio)),
                      num_classes=VOCAB_SIZE, max_label_len=audio.max_label_len, **common)


# ----------------------------------------------------------------------------- TFDS

def fsdd_index_from_filename(filename: tf.Tensor) -> tf.Tensor:
  """The recording index of '<digit>_<speaker>_<index>.wav' (any folder), -1 if unnamed so."""
  base = tf.strings.regex_replace(filename, r'^.*/', '')
  digits = tf.strings.regex_replace(base, r'^\d_[A-Za-z]+_(\d+)\.wav$', r'\1')
  ok = tf.strings.regex_full_match(base, r'^\d_[A-Za-z]+_\d+\.wav$')
  return tf.where(ok, tf.strings.to_number(digits, tf.int32), -1)


def load_tfds(config, process_index: int, process_count: int) -> SpeechSource:
  import tensorflow_datasets as tfds
  dataset, audio = config.dataset, config.audio
  name = dataset.name[len(TFDS_PREFIX):].split(':')[0].split('/')[0]
  if name not in TFDS_SPEECH:
    raise KilnError(f"TFDS speech dataset '{name}' is not supported: use one of "
                    f"{', '.join('tfds:' + n for n in TFDS_SPEECH)}")
  audio_key, label_key, text_key = TFDS_SPEECH[name]
  builder = sources.tfds_builder(dataset)
  info = builder.info
  spec = FeatureSpec.from_config(audio, int(info.features[audio_key].sample_rate or 16000))
  transcribed = text_key is not None

  def example(ex, split_spec, label_len):
    wave_ = tf.cast(ex[audio_key], tf.float32) / 32768.0
    feats, frames = utterance_features(wave_, split_spec)
    out = {'features': feats, 'frames': tf.cast(frames, tf.int32),
           'speaker': tf.constant(-1, tf.int32)}
    if transcribed:
      out['labels'], out['label_len'] = tf_encode_text(ex[text_key], label_len)
    else:
      out['label'] = tf.cast(ex[label_key], tf.int32)
    return out

  def host_split(split: str, want_test: bool | None, split_spec: FeatureSpec, label_len: int):
    # spoken_digit has only a 'train' split: the official index rule cuts it in two.
    sources.check_tfds_split(builder, split)
    per_host = tfds.even_splits(split, n=process_count, drop_remainder=False)
    datasets = [builder.as_dataset(split=s, shuffle_files=False) for s in per_host]
    if want_test is not None:
      def keep(ex):
        index = fsdd_index_from_filename(ex['audio/filename'])
        is_test = (index >= 0) & (index < FSDD_TEST_INDICES.stop)
        return is_test if want_test else ~is_test
      datasets = [ds.filter(keep) for ds in datasets]
    counts = [sources._num_examples(info, s, ds) if want_test is None else
              int(ds.reduce(0, lambda n, _: n + 1)) for s, ds in zip(per_host, datasets)]
    examples = datasets[process_index].map(lambda ex: example(ex, split_spec, label_len),
                                           num_parallel_calls=tf.data.AUTOTUNE)
    examples = examples.enumerate().map(lambda i, ex: {**ex, 'index': tf.cast(i, tf.int32)})
    return HostSplit(examples, counts[process_index], max(counts), process_index, process_count)

  cut = name == 'spoken_digit' and dataset.train_split == dataset.eval_split
  with sources.tfds_prepared(builder):
    train = host_split(dataset.train_split, False if cut else None, spec, audio.max_label_len)
    eval_ = host_split(dataset.eval_split, True if cut else None, spec.for_eval(audio),
                       eval_label_len(audio))
  if transcribed:
    return SpeechSource(train, eval_, spec.num_mels, spec.max_frames, VOCAB_SIZE,
                        audio.max_label_len, sample_rate=spec.sample_rate)
  labels = info.features[label_key]
  return SpeechSource(train, eval_, spec.num_mels, spec.max_frames, labels.num_classes, 0,
                      class_names=tuple(labels.names), sample_rate=spec.sample_rate)


def load(config, process_index: int, process_count: int) -> SpeechSource:
  name = config.dataset.name
  if name in LOCAL_SPEECH_SOURCES:
    return load_fsdd(config, process_index, process_count)
  if name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX):
    return load_tfds(config, process_index, process_count)
  raise KilnError(f"unknown speech dataset '{name}': set config.dataset.name to one of "
                  f"{', '.join(LOCAL_SPEECH_SOURCES)} or "
                  f"{', '.join('tfds:' + n for n in TFDS_SPEECH)}")
