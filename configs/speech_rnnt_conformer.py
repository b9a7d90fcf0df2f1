"""Connected FSDD digits transcribed by an RNN-T: a Conformer encoder (4x subsampling,
40 ms frames), an LSTM prediction network and a joint network over blank + characters."""

import ml_collections

from configs import speech


def get_config():
  c = speech.get_speech_config()
  c.task = 'speech_rnnt'
  c.dataset.name = 'fsdd_connected'
  c.audio.max_frames = 280  # 2.8 s; digits that would run past it are left off an utterance.
  c.audio.max_label_len = 32  # Five words of up to five letters, four spaces.
  c.audio.num_train_utterances = 3000
  c.audio.num_eval_utterances = 600
  c.model.name = 'transducer'
  c.model.encoder = ml_collections.ConfigDict()
  c.model.encoder.name = 'conformer'  # Encoder family: 'conformer' or 'lstm'.
  c.model.encoder.model_dim = 96  # Conformer width (speech_digits' encoder).
  c.model.encoder.num_layers = 3  # Conformer blocks.
  c.model.encoder.num_heads = 4  # Attention heads per block.
  c.model.encoder.ff_ratio = 4  # Feed-forward hidden width / model_dim.
  c.model.encoder.conv_kernel_size = 15  # Depthwise convolution width, in 40 ms frames.
  c.model.encoder.subsample_channels = 32  # Channels of the two stride-2 subsampling convs.
  c.model.encoder.dropout_rate = 0.1  # Dropout in every residual branch.
  c.model.encoder.conv_norm = 'batch'  # After the depthwise conv: 'batch' (the paper's) or 'layer'.
  c.model.embed_dim = 64  # Prediction network: label embedding width.
  c.model.pred_hidden_dim = 128  # Prediction network: LSTM units.
  c.model.joint_dim = 128  # Joint network: hidden width.
  c.decoding.beam_size = 4
  c.decoding.max_symbols_per_frame = 3
  c.batch_size = 32
  c.eval_batch_size = 100
  c.num_epochs = 16.0  # At 12 train and eval losses still fell at the end (eval 0.089; here 0.062).
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3
  c.regularization.weight_decay = 1e-2
  c.gradient.clip_global_norm = 1.0
  c.schedule.warmup_steps = 100
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.early_stopping.metric = 'wer'
  c.early_stopping.mode = 'min'
  return c
