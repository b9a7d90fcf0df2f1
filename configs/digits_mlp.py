"""An MLP on the bundled 8x8 digits: the smallest candidate of the digits model selection
(select.py beside configs/default.py's CNN and configs/digits_resnet18.py)."""

from configs import default


def get_config():
  c = default.get_config()  # Same data, batch, schedule and length as the CNN.
  c.model = c.model.__class__()  # The CNN's keys do not apply to an MLP.
  c.model.name = 'mlp'  # A name in models.MODELS; the other keys here go to its constructor.
  c.model.hidden_features = (256, 128)  # Widths of the hidden ReLU layers over the 64 pixels.
  c.model.dropout_rate = 0.2  # Dropout after each hidden layer during training.
  return c
