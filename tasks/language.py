"""Language modelling on text windows: causal LM (GPT) and masked LM (BERT)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics
from flax import nnx, struct

from input_pipeline import text
from models import create_model
from tasks.base import Batch, Distilled, Serving, Task

# BERT (Devlin et al. 2019): 15% of tokens are chosen; of those 80% become [MASK],
# 10% a random token, 10% stay as they are.
MASK_FRACTION, MASK_TOKEN, RANDOM_TOKEN = 0.15, 0.8, 0.1
# Eval masks depend only on this seed and each window's index, never on batching.
EVAL_MASK_SEED = 20_190_000


@struct.dataclass
class Perplexity(metrics.Average):
  def compute(self):
    return jnp.exp(super().compute())


@struct.dataclass
class CausalLMMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')  # Nats per target token.
  perplexity: Perplexity.from_output('loss')
  bits_per_char: metrics.Average.from_output('bits_per_char')
  accuracy: metrics.Average.from_output('accuracy')  # Next-token top-1.


@struct.dataclass
class MaskedLMMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')  # Nats per masked token.
  accuracy: metrics.Average.from_output('accuracy')  # Top-1 on masked tokens.
  unigram_accuracy: metrics.Average.from_output('unigram_accuracy')  # Most frequent token.


class TextTask(Task):
  """A task over token windows of a text source (sized by seq_len and the tokenizer)."""

  model_input_dtype = np.int32  # Token ids.

  def load_data(self, process_index, process_count):
    self.source = text.load_text(self.config.dataset, process_index, process_count)

  @property
  def num_train_examples(self):
    return self.source.train.num_examples

  @property
  def model_input_shape(self):
    return (self.source.seq_len,)

  @property
  def tokenizer(self):
    return self.source.tokenizer

  def build_model(self, rngs, norm_axis_name=None):
    return create_model(self.config.model, rngs, vocab_size=self.tokenizer.vocab_size,
                        max_len=self.source.seq_len, norm_axis_name=norm_axis_name)

  def _text_serving(self, inputs, forward, score, metric: str) -> Serving:
    return Serving(
        inputs=inputs, forward=forward,
        inputs_from_batch=lambda batch: {name: np.asarray(batch[name][:, :shape[0]], dtype)
                                         for name, (shape, dtype) in inputs.items()},
        score=score, predicted_labels=lambda outputs: np.argmax(outputs['logits'], -1),
        metric=metric,
        preprocessing={'tokens': {'tokenizer': self.config.dataset.tokenizer,
                                  'vocab_size': self.tokenizer.vocab_size,
                                  'note': 'tokenisation stays with the server (serve/)'}})

  @staticmethod
  def _token_weights(batch):
    """1 for every target that counts: real tokens of real (unpadded) examples."""
    weights = batch['token_mask']
    return weights * batch['mask'][:, None] if 'mask' in batch else weights


class CausalLanguageModeling(TextTask):
  """Next-token cross-entropy; perplexity and bits per character."""
  metrics_class = CausalLMMetrics

  def _outputs(self, logits, batch):
    targets = batch['tokens'][:, 1:]
    weights = self._token_weights(batch)
    nats = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    bits_per_char = nats / math.log(2) / self.source.eval_chars_per_token
    batch_metrics = CausalLMMetrics.single_from_model_output(
        loss=nats, bits_per_char=bits_per_char, accuracy=correct, mask=weights)
    return (nats * weights).sum() / jnp.maximum(weights.sum(), 1.0), batch_metrics

  def loss(self, model, batch: Batch, rngs: nnx.Rngs):
    return self._outputs(model(batch['tokens'][:, :-1], train=True, rngs=rngs), batch)

  def distillation_outputs(self, model, batch, rngs, teacher):
    """Per-token: every next-token distribution the LM loss scores, weighted as it is."""
    inputs = batch['tokens'][:, :-1]
    logits = model(inputs, train=True, rngs=rngs)
    loss, batch_metrics = self._outputs(logits, batch)
    teacher_logits = jax.lax.stop_gradient(teacher(inputs, train=False))
    return Distilled(loss, batch_metrics, logits, teacher_logits, self._token_weights(batch))

  def evaluate(self, model, batch: Batch):
    return self._outputs(model(batch['tokens'][:, :-1], train=False), batch)[1]

  def serving(self):
    # A fixed-length logits function: seq_len tokens in, next-token logits at each position.
    return self._text_serving(
        {'tokens': ((self.source.seq_len,), 'int32')},
        lambda model, inputs: {'logits': model(inputs['tokens'], train=False)},
        lambda model, outputs, batch: self._outputs(outputs['logits'], batch)[1], metric='loss')


class MaskedLanguageModeling(TextTask):
  """BERT's masked-token prediction with 80/10/10 corruption."""
  metrics_class = MaskedLMMetrics

  def load_data(self, process_index, process_count):
    super().load_data(process_index, process_count)
    counts = self.source.train_token_counts
    self.most_frequent_token = int(np.argmax(counts))
    # Random replacements are drawn from the tokens the training text actually uses.
    self.replacement_tokens = np.flatnonzero(counts).astype(np.int32)

  def corrupt(self, tokens, weights, key):
    """(corrupted tokens, 1.0 where a real token was chosen for prediction)."""
    choose_key, kind_key, random_key = jax.random.split(key, 3)
    chosen = (jax.random.uniform(choose_key, tokens.shape) < MASK_FRACTION) & (weights > 0)
    kind = jax.random.uniform(kind_key, tokens.shape)
    random_tokens = jnp.asarray(self.replacement_tokens)[
        jax.random.randint(random_key, tokens.shape, 0, len(self.replacement_tokens))]
    corrupted = jnp.where(chosen & (kind < MASK_TOKEN), self.tokenizer.mask_id, tokens)
    corrupted = jnp.where(chosen & (kind >= MASK_TOKEN) & (kind < MASK_TOKEN + RANDOM_TOKEN),
                          random_tokens, corrupted)
    return corrupted, chosen.astype(jnp.float32)

  def _outputs(self, model, batch, keys, train, rngs=None):
    tokens = batch['tokens'][:, :-1]
    weights = self._token_weights(batch)
    corrupted, predicted = jax.vmap(self.corrupt)(tokens, weights, keys)
    key_mask = batch['token_mask'] > 0  # Padding never takes part in attention.
    logits = model(corrupted, key_mask=key_mask, train=train, rngs=rngs)
    nats = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    correct = (jnp.argmax(logits, -1) == tokens).astype(jnp.float32)
    unigram = (tokens == self.most_frequent_token).astype(jnp.float32)
    batch_metrics = MaskedLMMetrics.single_from_model_output(
        loss=nats, accuracy=correct, unigram_accuracy=unigram, mask=predicted)
    return (nats * predicted).sum() / jnp.maximum(predicted.sum(), 1.0), batch_metrics

  def loss(self, model, batch: Batch, rngs: nnx.Rngs):
    keys = jax.random.split(rngs.dropout(), batch['tokens'].shape[0])
    return self._outputs(model, batch, keys, train=True, rngs=rngs)

  def evaluate(self, model, batch: Batch):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(EVAL_MASK_SEED), i))(
        batch['index'])
    return self._outputs(model, batch, keys, train=False)[1]
