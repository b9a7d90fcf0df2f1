"""Image classifiers over log-mel frames (models.spectrogram_image): the speech classification
task runs config.model.name='cnn' (or any of models.IMAGE_CLASSIFIERS) on an utterance's
[frames, mels] features as a one-channel image, through the same loss, eval and serving code
as the speech encoders."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import speech_ctc_lstm, speech_digits_cnn
from core.errors import KilnError
from models.cnn import CNN
from models.spectrogram_image import SpectrogramImage
from monitor import flops
from tasks import create_task
from train import train_and_evaluate


def test_image_model_sees_one_channel_log_mels_and_its_logits_as_one_frame():
  cnn = CNN(num_classes=10, input_shape=(24, 8, 1), features=(4,), convs_per_stage=1,
            dense_features=16, rngs=nnx.Rngs(0))  # Small: each eager initializer compiles.
  model = SpectrogramImage(cnn)
  features = jnp.asarray(np.random.default_rng(0).normal(size=(3, 24, 8)), jnp.float32)
  both = nnx.jit(lambda model, x, frames: (model(x, frames), model.image_model(x[..., None])))
  (frame_logits, frames), image_logits = both(model, features, jnp.array([24, 10, 3]))
  assert frame_logits.shape == (3, 1, 10)
  np.testing.assert_array_equal(frames, [1, 1, 1])  # The one frame counts, whatever the length.
  # Frames are the image's height and mel bins its width, as the CNN was built for.
  np.testing.assert_allclose(frame_logits[:, 0], image_logits, rtol=1e-6)
  assert flops.forward_flops(model, (24, 8)) == cnn.forward_flops((24, 8, 1)) > 0


def test_image_model_with_other_eval_frames_is_refused():
  c = speech_digits_cnn.get_config()
  c.audio.eval_max_frames = 280  # A CNN's dense head fixes the image's frame count.
  with pytest.raises(KilnError, match=r"model.name='cnn' sees a fixed image of "
                     r'config.audio.max_frames=160 frames.*eval_max_frames=280: set it to 0'):
    create_task(c).build_model(nnx.Rngs(0))


def test_an_image_classifier_is_refused_for_frame_labelling_tasks():
  c = speech_ctc_lstm.get_config()
  c.model = speech_digits_cnn.get_config().model
  with pytest.raises(KilnError, match=r"model.name='cnn' gives one answer per utterance, but "
                     r"task 'speech_ctc' labels frames: choose a frame-wise encoder"):
    create_task(c).build_model(nnx.Rngs(0))


@pytest.mark.slow  # A training run on real recordings.
def test_cnn_on_log_mels_learns_spoken_digits(tmp_path):
  c = speech_digits_cnn.get_config()
  c.model.features = (8, 16)
  c.model.dense_features = 32
  c.num_train_steps = 60
  c.batch_size = 64
  c.optimizer.learning_rate = 3e-3
  c.schedule.warmup_steps = 5
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 60
  c.compilation_cache_dir = ''
  summary = train_and_evaluate(c, str(tmp_path))
  # Chance is 0.1 over the 300 test recordings; this tiny CNN reached 0.27 in its 60 steps.
  assert summary['final_eval']['accuracy'] > 0.2
