"""An MLP on the full MNIST: the distillation student of configs/mnist_cnn.py (Hinton et al.
2015's MNIST setting, arXiv:1503.02531 section 3), trained alone or with
--config.distillation.teacher_workdir=<a mnist_cnn run>.

Same data, batch, optimiser and schedule as the CNN, but no shifts and no dropout: the
student learns what jitter and dropout taught the teacher only through its soft targets.
784-100-10 has 79,510 parameters, under 1/10 of the CNN's 870,826. At that size the MLP is
limited by capacity, not by overfitting (98.3% train accuracy after 6 epochs), and soft
targets did not help it (README, distillation rows); Hinton et al.'s 800-800 student had
about half of its 1200-1200 teacher's parameters.
"""

from configs import mnist_cnn


def get_config():
  c = mnist_cnn.get_config()
  c.augment.crop = 'none'  # No random shifts: the teacher's soft targets stand in for them.
  c.model = c.model.__class__()  # The CNN's keys do not apply to an MLP.
  c.model.name = 'mlp'  # A name in models.MODELS; the other keys here go to its constructor.
  c.model.hidden_features = (100,)  # Widths of the hidden ReLU layers over the 784 pixels.
  c.model.dropout_rate = 0.0  # No dropout: as above, regularisation comes from the teacher.
  return c
