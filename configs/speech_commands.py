"""Keyword spotting on TFDS speech_commands (12 classes: 10 words, silence, unknown; 1 s at
16 kHz) with the bidirectional LSTM classifier. Needs the prepared TFDS dataset:
tfds.builder('speech_commands').download_and_prepare() with internet, or
--config.dataset.tfds_data_dir pointing at a prepared copy."""

from configs import speech


def get_config():
  c = speech.get_speech_config()
  c.task = 'speech_classification'
  c.dataset.name = 'tfds:speech_commands'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  c.dataset.shuffle_buffer = 8192
  c.audio.max_frames = 100  # 1 s clips: 98 frames of 25 ms every 10 ms.
  c.model.name = 'lstm'
  c.model.hidden_dim = 192  # LSTM units per direction.
  c.model.num_layers = 2  # Stacked bidirectional layers.
  c.model.bidirectional = True  # Both directions: the whole clip is available.
  c.model.frame_stack = 2  # 20 ms steps.
  c.model.dropout_rate = 0.2  # Dropout between layers and before the head.
  c.batch_size = 128
  c.eval_batch_size = 256
  c.num_epochs = 20.0
  c.optimizer.learning_rate = 2e-3
  c.gradient.clip_global_norm = 1.0
  c.schedule.warmup_steps = 500
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 2000
  return c
