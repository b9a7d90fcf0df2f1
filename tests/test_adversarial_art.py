"""Kiln's FGSM and PGD (trust/training/adversarial.py) against the adversarial-robustness-toolbox
(ART), an independent implementation: the same small CNN with fixed random weights, given to ART
as a TensorFlowV2Classifier around `jax2tf.convert(forward, with_gradient=True)`, both attacks
from the input itself (no random start) so they are deterministic, and the adversarial inputs
must agree to float precision.

Where the two definitions meet, and where they part (read from ART 1.20's
FastGradientMethod._compute and ProjectedGradientDescentTensorFlowV2._compute_tf):
- A step is eps_step * sign(g) (L-inf) or eps_step * g / ||g||_2 per example (L2) in both.
- ART clips to the [0, 1] box and then projects onto the eps-ball around the input; Kiln projects
  and then clips. For L-inf both are coordinate-wise clips onto intervals that overlap, so either
  order gives the clip onto their intersection: the cases below let the box bite (inputs across
  [0, 1], eps 0.3, as in Madry's MNIST budget). One FGSM step from the input agrees under L2 too:
  clipping a step of norm eps to the box only shortens it, so ART's projection does nothing.
- Several L2 steps differ once the box is active (rescaling a clipped perturbation is not
  clipping a rescaled one), so the L2 PGD case keeps every iterate inside the box: inputs in
  [0.3, 0.7] and eps + eps_step = 0.25 < 0.3, no coordinate can move far enough to be clipped.
- ART's loss is Keras' batch-mean cross-entropy, Kiln's the per-example sum: the 1/B factor
  changes neither a sign nor a per-example unit vector.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trust.training import adversarial

# jax2tf's trace and ART's eager TF loop take ~7 s on the shared 2-core host (the fast tier's
# collection skips ART's import too: it is imported where it is used).
pytestmark = pytest.mark.slow

CLASSES = 10
SIDE = 8  # 8 x 8 grey images, the size of scikit-learn's digits.
BATCH = 16


def _forward():
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 4)) * 0.5, jnp.float32)
  dense = jnp.asarray(rng.normal(size=(SIDE * SIDE * 4, CLASSES)) * 0.1, jnp.float32)

  def forward(images):
    hidden = jax.lax.conv_general_dilated(images, kernel, (1, 1), 'SAME',
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.tanh(hidden).reshape(images.shape[0], -1) @ dense
  return forward


@pytest.fixture(scope='module')
def models():
  """The JAX forward pass and ART's classifier around its jax2tf conversion (one trace, shared)."""
  import tensorflow as tf
  from art.estimators.classification import TensorFlowV2Classifier
  from jax.experimental import jax2tf

  forward = _forward()
  converted = tf.function(jax2tf.convert(forward, with_gradient=True), autograph=False)
  classifier = TensorFlowV2Classifier(
      model=lambda images, training=False: converted(images), nb_classes=CLASSES,
      input_shape=(SIDE, SIDE, 1), clip_values=(0.0, 1.0),
      loss_object=tf.keras.losses.CategoricalCrossentropy(from_logits=True))
  return forward, classifier


def _inputs(low, high):
  rng = np.random.default_rng(1)
  images = rng.uniform(low, high, size=(BATCH, SIDE, SIDE, 1)).astype(np.float32)
  return images, rng.integers(0, CLASSES, size=BATCH)


@pytest.mark.parametrize('norm, eps, eps_step, steps, low, high', [
    ('linf', 0.3, 0.3, 1, 0.0, 1.0),    # FGSM, the box clips many pixels.
    ('linf', 0.3, 0.05, 10, 0.0, 1.0),  # PGD, the box and the ball both bind.
    ('l2', 1.0, 1.0, 1, 0.0, 1.0),      # FGSM: one step, so ART's projection is a no-op.
    ('l2', 0.2, 0.05, 10, 0.3, 0.7),    # PGD with the box out of reach (see the docstring).
])
def test_kiln_and_art_craft_the_same_adversarial_inputs(models, norm, eps, eps_step, steps, low,
                                                        high):
  from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent

  forward, classifier = models
  images, labels = _inputs(low, high)

  def losses(inputs):
    return optax.softmax_cross_entropy_with_integer_labels(forward(inputs), labels)

  art_norm = np.inf if norm == 'linf' else 2
  if steps == 1:
    art_attack = FastGradientMethod(classifier, norm=art_norm, eps=eps, eps_step=eps_step,
                                    num_random_init=0, batch_size=BATCH)
  else:
    art_attack = ProjectedGradientDescent(classifier, norm=art_norm, eps=eps, eps_step=eps_step,
                                          max_iter=steps, num_random_init=0, batch_size=BATCH,
                                          verbose=False)
  art_adv = art_attack.generate(images, y=np.eye(CLASSES, dtype=np.float32)[labels])
  kiln_adv = np.asarray(adversarial.perturb(
      losses, jnp.asarray(images), jax.random.key(0),
      adversarial.Attack(norm, eps, eps_step, steps, restarts=1, random_start=False)))

  # The attack did something, so agreeing is not two copies of the clean input.
  moved = np.linalg.norm((kiln_adv - images).reshape(BATCH, -1), ord=art_norm, axis=1)
  assert np.all(moved > 0.5 * eps)
  assert np.all(np.asarray(losses(kiln_adv)) > np.asarray(losses(images)))
  # The box binds in the cases meant to test it and nowhere else.
  assert np.any((kiln_adv == 0.0) | (kiln_adv == 1.0)) == (low == 0.0)
  # A flipped sign (L-inf) moves a pixel by a whole step; float noise stays far below 1e-5.
  np.testing.assert_allclose(kiln_adv, art_adv, rtol=0, atol=1e-5)
