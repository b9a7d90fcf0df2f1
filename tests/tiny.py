"""Tiny configs and paths shared by tests (importable without conftest's device set-up)."""

from pathlib import Path

from configs import default

REPO = Path(__file__).resolve().parents[1]  # The checkout: subprocess tests run from here.


def tiny_config():
  """The default digits config shrunk to compile and run in seconds on 8 fake devices."""
  c = default.get_config()
  c.model.features = (8, 16)
  c.model.dense_features = 32
  c.batch_size = 32
  c.eval_batch_size = 64  # 359 held-out digits: the last eval batch is padded.
  c.num_train_steps = 40
  c.schedule.warmup_steps = 5
  c.optimizer.learning_rate = 1e-2
  c.log_every_steps = 10
  c.eval_every_steps = 20
  c.checkpoint_every_steps = 20
  return c


def multihost_config():
  """Logs every step so that runs can be compared step by step."""
  c = tiny_config()
  c.model.dropout_rate = 0.0
  c.num_train_steps = 12
  c.log_every_steps = 1
  c.eval_every_steps = 6
  c.checkpoint_every_steps = 3
  return c


def tiny_gpt_config():
  """A 2-layer character GPT on tiny Shakespeare, 1% held out to keep eval short."""
  from configs import gpt_shakespeare_char_cpu
  c = gpt_shakespeare_char_cpu.get_config()
  c.dataset.seq_len = 32
  c.dataset.window_stride = 32
  c.dataset.holdout_fraction = 0.01
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.embed_dim = 64
  c.batch_size = 16
  c.gradient.accumulation_steps = 1  # One compiled micro-step: faster to compile.
  c.eval_batch_size = 64
  c.num_train_steps = 100
  c.schedule.warmup_steps = 5
  c.optimizer.learning_rate = 3e-3
  c.log_every_steps = 10
  c.eval_every_steps = 50
  c.checkpoint_every_steps = 50
  return c


def tiny_bert_config():
  """A 2-layer character BERT; 200 steps take it past always guessing ' '."""
  from configs import bert_mlm_shakespeare
  c = bert_mlm_shakespeare.get_config()
  c.dataset.seq_len = 64
  c.dataset.window_stride = 64
  c.dataset.holdout_fraction = 0.01
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.embed_dim = 64
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_train_steps = 200
  c.schedule.warmup_steps = 5
  c.optimizer.learning_rate = 3e-3
  c.log_every_steps = 50
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  return c


def tiny_bert_classify_config():
  """tiny_bert_config's BERT naming the speaker (of the 4 most frequent) of a speech."""
  from configs import bert_classify_shakespeare
  c = bert_classify_shakespeare.get_config()
  c.dataset.num_speakers = 4
  c.dataset.seq_len = 64
  c.dataset.pretrain_holdout_fraction = 0.01  # tiny_bert_config's, so its checkpoints load.
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.embed_dim = 64
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_train_steps = 100
  c.schedule.warmup_steps = 5
  c.optimizer.learning_rate = 3e-3
  c.log_every_steps = 20
  c.eval_every_steps = 50
  c.checkpoint_every_steps = 50
  return c


def fault_config():
  """tiny_config checkpointing every 2 steps, without dropout (runs killed at random steps are
  compared with an uninterrupted one)."""
  c = tiny_config()
  c.model.dropout_rate = 0.0
  c.num_train_steps = 30
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 3
  c.eval_every_steps = 30
  return c
