"""ResNet-18 (narrow, CIFAR stem) on the bundled 8x8 digits: the deepest candidate of the digits
model selection (select.py beside configs/default.py's CNN and configs/digits_mlp.py)."""

from configs import default


def get_config():
  c = default.get_config()  # Same data, batch, schedule and length as the CNN.
  c.model = c.model.__class__()  # The CNN's keys do not apply to a ResNet.
  c.model.name = 'resnet18'  # A name in models.MODELS; the other keys here go to its constructor.
  c.model.stem = 'cifar'  # 3x3/1 stem conv, no max-pool: 8x8 digits keep their resolution.
  c.model.width = 16  # Stage widths 16-128: a quarter of the published 64, for CPU speed.
  c.model.zero_init_last_bn = True  # Each block starts as the identity.
  c.model.classifier_init = 'torch'  # A third of LeCun's variance: 8x8 digits leave a 1x1 map to pool.
  return c
