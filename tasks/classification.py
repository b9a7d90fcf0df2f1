"""Image classification: softmax cross-entropy, accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics
from flax import nnx, struct

from input_pipeline import augment, sources
from models import create_model
from tasks import fairness
from tasks.base import Batch, Distilled, Serving, Task


@struct.dataclass
class ClassificationMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')


class ImageTask(Task):
  """A task over `self.source`'s images (image_shape, num_classes); the model is sized
  from them. Shared by classification and detection."""

  @property
  def model_input_shape(self):
    return self.source.image_shape

  def build_model(self, rngs, norm_axis_name=None):
    return create_model(self.config.model, rngs, num_classes=self.source.num_classes,
                        input_shape=self.source.image_shape, norm_axis_name=norm_axis_name)

  # --- serving: clients send [0, 1] pixels; the per-channel normalisation is the model's ---
  def _image_serving(self, forward, score, predicted_labels, metric: str) -> Serving:
    a = self.config.augment
    mean, std = np.asarray(a.mean or [0.0], np.float32), np.asarray(a.std or [1.0], np.float32)
    shape = tuple(int(d) for d in self.source.image_shape)
    if a.image_size:
      shape = (a.image_size, a.image_size, shape[-1])

    def normalized_forward(model, inputs):
      return forward(model, augment.normalize(inputs['image'], a.mean, a.std))

    def inputs_from_batch(batch):  # Eval images arrive normalised: undo it, exactly invertibly.
      return {'image': (np.asarray(batch['image'], np.float32) * std + mean).astype(np.float32)}

    steps = ['decode to float32 pixels in [0, 1], channels last']
    if a.image_size:
      steps.append(f'resize the shorter side to {int(round(a.image_size / a.eval_crop_fraction))}'
                   f' and take the central {a.image_size}x{a.image_size} crop')
    return Serving(
        inputs={'image': (shape, 'float32')}, forward=normalized_forward,
        inputs_from_batch=inputs_from_batch, score=score, predicted_labels=predicted_labels,
        preprocessing={'image': {'shape': list(shape), 'range': [0.0, 1.0], 'steps': steps,
                                 'normalization_in_model': {'mean': list(a.mean),
                                                            'std': list(a.std)}}},
        metric=metric)
  # --- end serving ---


class ImageClassification(ImageTask):
  metrics_class = ClassificationMetrics

  def load_data(self, process_index, process_count):
    self.source = augment.prepare_source(
        sources.load(self.config.dataset, process_index, process_count), self.config.augment)
    train = self.source.train
    # Sharded hosts may differ by one example; the epoch length only needs to be close.
    self._num_train_examples = train.num_examples * (1 if train.sliced else process_count)
    self.groups = self._load_groups()
    if self.groups is not None:
      self.metrics_class = fairness.with_fields(
          ClassificationMetrics, fairness.eval_fields(self.groups, self.source.num_classes))

  # --- fairness: groups are the classes ('label') or a class feature of the dataset (a TFDS
  # ClassLabel beside the label, e.g. cifar100's coarse_label): per-group accuracy and gaps ---
  fairness_gaps = fairness.GAPS

  def _load_groups(self) -> fairness.Groups | None:
    feature = self.config.get('fairness', {}).get('group', '')
    if not feature:
      return None
    fairness.check_feature(feature, ('label', *self.source.group_features),
                           f"dataset '{self.config.dataset.name}'")
    names = self.source.group_features.get(feature) or tuple(
        str(c) for c in range(self.source.num_classes))
    train = self.source.train
    counts = fairness.train_counts(train, fairness.whole_split_feature(train, feature),
                                   len(names))
    return fairness.Groups(feature, names, lambda batch: batch[feature], counts)
  # --- end fairness ---

  def train_batches(self, host_batch_size, start_step, sampling_rate=None):
    return augment.augment_batches(super().train_batches(host_batch_size, start_step,
                                                         sampling_rate),
                                   self.config.augment, self.config.seed, start_step)

  @property
  def num_train_examples(self):
    return self._num_train_examples

  def _outputs(self, logits: jax.Array, labels: jax.Array, mask=None):
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return per_example, ClassificationMetrics.single_from_model_output(
        loss=per_example, accuracy=correct, mask=mask)

  def _example_losses(self, logits: jax.Array, batch: Batch):
    per_example, batch_metrics = self._outputs(logits, batch['label'])
    if 'mix_label' in batch:  # Mixup/CutMix: cross-entropy is linear in the target.
      weight = batch['mix_weight']
      per_example = weight * per_example + (1 - weight) * (
          optax.softmax_cross_entropy_with_integer_labels(logits, batch['mix_label']))
    return per_example, batch_metrics

  def _train_loss(self, logits: jax.Array, batch: Batch):
    per_example, batch_metrics = self._example_losses(logits, batch)
    return per_example.mean(), batch_metrics

  def example_train_losses(self, model, batch, rngs):
    return self._example_losses(model(batch['image'], train=True, rngs=rngs), batch)

  def loss(self, model: nnx.Module, batch: Batch, rngs: nnx.Rngs):
    return self._train_loss(model(batch['image'], train=True, rngs=rngs), batch)

  def distillation_outputs(self, model, batch, rngs, teacher):
    # Mixup/CutMix batches: the teacher sees the same mixed image, so its soft targets are
    # its own view of the mixture (the "consistent teaching" of Beyer et al. 2022,
    # arXiv:2106.05237); the hard term keeps the mixed labels of `loss`.
    images = batch['image']
    logits = model(images, train=True, rngs=rngs)
    loss, batch_metrics = self._train_loss(logits, batch)
    teacher_logits = jax.lax.stop_gradient(teacher(images, train=False))
    return Distilled(loss, batch_metrics, logits, teacher_logits,
                     jnp.ones(logits.shape[:-1], jnp.float32))

  def evaluate(self, model: nnx.Module, batch: Batch):
    return self._scored(model(batch['image'], train=False), batch)

  def _scored(self, logits: jax.Array, batch: Batch):
    """Eval metrics (with the groups' under config.fairness.group) of `logits`."""
    if self.groups is None:
      return self._outputs(logits, batch['label'], batch['mask'])[1]
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    predicted = jnp.argmax(logits, -1)
    return self.metrics_class.single_from_model_output(
        loss=per_example, accuracy=(predicted == batch['label']).astype(jnp.float32),
        mask=batch['mask'], label=batch['label'], predicted=predicted,
        group=self.groups.of_batch(batch))

  # --- robustness: attacks perturb [0, 1] pixels; the model sees them normalised ---
  def _pixel_stats(self):
    a = self.config.augment
    return (jnp.asarray(a.mean or [0.0], jnp.float32), jnp.asarray(a.std or [1.0], jnp.float32))

  def attack_pixels(self, batch):
    mean, std = self._pixel_stats()
    return batch['image'] * std + mean

  def with_pixels(self, batch, pixels):
    mean, std = self._pixel_stats()
    return {**batch, 'image': (pixels - mean) / std}

  def example_losses(self, model, batch):
    return optax.softmax_cross_entropy_with_integer_labels(
        model(batch['image'], train=False), batch['label'])
  # --- end robustness ---

  def serving(self):
    return self._image_serving(
        lambda model, images: {'logits': model(images, train=False)},
        lambda model, outputs, batch: self._scored(outputs['logits'], batch),
        lambda outputs: np.argmax(outputs['logits'], -1), metric='accuracy')
