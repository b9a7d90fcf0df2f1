"""Sequence classification with BERT: class logits from the [CLS] position."""

import jax
import jax.numpy as jnp
import optax
from clu import metrics
from flax import nnx, struct

from core.errors import KilnError
from input_pipeline import labeled_text
from models import MODELS, create_model
from tasks.base import Batch
from tasks.language import TextTask


@struct.dataclass
class SequenceClassificationMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')  # Nats per example.
  accuracy: metrics.Average.from_output('accuracy')
  # Accuracy of always answering the most frequent training label: the bar to clear.
  majority_accuracy: metrics.Average.from_output('majority_accuracy')


class SequenceClassification(TextTask):
  """Softmax cross-entropy on `model.classify` logits; padding never takes part in attention."""
  metrics_class = SequenceClassificationMetrics
  prediction_method = 'classify'  # The BERT's class logits; its __call__ is the MLM head.

  def load_data(self, process_index, process_count):
    model_name = self.config.model.name
    if not hasattr(MODELS.get(model_name), 'classify'):
      raise KilnError(f"config.model.name='{model_name}' has no classification head: use "
                      f"one of {', '.join(n for n, m in MODELS.items() if hasattr(m, 'classify'))}")
    self.source = labeled_text.load_labeled_text(self.config.dataset, process_index,
                                                 process_count)
    configured = self.config.model.get('num_classes', 0)
    if configured and configured != self.source.num_classes:
      raise KilnError(f'config.model.num_classes={configured} but the data has '
                      f'{self.source.num_classes} classes: set it to {self.source.num_classes} '
                      'or to 0 (take it from the data)')
    self.majority_label = int(self.source.train_label_counts.argmax())

  def build_model(self, rngs, norm_axis_name=None):
    # The head's size always comes from the data (load_data checked any configured value).
    model_config = {k: v for k, v in self.config.model.items() if k != 'num_classes'}
    return create_model(model_config, rngs, vocab_size=self.tokenizer.vocab_size,
                        max_len=self.source.seq_len, num_classes=self.source.num_classes,
                        norm_axis_name=norm_axis_name)

  def _outputs(self, model, batch, train, rngs=None, mask=None):
    key_mask = batch['token_mask'] > 0
    logits = model.classify(batch['tokens'], key_mask=key_mask, train=train, rngs=rngs)
    return self._scores(logits, batch, mask)

  def _scores(self, logits, batch, mask):
    labels = batch['label']
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    majority = (labels == self.majority_label).astype(jnp.float32)
    return per_example, SequenceClassificationMetrics.single_from_model_output(
        loss=per_example, accuracy=correct, majority_accuracy=majority, mask=mask)

  def loss(self, model: nnx.Module, batch: Batch, rngs: nnx.Rngs
           ) -> tuple[jax.Array, metrics.Collection]:
    per_example, batch_metrics = self._outputs(model, batch, train=True, rngs=rngs)
    return per_example.mean(), batch_metrics

  def evaluate(self, model: nnx.Module, batch: Batch) -> metrics.Collection:
    return self._outputs(model, batch, train=False, mask=batch['mask'])[1]

  def serving(self):
    seq_len = self.source.seq_len
    return self._text_serving(
        {'tokens': ((seq_len,), 'int32'), 'token_mask': ((seq_len,), 'int32')},
        lambda model, inputs: {'logits': model.classify(
            inputs['tokens'], key_mask=inputs['token_mask'] > 0, train=False)},
        lambda model, outputs, batch: self._scores(outputs['logits'], batch, batch['mask'])[1],
        metric='accuracy')
