"""The baby GPT shrunk for a laptop CPU (nanoGPT's CPU recipe): 4 layers, 4 heads,
width 128, context 64, batch 12, 2000 steps with the learning rate decayed over
all of them, no dropout.
"""

from configs import gpt_shakespeare_char


def get_config():
  c = gpt_shakespeare_char.get_config()
  c.dataset.seq_len = 64
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.embed_dim = 128
  c.model.dropout_rate = 0.0
  c.batch_size = 12
  # Two micro-batches of 6 per step (one update, same gradient): activations stay in the
  # caches. Host-dependent: 1.3x the tokens/s on the 2-core host it was tuned on, 0.88x on a
  # later one (benchmarks/gpt_throughput.py --shape cpu times both; set 1 where faster).
  c.gradient.accumulation_steps = 2
  c.eval_batch_size = 240
  c.num_train_steps = 2000
  c.log_every_steps = 50
  c.eval_every_steps = 250
  return c
