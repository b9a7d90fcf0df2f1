"""ResNet v1.5 (published sizes and costs, synchronised BatchNorm, DP/FSDP at 224x224),
host-side augmentation, and the TFDS cifar10 / imagenet2012 paths under mock data."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from flax import nnx
from jax.sharding import NamedSharding

from configs import resnet18_cifar10, resnet50_imagenet
from core.errors import KilnError
from loop.experiment import build_experiment
from loop.state import init_state, state_specs
from input_pipeline import augment
from models import create_model
from models.resnet import Block, ResNet, ResNet18, ResNet34, ResNet50
from monitor import flops
from tasks.classification import ImageClassification
from tests.stepping import host_batches, run_steps
from tests.tiny import tiny_config


def _abstract(cls, **kwargs):
  return nnx.eval_shape(lambda: cls(num_classes=1000, input_shape=(224, 224, 3),
                                    rngs=nnx.Rngs(0), **kwargs))


def _num_params(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ---- ResNet against the published models ----

@pytest.mark.parametrize('cls, expected', [
    (ResNet18, 11_689_512), (ResNet34, 21_797_672), (ResNet50, 25_557_032)])
def test_parameter_counts_match_torchvision(cls, expected):
  """torchvision's resnet18/34/50 (v1.5) parameter counts, 1000 classes."""
  assert _num_params(_abstract(cls)) == expected


def test_resnet50_forward_cost_is_the_published_4_1_gmacs():
  counted = flops.forward_flops(_abstract(ResNet50), (224, 224, 3))
  # He et al. / torchvision: 4.1e9 multiply-adds = 8.2 GFLOPs. The count leaves out taps
  # on zero padding, so it lands a few percent under.
  assert abs(counted / 8.2e9 - 1) < 0.10


def test_resnet_flops_match_xla():
  model = nnx.eval_shape(lambda: ResNet(
      num_classes=10, input_shape=(64, 64, 3), stage_sizes=(1, 1), block='bottleneck',
      width=32, stem='imagenet', rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  counted = flops.xla_flops(forward, state, jax.ShapeDtypeStruct((4, 64, 64, 3), jnp.float32)) / 4
  # XLA also counts BatchNorm, ReLU, pooling, residual adds and the mean: ~7% here, where
  # 1x1 convs do only 2 x 32-128 FLOPs per output. A wrong map size or a missed conv
  # would be off by 25% or more.
  assert 0.9 < flops.forward_flops(model, (64, 64, 3)) / counted <= 1.0


def test_v1_5_layout():
  model = _abstract(ResNet50)
  first_of_stage_2 = model.blocks[3]
  # v1.5: the stride sits in the bottleneck's 3x3 conv, not its first 1x1.
  assert [tuple(c.strides) for c in first_of_stage_2.convs] == [(1, 1), (2, 2), (1, 1)]
  assert first_of_stage_2.projection.kernel_size == (1, 1)
  assert tuple(first_of_stage_2.projection.strides) == (2, 2)
  assert model.blocks[4].projection is None  # Same-shape blocks keep the identity shortcut.
  assert model.stem_conv.kernel_size == (7, 7) and tuple(model.stem_conv.strides) == (2, 2)


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_zero_init_last_bn_makes_blocks_start_as_identity():
  @jax.jit  # Built and applied in one trace: eager initialisation is slow.
  def forward(x):
    kwargs = dict(block='basic', norm_axis_name=None, dtype=None, rngs=nnx.Rngs(0))
    zero = Block(8, 8, 1, zero_init_last_bn=True, **kwargs)
    plain = Block(8, 8, 1, zero_init_last_bn=False, **kwargs)
    return zero(x, train=True), plain(x, train=True)

  x = jax.random.normal(jax.random.key(1), (4, 6, 6, 8))
  zero, plain = forward(x)
  np.testing.assert_allclose(zero, jax.nn.relu(x), atol=1e-6)
  assert not np.allclose(plain, jax.nn.relu(x), atol=1e-3)


def test_classifier_inits_set_the_first_logits_scale():
  """'zeros': zero first logits whatever the features (first loss ln C); 'torch' (variance
  1 / (3 fan_in)) starts at about 1/sqrt(3) of LeCun's spread on the same features."""
  @jax.jit
  def logits(x):
    kwargs = dict(num_classes=10, input_shape=(8, 8, 1), stage_sizes=(1, 1), width=64,
                  stem='cifar')
    return [ResNet(classifier_init=init, rngs=nnx.Rngs(0), **kwargs)(x)
            for init in ('zeros', 'torch', 'lecun')]

  zero, torch, lecun = logits(jax.random.uniform(jax.random.key(0), (64, 8, 8, 1)))
  np.testing.assert_array_equal(zero, 0.0)
  ratio = float(jnp.std(torch) / jnp.std(lecun))
  assert 0.4 < ratio < 0.75, ratio  # 1/sqrt(3) = 0.577, up to the draw over 128 x 10 weights.


def test_bad_resnet_settings_are_one_line_errors():
  with pytest.raises(KilnError, match='not a ResNet block'):
    ResNet(num_classes=10, input_shape=(8, 8, 1), block='wide', rngs=nnx.Rngs(0))
  with pytest.raises(KilnError, match="classifier_init='he' is not an init"):
    ResNet(num_classes=10, input_shape=(8, 8, 1), classifier_init='he', rngs=nnx.Rngs(0))
  with pytest.raises(KilnError, match='not a ResNet stem'):
    ResNet(num_classes=10, input_shape=(8, 8, 1), stem='tiny', rngs=nnx.Rngs(0))
  with pytest.raises(KilnError, match='not a dtype'):
    ResNet(num_classes=10, input_shape=(8, 8, 1), dtype='float77', rngs=nnx.Rngs(0))


def _tiny_resnet_config(strategy='jit', data=-1, fsdp=1):
  config = tiny_config()  # Bundled 8x8 digits.
  config.model = type(config.model)({'name': 'resnet18', 'stem': 'cifar', 'width': 8,
                                     'stage_sizes': (1, 1)})
  config.parallel.strategy = strategy
  config.mesh.data, config.mesh.fsdp = data, fsdp
  return config


@pytest.fixture(scope='module')
def one_device_resnet(devices):
  return [m['loss'] for m, _ in run_steps(_tiny_resnet_config(), devices[:1], num_steps=30)[2]]


@pytest.mark.slow  # 30 ResNet steps (one_device_resnet).
def test_resnet_learns_digits(one_device_resnet):
  losses = one_device_resnet
  assert np.mean(losses[-5:]) < 0.65 * np.mean(losses[:5])  # ~2.34 -> ~1.38.


@pytest.mark.slow  # Needs the 30-step run above.
def test_batchnorm_is_synchronised_across_pmap_devices(one_device_resnet, devices):
  """Under pmap each device holds 1/8 of the batch: per-device statistics would give
  other losses than the one-device run. (Under jit the batch is one global array, so
  statistics are global by construction; the ResNet-50 DP test below runs that path.)"""
  _, _, outputs = run_steps(_tiny_resnet_config('pmap'), devices, num_steps=5)
  np.testing.assert_allclose([m['loss'] for m, _ in outputs], one_device_resnet[:5],
                             rtol=2e-5)


def test_center_crop_of_images_of_any_size_has_a_static_shape():
  """Eval pads its last batch with zeros of the element shape, which must be fully known."""
  sizes = [(30, 50), (64, 40)]
  images = tf.data.Dataset.from_generator(
      lambda: (np.zeros(size + (3,), np.uint8) for size in sizes),
      output_signature=tf.TensorSpec((None, None, 3), tf.uint8))
  crops = images.map(lambda image: augment.resize_shorter_and_center_crop(image, 36, 32))
  assert crops.element_spec.shape == (32, 32, 3)
  assert [c.shape for c in crops.as_numpy_iterator()] == [(32, 32, 3)] * 2


# ---- ResNet-50 at 224x224, DP and FSDP on 8 devices, from the ImageNet config ----

@pytest.mark.slow  # Two ResNet-50 compiles at 224x224.
def test_resnet50_imagenet_trains_a_step_under_dp_and_fsdp(devices):
  """One train step of configs/resnet50_imagenet.py (batch 8, mock ImageNet images of
  random sizes) data-parallel over 8 devices, then FSDP 2x4 from the same state. XLA's
  CPU backend is compiled at optimisation level 0: LLVM's passes take ~50 s of a ~60 s
  compile here and change nothing the test checks. 114-137 s on 2 heavily contended
  cores (~66 s of CPU time): the most expensive test in these files."""
  started = time.perf_counter()
  config = resnet50_imagenet.get_config()
  config.batch_size = config.eval_batch_size = 8
  config.model.dtype = 'float32'  # CPU XLA emulates bfloat16 convs slowly.
  losses = []
  with tfds.testing.mock_data(num_examples=8):
    state = None
    for data, fsdp in ((-1, 1), (2, 4)):
      config.mesh.data, config.mesh.fsdp = data, fsdp
      exp = build_experiment(config, devices)
      assert exp.task.model_input_shape == (224, 224, 3)
      if state is None:
        state, shardings = exp.create_state()
      else:  # Reshard the DP state instead of initialising ResNet-50 again.
        shardings = _state_shardings(exp)
        state = jax.device_put(state, shardings)
      batch = exp.strategy.place(host_batches(exp, 1)[0])
      assert batch['image'].shape == (8, 224, 224, 3)
      eval_batch = next(iter(exp.task.eval_batches(exp.host_eval_batch)))  # Padded: static shapes.
      assert eval_batch['image'].shape == (8, 224, 224, 3)
      step = exp.train_step(shardings).lower(state, batch).compile(
          compiler_options={'xla_backend_optimization_level': 0})
      state, batch_metrics, _ = step(state, batch)
      losses.append(float(batch_metrics.compute()['loss']))
    specs = [x.sharding.spec for x in jax.tree.leaves(state.params)]
    assert any('fsdp' in str(spec) for spec in specs)
  # Random labels out of 1000 classes: the first loss is about ln(1000).
  assert abs(losses[0] - np.log(1000)) < 1.5 and np.isfinite(losses[1])
  print(f'ResNet-50 DP + FSDP steps: {time.perf_counter() - started:.0f} s')


def _state_shardings(exp):
  """The shardings exp.create_state() would give, without initialising."""
  abstract = jax.eval_shape(lambda: init_state(exp.template, exp.tx, 0, exp.use_ema))
  specs = state_specs(abstract, exp.template, exp.mesh, exp.rules)
  return jax.tree.map(lambda s: NamedSharding(exp.mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


# ---- Host-side augmentation ----

def _aug_config(**overrides):
  config = tiny_config().augment
  config.update(overrides)
  return config


def _indexed_images(batch=64, size=8, channels=3):
  """Image i is filled with the value i, so a mixed pixel names its sources."""
  return np.broadcast_to(np.arange(batch, dtype=np.float32)[:, None, None, None],
                         (batch, size, size, channels)).copy()


def test_pad_and_crop_takes_a_window_of_the_zero_padded_image():
  rng = np.random.default_rng(0)
  images = rng.random((32, 6, 5, 2)).astype(np.float32)
  out = augment.pad_and_crop(images, 2, np.random.default_rng(1))
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  offsets = set()
  for image, result in zip(padded, out):
    matches = [(t, l) for t in range(5) for l in range(5)
               if np.array_equal(image[t:t + 6, l:l + 5], result)]
    assert matches, 'every output is a window of its padded input'
    offsets.add(matches[0])
  assert len(offsets) > 10  # Offsets vary over the batch.


def test_flips_mirror_about_half_the_images():
  images = np.random.default_rng(0).random((200, 4, 5, 1)).astype(np.float32)
  out = augment.random_flip(images, np.random.default_rng(1))
  same = np.all(out == images, axis=(1, 2, 3))
  mirrored = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored) and 70 < mirrored.sum() < 130


def test_random_resized_crop_boxes_and_resampling():
  rng = np.random.default_rng(0)
  boxes = augment.sample_crop_boxes(rng, 500, 64, 48, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 48).all()
  area = h * w / (64 * 48)
  assert area.min() > 0.06 and area.max() <= 1.0 and np.ptp(area) > 0.5
  assert (w / h > 0.7).all() and (w / h < 1.4).all()  # Ratio range, up to rounding.
  # Bilinear resampling of a linear ramp is exact: the crop's corners keep their values.
  ramp = (np.arange(64, dtype=np.float32)[:, None] * 100 + np.arange(48)[None, :])
  images = np.repeat(ramp[None, :, :, None], 4, axis=0)
  out = augment.random_resized_crop(images, 16, np.random.default_rng(5), (0.08, 1.0),
                                    (3 / 4, 4 / 3))
  top, left, h, w = augment.sample_crop_boxes(np.random.default_rng(5), 4, 64, 48,
                                              (0.08, 1.0), (3 / 4, 4 / 3)).T
  np.testing.assert_allclose(out[:, 0, 0, 0], ramp[top, left], rtol=1e-5)
  np.testing.assert_allclose(out[:, -1, -1, 0], ramp[top + h - 1, left + w - 1], rtol=1e-5)


def test_mixup_blends_each_image_with_its_partner():
  images, labels = _indexed_images(), np.arange(64)
  out, partner, weight = augment.mixup(images, labels, 0.4, np.random.default_rng(0))
  lam = weight[0]
  assert 0 < lam < 1 and np.all(weight == lam)
  np.testing.assert_allclose(out[:, 0, 0, 0], lam * labels + (1 - lam) * partner, rtol=1e-5)
  assert sorted(partner) == list(labels) and (partner != labels).any()


def test_cutmix_pastes_a_box_and_weights_by_its_area():
  images, labels = _indexed_images(size=16), np.arange(64)
  out, partner, weight = augment.cutmix(images, labels, 1.0, np.random.default_rng(3))
  own = (out == images).all(-1)  # [B, H, W]: pixel kept from the image itself.
  pasted = (out == images[partner]).all(-1)
  assert np.all(own | pasted)
  moved = partner != labels
  np.testing.assert_allclose(own[moved].mean(axis=(1, 2)), weight[moved])
  assert 0 < weight[0] < 1


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_mixed_labels_enter_the_loss_linearly():
  config = tiny_config()
  config.model = type(config.model)({'name': 'mlp', 'hidden_features': (16,)})  # No dropout.
  task = ImageClassification(config)
  model = create_model(config.model, nnx.Rngs(0), num_classes=10, input_shape=(8, 8, 1))
  images = np.random.default_rng(0).random((4, 8, 8, 1)).astype(np.float32)
  batch = {'image': images, 'label': np.array([1, 2, 3, 4]), 'mix_label': np.array([5, 6, 7, 8]),
           'mix_weight': np.full(4, 0.3, np.float32)}
  loss, _ = task.loss(model, batch, nnx.Rngs(0))
  logits = np.asarray(model(images, train=False), np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -(0.3 * log_probs[np.arange(4), batch['label']]
               + 0.7 * log_probs[np.arange(4), batch['mix_label']]).mean()
  assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_augmented_stream_resumes_exactly():
  config = _aug_config(crop='pad_and_crop', pad=2, flip=True, mean=(0.5,), std=(0.25,),
                       cutmix_alpha=1.0, mixup_alpha=0.2)
  raw = [{'image': np.random.default_rng(i).random((8, 8, 8, 1)).astype(np.float32),
          'label': np.arange(8)} for i in range(6)]
  full = list(augment.augment_batches(iter(raw), config, seed=3, start_step=0))
  resumed = list(augment.augment_batches(iter(raw[4:]), config, seed=3, start_step=4))
  for a, b in zip(full[4:], resumed):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(full[0]['image'], full[1]['image'])
  assert {'mix_label', 'mix_weight'} <= set(full[0])
  # Normalised: (x - 0.5) / 0.25 maps [0, 1] into [-2, 2].
  assert full[0]['image'].min() >= -2 and full[0]['image'].max() <= 2


def test_bad_augmentation_settings_are_one_line_errors():
  with pytest.raises(KilnError, match="crop='tilt'"):
    augment.check_config(_aug_config(crop='tilt'))
  with pytest.raises(KilnError, match='one entry per channel'):
    augment.check_config(_aug_config(mean=(0.5, 0.5), std=(0.2,)))
  with pytest.raises(KilnError, match='crop_scale'):
    augment.check_config(_aug_config(crop_scale=(0.5, 2.0)))
  config = tiny_config()
  config.augment.mean, config.augment.std = (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)  # Digits: 1 channel.
  with pytest.raises(KilnError, match='3 entries but the images have 1'):
    build_experiment(config)


# ---- TFDS cifar10 under mock data ----

@pytest.mark.slow  # The CIFAR-10 config end to end: augmentation, a train step, a full eval.
def test_cifar10_config_trains_and_evaluates_under_mock_data(devices):
  """configs/resnet18_cifar10.py as a user runs it, on mock CIFAR-10, with a narrow
  ResNet so that it compiles quickly: augmented, normalised batches, one train step and
  a full padded eval pass."""
  config = resnet18_cifar10.get_config()
  config.model.width, config.model.stage_sizes = 8, (1, 1)
  config.batch_size, config.eval_batch_size = 16, 16
  with tfds.testing.mock_data(num_examples=20):
    exp = build_experiment(config, devices)
    assert exp.task.model_input_shape == (32, 32, 3) and exp.task.source.num_classes == 10
    batch = host_batches(exp, 1)[0]
    # Normalised with the CIFAR statistics: roughly zero-mean, unit-scale pixels.
    assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].min() < -1.5
    state, shardings = exp.create_state()
    state, batch_metrics, _ = exp.train_step(shardings)(state, exp.strategy.place(batch))
    assert np.isfinite(float(batch_metrics.compute()['loss']))
    eval_metrics = exp.evaluate(exp.eval_step(shardings), state).compute()
    assert 0.0 <= float(eval_metrics['accuracy']) <= 1.0
