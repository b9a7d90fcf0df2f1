"""Spoken-digit classification on FSDD with the image CNN over log-mel frames (an utterance's
[160 frames, 40 mels] as a one-channel image, models.spectrogram_image): a candidate of the
spoken-digit model selection (select_models.py beside configs/speech_digits.py's Conformer and
configs/speech_digits_lstm.py's LSTM). Same data, batch, optimizer and length as the Conformer;
only the model differs.

Measured (README, "Model selection"): 92.3% of the 300 test recordings after 12 epochs
(select_models.py's full-budget run; the Conformer 96.7%),
76.7% after 3; its own 25: not measured."""

from configs import speech_digits


def get_config():
  c = speech_digits.get_config()
  c.model = c.model.__class__()  # The Conformer's keys do not apply to a CNN.
  c.model.name = 'cnn'  # A name in models.MODELS; the other keys here go to its constructor.
  c.model.features = (16, 32, 64)  # Conv stages: three poolings, 160x40 to 20x5 at the head.
  c.model.convs_per_stage = 1  # One conv-BN-ReLU per pooling: cheap at 160x40 resolution.
  c.model.dense_features = 128  # Width of the hidden dense layer before the classifier.
  c.model.dropout_rate = 0.2  # Dropout before the classifier during training.
  return c
