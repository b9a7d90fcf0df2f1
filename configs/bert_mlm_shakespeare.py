"""A small BERT trained with masked-language modelling on tiny Shakespeare characters."""

from configs import language


def get_config():
  c = language.get_language_config()
  c.task = 'masked_lm'
  c.dataset.name = 'tiny_shakespeare'
  c.dataset.tokenizer = 'char'
  c.dataset.seq_len = 128
  c.dataset.window_stride = 32  # Overlapping windows: each character seen in 4 contexts.
  c.dataset.holdout_fraction = 0.1  # The last 10% of the text is validation.
  c.dataset.shuffle_buffer = 1_000_000

  c.model.name = 'bert'
  c.model.num_layers = 4  # Transformer blocks.
  c.model.num_heads = 4  # Attention heads per block.
  c.model.embed_dim = 192  # Residual stream width.
  c.model.dropout_rate = 0.1  # On embeddings, attention weights and residual branches (training).
  c.model.positions = 'rotary'  # 'rotary' (RoPE) learns to use context sooner than 'learned' here.
  c.model.num_classes = 0  # Classification head size; 0 for pre-training only.

  c.batch_size = 32
  c.eval_batch_size = 128
  c.num_train_steps = 2000
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.adam.b2 = 0.99
  c.schedule.name = 'cosine'
  c.schedule.warmup_steps = 100
  c.schedule.end_learning_rate_fraction = 0.1
  c.regularization.weight_decay = 0.01
  c.gradient.clip_global_norm = 1.0
  c.early_stopping.metric = 'loss'
  c.early_stopping.mode = 'min'
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  return c
