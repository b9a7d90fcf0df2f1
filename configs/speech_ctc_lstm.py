"""Connected digits ("three one four") from FSDD, transcribed character by character by a
bidirectional LSTM trained with CTC. Test utterances join only test recordings (index 0-4)."""

from configs import speech


def get_config():
  c = speech.get_speech_config()
  c.task = 'speech_ctc'
  c.dataset.name = 'fsdd_connected'
  c.audio.max_frames = 280  # 2.8 s; digits that would run past it are left off an utterance.
  c.audio.max_label_len = 32  # Five words of up to five letters, four spaces.
  c.audio.num_train_utterances = 4800  # Fresh digit combinations beat more epochs of the same.
  c.audio.num_eval_utterances = 600
  c.model.name = 'lstm'
  c.model.hidden_dim = 128  # LSTM units per direction.
  c.model.num_layers = 2  # Stacked bidirectional layers.
  c.model.bidirectional = True  # CTC labels benefit from right context.
  c.model.frame_stack = 3  # 30 ms steps: enough frames for a digit's letters and blanks.
  c.model.dropout_rate = 0.2  # Dropout between layers and before the head.
  c.decoding.beam_size = 4
  c.batch_size = 32
  c.eval_batch_size = 100
  c.num_epochs = 8.0
  c.optimizer.learning_rate = 2e-3
  c.gradient.clip_global_norm = 1.0
  c.schedule.warmup_steps = 100
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.early_stopping.metric = 'wer'
  c.early_stopping.mode = 'min'
  return c
