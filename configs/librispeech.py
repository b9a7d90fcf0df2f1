"""Character RNN-T on TFDS librispeech (16 kHz read English) with a Conformer encoder.
Needs the prepared TFDS dataset (about 60 GB for all splits). Training utterances are cut
at max_frames (16 s; audio only, a cut utterance keeps its whole transcript: raise
max_frames to train on every one whole). Eval pads to 35 s, the longest LibriSpeech
segment (Panayotov et al. 2015), so every test utterance is scored whole.
An accelerator is expected: on a CPU one epoch of train_clean100 takes days."""

import ml_collections

from configs import speech


def get_config():
  c = speech.get_speech_config()
  c.task = 'speech_rnnt'
  c.dataset.name = 'tfds:librispeech'
  c.dataset.train_split = 'train_clean100'
  c.dataset.eval_split = 'test_clean'
  c.dataset.shuffle_buffer = 2048
  c.audio.num_mels = 80  # The Conformer paper's 80-channel filter bank.
  c.audio.max_frames = 1600  # 16 s at 10 ms.
  c.audio.max_label_len = 256  # Characters per transcript; longer transcripts are cut.
  c.audio.eval_max_frames = 3500  # 35 s: no test utterance is cut.
  c.audio.eval_max_label_len = 700  # 35 s at up to 20 characters/s: no reference is cut.
  c.audio.freq_masks = 2
  c.audio.freq_width = 27  # SpecAugment LibriSpeech policy (LD): F = 27.
  c.audio.time_masks = 10
  c.audio.time_width = 40
  c.audio.time_width_fraction = 0.05  # ps = 0.05 of the utterance per time mask.
  c.model.name = 'transducer'
  c.model.encoder = ml_collections.ConfigDict()
  c.model.encoder.name = 'conformer'  # Encoder family: 'conformer' or 'lstm'.
  c.model.encoder.model_dim = 256  # Conformer width (between the paper's S and M).
  c.model.encoder.num_layers = 16  # Conformer blocks (the paper's S and M depth).
  c.model.encoder.num_heads = 4  # Attention heads per block.
  c.model.encoder.ff_ratio = 4  # Feed-forward hidden width / model_dim.
  c.model.encoder.conv_kernel_size = 31  # Depthwise convolution width, as in the paper.
  c.model.encoder.subsample_channels = 256  # Channels of the two stride-2 subsampling convs.
  c.model.encoder.dropout_rate = 0.1  # Dropout in every residual branch.
  c.model.encoder.conv_norm = 'batch'  # After the depthwise conv: 'batch' (the paper's) or 'layer'.
  c.model.embed_dim = 256  # Prediction network: label embedding width.
  c.model.pred_hidden_dim = 320  # Prediction network: LSTM units (the paper's single layer).
  c.model.joint_dim = 320  # Joint network: hidden width.
  c.decoding.beam_size = 4
  c.decoding.max_symbols_per_frame = 5
  c.batch_size = 64
  c.eval_batch_size = 16  # Eval RNN-T lattices are 875 x 701 x joint_dim per utterance.
  c.num_epochs = 100.0
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.adam.b2 = 0.98
  c.regularization.weight_decay = 1e-3
  c.gradient.clip_global_norm = 1.0
  c.schedule.name = 'rsqrt'
  c.schedule.warmup_steps = 10_000  # Transformer schedule, as in the Conformer paper.
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000
  c.early_stopping.metric = 'wer'
  c.early_stopping.mode = 'min'
  return c
