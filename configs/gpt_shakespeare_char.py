"""Character-level GPT on tiny Shakespeare: the "baby GPT" recipe (nanoGPT's
shakespeare_char): 6 layers, 6 heads, width 384, context 256, dropout 0.2,
AdamW at 1e-3 with cosine decay to 1e-4 over 5000 steps after 100 of warmup.
"""

from configs import language


def get_config():
  c = language.get_language_config()
  c.task = 'causal_lm'
  c.dataset.name = 'tiny_shakespeare'
  c.dataset.tokenizer = 'char'
  c.dataset.seq_len = 256
  c.dataset.window_stride = 1  # Every offset is a training window, like random crops.
  c.dataset.holdout_fraction = 0.1  # The last 10% of the text is validation.
  c.dataset.shuffle_buffer = 1_000_000

  c.model.name = 'gpt'
  c.model.num_layers = 6  # Transformer blocks.
  c.model.num_heads = 6  # Attention heads per block.
  c.model.embed_dim = 384  # Residual stream width.
  c.model.dropout_rate = 0.2  # On embeddings, attention weights and residual branches (training).
  c.model.use_bias = False  # No biases in projections or LayerNorms (nanoGPT's default).
  c.model.positions = 'rotary'  # 'rotary' (RoPE) or a 'learned' table; see the README figures.
  c.model.tie_embeddings = True  # The output projection reuses the token embedding.
  c.model.scan_layers = False  # Stack blocks under lax.scan (faster compiles for deep models).
  c.model.remat_policy = 'none'  # Scanned layers only: 'none', 'dots' or 'full' recomputation.
  c.model.dtype = 'float32'  # Compute dtype; 'bfloat16' on accelerators.

  c.batch_size = 64
  c.eval_batch_size = 128
  c.num_train_steps = 5000
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.adam.b2 = 0.99
  c.schedule.name = 'cosine'
  c.schedule.warmup_steps = 100
  c.schedule.end_learning_rate_fraction = 0.1  # Cosine ends at 1e-4.
  c.regularization.weight_decay = 0.1
  c.regularization.exclude = r'bias$|scale$'  # Decay matrices and embeddings, not norms/biases.
  c.gradient.clip_global_norm = 1.0
  c.early_stopping.metric = 'loss'
  c.early_stopping.mode = 'min'
  c.log_every_steps = 50
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 500
  return c
