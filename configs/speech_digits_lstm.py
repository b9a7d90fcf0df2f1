"""Spoken-digit classification on FSDD with a 2x128 bidirectional LSTM over log-mel frames: a
candidate of the spoken-digit model selection (select_models.py beside configs/speech_digits.py's
Conformer and configs/speech_digits_cnn.py's CNN). Same data, batch, optimizer and length as the
Conformer; only the model differs.

Measured (README, "Model selection"): 94.3% of the 300 test recordings after 12 epochs
(select_models.py's full-budget run; the Conformer 96.7%),
92.7% after 6; its own 25: not measured."""

from configs import speech_digits


def get_config():
  c = speech_digits.get_config()
  c.model = c.model.__class__()  # The Conformer's keys do not apply to an LSTM.
  c.model.name = 'lstm'  # A name in models.MODELS; the other keys here go to its constructor.
  c.model.hidden_dim = 128  # LSTM units per direction.
  c.model.num_layers = 2  # Stacked bidirectional layers.
  c.model.bidirectional = True  # The whole utterance is known before it is classified.
  c.model.frame_stack = 3  # 30 ms steps: a third of the recurrence's sequential steps.
  c.model.dropout_rate = 0.1  # Dropout between layers and before the head, as the Conformer's.
  return c
