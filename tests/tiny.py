"""Tiny configs shared by tests (importable without conftest's device set-up)."""

from configs import default


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
