"""models.cnn options beyond the default VGG-style stack: no norm, stride-2 downsampling and
other kernel sizes (Wong et al. 2020's tiny MNIST model for adversarial training)."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from core.errors import KilnError
from models.cnn import CNN
from models.registry import create_model


def _tiny(input_shape=(28, 28, 1), **kw):
  return CNN(num_classes=10, input_shape=input_shape, features=(16, 32), dense_features=100,
             dropout_rate=0.0, norm='none', convs_per_stage=1, kernel_size=4,
             downsample='stride', rngs=nnx.Rngs(0), **kw)


def test_strided_convs_without_a_norm_build_wongs_mnist_model():
  model = _tiny()
  first, second = (stage[0] for stage in model.stages)
  assert first.norm is None and first.conv.bias is not None  # No norm: the conv keeps its bias.
  assert first.conv.kernel.value.shape == (4, 4, 1, 16)
  assert tuple(second.conv.strides) == (2, 2)
  assert model.hidden.in_features == 7 * 7 * 32  # 28 -> 14 -> 7, no pooling.
  logits = model(jnp.zeros((2, 28, 28, 1)))
  assert logits.shape == (2, 10)
  # By hand, taps on real pixels only: 4x4 stride 2 pad 1 covers 54 of 28's rows
  # (3 at each edge), 26 of 14's.
  expected = (2 * 54**2 * 1 * 16 + 2 * 26**2 * 16 * 32 + 2 * 1568 * 100 + 2 * 100 * 10)
  assert model.forward_flops((28, 28, 1)) == expected


def test_a_strided_stage_rounds_odd_sizes_up():
  model = _tiny(input_shape=(27, 27, 1))  # 'SAME' stride 2: 27 -> 14 -> 7 (pooling: 13 -> 6).
  assert model.hidden.in_features == 7 * 7 * 32
  assert model(jnp.ones((1, 27, 27, 1))).shape == (1, 10)


def test_max_pooling_without_a_norm_still_pools():
  model = CNN(num_classes=3, input_shape=(8, 8, 1), features=(4,), dense_features=8,
              norm='none', convs_per_stage=1, rngs=nnx.Rngs(0))
  assert model.hidden.in_features == 4 * 4 * 4
  out = model(jnp.asarray(np.random.default_rng(0).random((2, 8, 8, 1)), jnp.float32))
  assert out.shape == (2, 3)


@pytest.mark.parametrize('key, value, message', [
    ('downsample', 'avg_pool', r"model.downsample.*avg_pool"),
    ('norm', 'layer', r"model.norm.*layer"),
    ('kernel_size', 0, r"model.kernel_size"),
])
def test_bad_cnn_options_fail_in_one_line(key, value, message):
  config = ml_collections.ConfigDict(dict(name='cnn', features=(4,), dense_features=8,
                                          norm='none', kernel_size=4, downsample='stride'))
  config[key] = value
  with pytest.raises(KilnError, match=message) as error:
    create_model(config, nnx.Rngs(0), num_classes=10, input_shape=(8, 8, 1))
  assert '\n' not in str(error.value)
