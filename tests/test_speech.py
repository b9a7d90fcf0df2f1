"""Speech: FSDD reading and its official split, log-mel features against a NumPy
reference, normalization, SpecAugment, the connected-digit set, the three speech tasks
training on real recordings, the TFDS code paths under mock data, and bad input."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from backends import ops
from configs import speech_ctc_lstm, speech_digits, speech_rnnt_conformer
from core.errors import KilnError
from input_pipeline import audio
from tasks.spec_augment import spec_augment
from train import train_and_evaluate


@pytest.fixture(scope='module')
def recordings():
  return audio.list_recordings(audio.fsdd_dir(''))


def test_official_split_keeps_test_recordings_out_of_training(recordings):
  train, test = audio.official_split(recordings)
  assert len(train) == 2700 and len(test) == 300
  assert {r.index for r in test} == set(range(5))
  assert min(r.index for r in train) == 5
  assert not {r.path for r in train} & {r.path for r in test}


def test_connected_digits_use_one_speaker_and_only_their_split(recordings):
  train, test = audio.official_split(recordings)
  a = ml_collections.ConfigDict({'max_digits': 5, 'min_silence_ms': 50.0, 'max_silence_ms': 250.0})
  spec = audio.FeatureSpec(8000, 40, 25.0, 10.0, 280)
  for recs, is_test in ((train, False), (test, True)):
    waves, texts, speakers, used = audio.connected_utterances(
        recs, 40, np.random.default_rng(0), a, spec)
    for wave, text, speaker, parts in zip(waves, texts, speakers, used):
      assert {r.speaker for r in parts} == {speaker}
      assert all(r.is_test == is_test for r in parts)
      assert text == ' '.join(audio.DIGIT_WORDS[r.digit] for r in parts)
      assert 1 <= len(parts) <= 5 and audio.num_frames(len(wave), spec) <= 280
      silence = len(wave) - sum(len(audio.read_wav(r.path)) for r in parts)
      assert 400 * (len(parts) - 1) <= silence <= 2000 * (len(parts) - 1)


def numpy_log_mel(wave, spec):
  """Independent reference: framing, periodic Hann window, |rfft|^2, HTK-mel triangles
  (the mel-spaced filter bank tf.signal documents), log."""
  n = 1 + (len(wave) - spec.window) // spec.hop
  frames = np.stack([wave[i * spec.hop:i * spec.hop + spec.window] for i in range(n)])
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(spec.window) / spec.window)
  power = np.abs(np.fft.rfft(frames * window, spec.fft_length)) ** 2
  mel = lambda f: 1127.0 * np.log1p(f / 700.0)
  bins = mel(np.linspace(0, spec.sample_rate / 2, spec.fft_length // 2 + 1))[1:]
  edges = np.linspace(mel(20.0), mel(spec.sample_rate / 2), spec.num_mels + 2)
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  up = (bins[:, None] - lower) / (center - lower)
  down = (upper - bins[:, None]) / (upper - center)
  weights = np.vstack([np.zeros((1, spec.num_mels)), np.maximum(0, np.minimum(up, down))])
  return np.log(power @ weights + 1e-6)


def test_log_mel_matches_numpy_reference_and_is_normalized(recordings):
  spec = audio.FeatureSpec(8000, 40, 25.0, 10.0, 160)
  wave = audio.read_wav(recordings[7].path)
  ours = audio.log_mel(tf.constant(wave), spec).numpy()
  reference = numpy_log_mel(wave.astype(np.float64), spec)
  assert ours.shape == reference.shape
  np.testing.assert_allclose(ours, reference, atol=2e-3)
  feats, frames = audio.batch_features([wave, wave[:3000]], spec)
  assert list(frames) == [min(len(reference), 160), audio.num_frames(3000, spec)]
  for f, n in zip(feats, frames):
    np.testing.assert_allclose(f[:n].mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(f[:n].std(0), 1.0, atol=1e-2)
    assert not f[n:].any()


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_spec_augment_masks_within_bounds():
  features = jnp.ones((64, 100, 40))
  frames = jnp.arange(64) + 30
  out = np.asarray(spec_augment(jax.random.key(0), features, frames, freq_masks=2,
                                      freq_width=8, time_masks=2, time_width=20,
                                      time_width_fraction=0.2))
  assert set(np.unique(out)) <= {0.0, 1.0}
  masked_bins = (out == 0).all(1).sum(1)  # Bins zero at every frame.
  assert masked_bins.max() <= 16 and masked_bins.max() > 0
  bin_alive = ~(out == 0).all(1)
  for b in range(64):
    rows = out[b][:, bin_alive[b]]
    masked_frames = np.flatnonzero((rows == 0).all(1))
    assert len(masked_frames) <= min(40, 2 * 0.2 * int(frames[b]))
    assert (masked_frames < int(frames[b])).all()  # Never masks padding only.
  again = spec_augment(jax.random.key(0), features, frames, freq_masks=2, freq_width=8,
                             time_masks=2, time_width=20, time_width_fraction=0.2)
  np.testing.assert_array_equal(out, again)


def _short(c, steps):
  c.num_train_steps = steps
  c.schedule.warmup_steps = 5
  c.log_every_steps = steps
  c.eval_every_steps = steps
  c.checkpoint_every_steps = steps
  c.compilation_cache_dir = ''
  return c


@pytest.mark.slow  # A whole training run on real recordings.
def test_digit_classifier_learns_and_reports_groups(tmp_path):
  c = _short(speech_digits.get_config(), 60)
  c.model.model_dim = 32
  c.model.num_layers = 1
  c.model.num_heads = 2
  c.model.subsample_channels = 8
  c.batch_size = 64
  c.eval_batch_size = 64
  c.optimizer.learning_rate = 5e-3
  summary = train_and_evaluate(c, str(tmp_path))
  final = summary['final_eval']
  assert final['accuracy'] > 0.4  # Chance is 0.1.
  speakers = [k for k in final if k.startswith('accuracy_speaker_')]
  assert len(speakers) == 6
  assert {'accuracy_accent_USA_neutral', 'accuracy_accent_DEU_German'} <= set(final)
  # 300 test utterances, 50 per speaker: the overall rate is the mean of the speakers'.
  np.testing.assert_allclose(np.mean([final[k] for k in speakers]), final['accuracy'], atol=1e-6)


@pytest.fixture(scope='module')
def connected_config():
  def make(c):
    c.audio.num_train_utterances = 256
    c.audio.num_eval_utterances = 40
    c.audio.max_digits = 2
    c.audio.max_frames = 120
    c.audio.max_label_len = 12
    c.batch_size = 32
    c.eval_batch_size = 32  # 40 test utterances: the second batch is padded.
    c.decoding.beam_size = 2
    c.optimizer.learning_rate = 5e-3
    return c
  return make


@pytest.mark.slow  # A whole training run on real recordings.
def test_ctc_lstm_loss_falls_and_wer_is_counted(tmp_path, connected_config):
  # 120 steps: at 40 the model still emits only blanks (CER 1.0); here 0.76 on 2 cores.
  c = connected_config(_short(speech_ctc_lstm.get_config(), 120))
  c.model.hidden_dim = 32
  c.model.num_layers = 1
  c.optimizer.learning_rate = 1e-2
  c.decoding.beam_size = 0  # Beam search is exercised by the RNN-T run and unit tests.
  summary = train_and_evaluate(c, str(tmp_path))
  final = summary['final_eval']
  assert np.isfinite(final['loss']) and final['loss'] < 20  # Untrained: 60 nats; here 13.
  assert 'beam_wer' not in final
  assert final['cer'] < 0.9  # It emits digits, some of them right (no output at all is 1.0).
  for key in ('wer', 'wer_speaker_theo', 'wer_accent_GRC_Greek'):
    assert 0.0 <= final[key] <= 2.0, key  # Whole two-digit words: none right this early.


@pytest.mark.slow  # A whole training run on real recordings.
def test_rnnt_conformer_loss_falls(tmp_path, connected_config):
  """Also scores eval utterances padded longer than training's (eval_max_frames and
  eval_max_label_len), as the LibriSpeech config does for its 35 s test utterances."""
  c = connected_config(_short(speech_rnnt_conformer.get_config(), 40))
  c.audio.eval_max_frames = 160
  c.audio.eval_max_label_len = 16
  c.model.encoder.model_dim = 32
  c.model.encoder.num_layers = 1
  c.model.encoder.num_heads = 2
  c.model.encoder.subsample_channels = 8
  c.model.pred_hidden_dim = 32
  c.model.embed_dim = 16
  c.model.joint_dim = 32
  summary = train_and_evaluate(c, str(tmp_path))
  final = summary['final_eval']
  assert np.isfinite(final['loss']) and final['loss'] < 40  # Untrained: 76 nats.
  # Beam search already finds some digits after 40 steps (0.87 on 2 cores); greedy not yet.
  assert final['beam_cer'] < 0.95
  for key in ('wer', 'cer', 'beam_wer'):
    assert 0.0 <= final[key] <= 2.0, key


def test_bad_speech_input_gives_one_line_errors(tmp_path):
  from loop import experiment
  c = speech_digits.get_config()
  c.dataset.data_dir = str(tmp_path)
  with pytest.raises(KilnError, match='no FSDD recordings'):
    experiment.build_experiment(c)
  c = speech_digits.get_config()
  c.task = 'speech_ctc'
  c.early_stopping.metric = 'wer'  # A CTC metric, so that the data check is what fails.
  with pytest.raises(KilnError, match='needs transcripts'):
    experiment.build_experiment(c)
  c = speech_digits.get_config()
  c.dataset.name = 'tfds:mnist'
  with pytest.raises(KilnError, match="'mnist' is not supported"):
    experiment.build_experiment(c)
  c = speech_digits.get_config()
  c.audio.eval_max_frames = -1
  with pytest.raises(KilnError, match='eval_max_frames=-1 is out of range'):
    experiment.build_experiment(c)


def _tfds_config(name, task, train_split, eval_split):
  c = speech_ctc_lstm.get_config() if task == 'speech_ctc' else speech_digits.get_config()
  c.dataset.name = f'tfds:{name}'
  c.dataset.train_split, c.dataset.eval_split = train_split, eval_split
  c.audio.max_frames = 50
  return c


@pytest.mark.parametrize('name,task,train_split,eval_split', [
    ('speech_commands', 'speech_classification', 'train', 'test'),
    ('librispeech', 'speech_ctc', 'train_clean100', 'test_clean'),
])
def test_tfds_speech_sources_under_mock_data(name, task, train_split, eval_split):
  import tensorflow_datasets as tfds
  from input_pipeline import batching
  c = _tfds_config(name, task, train_split, eval_split)
  c.audio.eval_max_frames = 80  # Eval pads longer than training (0 would keep 50).
  c.audio.eval_max_label_len = 48 if task == 'speech_ctc' else 0
  with tfds.testing.mock_data(num_examples=6):
    source = audio.load(c, 0, 1)
    batch = next(batching.train_batches(source.train, 4, 0, 16))
    eval_batches = list(batching.eval_batches(source.eval, 4))
  assert batch['features'].shape == (4, 50, 40) and batch['features'].dtype == np.float32
  assert ((batch['frames'] >= 1) & (batch['frames'] <= 50)).all()
  assert all(b['features'].shape == (4, 80, 40) for b in eval_batches)
  assert sum(int(b['mask'].sum()) for b in eval_batches) == 6
  if source.transcribed:
    assert batch['labels'].shape == (4, 32)
    assert (batch['label_len'] <= 32).all()
    assert all(b['labels'].shape == (4, 48) for b in eval_batches)
  else:
    assert source.num_classes == 12 and (batch['label'] < 12).all()


def test_long_test_utterances_are_scored_whole():
  """LibriSpeech-style eval: training cuts 1.2 s / 40-character utterances at 50 frames and
  32 characters; eval_max_frames / eval_max_label_len keep them whole for scoring."""
  import tensorflow_datasets as tfds
  from input_pipeline import batching
  text = 'the quick brown fox jumps over the lazy d'  # 41 characters.

  def as_dataset(self, split, **kwargs):
    del self, split, kwargs
    rng = np.random.default_rng(0)
    return tf.data.Dataset.from_tensor_slices({
        'speech': rng.integers(-3000, 3000, (4, 19_200)), 'text': [text] * 4,
        'speaker_id': [1] * 4, 'chapter_id': [1] * 4, 'id': ['a', 'b', 'c', 'd']})

  c = _tfds_config('librispeech', 'speech_ctc', 'train_clean100', 'test_clean')
  c.audio.eval_max_frames, c.audio.eval_max_label_len = 160, 48
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    source = audio.load(c, 0, 1)
    train = next(batching.train_batches(source.train, 4, 0, 16))
    (evaluated,) = list(batching.eval_batches(source.eval, 4))
  assert (train['frames'] == 50).all() and (train['label_len'] == 32).all()
  assert (evaluated['frames'] == 118).all() and (evaluated['label_len'] == len(text)).all()
  assert audio.decode_ids(evaluated['labels'][0][:len(text)]) == text


def test_tfds_spoken_digit_is_cut_by_the_official_index_rule():
  import tensorflow_datasets as tfds
  names = [f'{d}_jackson_{i}.wav' for d in range(2) for i in (0, 3, 4, 5, 9, 30)]

  def as_dataset(self, split, **kwargs):
    del self, split, kwargs
    rng = np.random.default_rng(0)
    return tf.data.Dataset.from_tensor_slices({
        'audio': rng.integers(-3000, 3000, (len(names), 2400)),
        'audio/filename': names, 'label': [int(n[0]) for n in names]})

  c = _tfds_config('spoken_digit', 'speech_classification', 'train', 'train')
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    source = audio.load(c, 0, 1)
  # Index 0-4 test (0, 3, 4 per digit), 5-49 train (5, 9, 30).
  assert source.train.num_examples == 6 and source.eval.num_examples == 6
  eval_labels = sorted(int(ex['label']) for ex in source.eval.examples.as_numpy_iterator())
  assert eval_labels == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize('module', ['speech_commands', 'librispeech'])
@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_tfds_configs_build_their_models(module):
  """The TFDS configs' keys fit their models and FLOP counters (shapes only, no data)."""
  import importlib
  from flax import nnx
  from models import create_model
  from monitor import flops
  c = importlib.import_module(f'configs.{module}').get_config()
  model = nnx.eval_shape(lambda: create_model(
      c.model, nnx.Rngs(0), input_dim=c.audio.num_mels, num_outputs=12,
      vocab_size=audio.VOCAB_SIZE, max_label_len=c.audio.max_label_len))
  assert flops.train_step_flops(model, (c.audio.max_frames, c.audio.num_mels), c.batch_size) > 0


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_speech_flop_counters_agree_with_xla():
  """Conformer: XLA's count is the analytic one plus elementwise work. LSTM: XLA counts a
  while loop's body once, so it sees the hoisted input projections in full but the hidden
  matmul for one step only: analytic minus the other steps' hidden matmuls."""
  from flax import nnx
  from models.conformer import ConformerEncoder
  from models.recurrent import LSTMEncoder
  from monitor import flops
  x = jnp.zeros((1, 60, 16))
  conformer = ConformerEncoder(input_dim=16, num_outputs=10, model_dim=32, num_layers=2,
                               num_heads=2, subsample_channels=8, rngs=nnx.Rngs(0))
  lstm = LSTMEncoder(input_dim=16, num_outputs=10, hidden_dim=24, num_layers=2, frame_stack=3,
                     rngs=nnx.Rngs(0))
  counted = {}
  for name, model in (('conformer', conformer), ('lstm', lstm)):
    graph, params = nnx.split(model)
    forward = jax.jit(lambda p, x, graph=graph: nnx.merge(graph, p)(x, jnp.full((1,), 60))[0])
    with ops.portable():  # XLA counts no FLOPs in a compiled kernel (the LSTM recurrence's).
      counted[name] = (flops.forward_flops(model, (60, 16)), flops.xla_flops(forward, params, x))
  analytic, xla = counted['conformer']
  assert analytic <= xla <= 1.12 * analytic
  analytic, xla = counted['lstm']
  hidden_per_step = 2.0 * 24 * 4 * 24
  once = analytic - 4 * (20 - 1) * hidden_per_step  # 2 layers x 2 directions, 20 steps.
  assert abs(xla - once) <= 0.03 * once


@pytest.mark.slow  # Several Conformer compiles.
def test_conformer_batch_norm_ignores_padding_and_evaluates_per_utterance():
  """conv_norm='batch' (the paper's): training statistics come from valid frames only, so
  padding a batch further leaves every valid output as it was; eval uses the running
  averages, so an utterance's output does not depend on the rest of its batch. The
  'layer' variant keeps no statistics and is padding-invariant too."""
  from flax import nnx
  from models.conformer import ConformerEncoder
  model = ConformerEncoder(input_dim=16, model_dim=32, num_layers=2, num_heads=2,
                           subsample_channels=8, dropout_rate=0.0, conv_norm='batch',
                           rngs=nnx.Rngs(0))
  assert len(jax.tree.leaves(nnx.state(model, nnx.BatchStat))) == 4  # Mean, var per block.
  rng = np.random.default_rng(0)
  frames = np.array([40, 24, 13], np.int32)
  features = rng.normal(size=(3, 40, 16)).astype(np.float32)
  longer = np.concatenate([features, np.zeros((3, 24, 16), np.float32)], axis=1)
  (short_out, valid), (long_out, _) = (model(x, frames, train=True) for x in (features, longer))
  for i, n in enumerate(np.asarray(valid)):
    np.testing.assert_allclose(short_out[i, :n], long_out[i, :n], rtol=1e-4, atol=1e-4)
  means = [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
  assert any(np.abs(m).max() > 1e-3 for m in means)  # Running statistics moved.
  batched, _ = model(features, frames, train=False)
  alone, _ = model(features[1:2], frames[1:2], train=False)
  n = int(valid[1])
  np.testing.assert_allclose(batched[1, :n], alone[0, :n], rtol=1e-4, atol=1e-4)
  layer_norm = ConformerEncoder(input_dim=16, model_dim=32, num_layers=2, num_heads=2,
                                subsample_channels=8, dropout_rate=0.0, conv_norm='layer',
                                rngs=nnx.Rngs(0))
  assert not jax.tree.leaves(nnx.state(layer_norm, nnx.BatchStat))
  (short_out, _), (long_out, _) = (layer_norm(x, frames, train=True) for x in (features, longer))
  for i, n in enumerate(np.asarray(valid)):
    np.testing.assert_allclose(short_out[i, :n], long_out[i, :n], rtol=1e-4, atol=1e-4)
  with pytest.raises(KilnError, match="conv_norm='bn' must be 'batch' or 'layer'"):
    ConformerEncoder(input_dim=16, conv_norm='bn', rngs=nnx.Rngs(0))
