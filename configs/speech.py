"""Speech: classification, CTC and RNN-T transcription over log-mel frames
(input_pipeline/audio.py, tasks/speech.py): the run-wide base plus audio features,
SpecAugment and decoding.

Sources: 'fsdd' (spoken digits), 'fsdd_connected' (utterances joined from FSDD digits)
or 'tfds:<name>' (speech_commands, librispeech, spoken_digit).
"""

import ml_collections

from configs import base


def get_speech_config() -> ml_collections.ConfigDict:
  c = base.get_base_config()
  c.task = 'speech_classification'
  c.dataset.name = 'fsdd'
  c.dataset.subsample_speaker = ''  # fsdd: this speaker keeps only subsample_fraction of their training recordings ('' none).
  c.dataset.subsample_fraction = 1.0  # fsdd: share of subsample_speaker's training recordings kept (drawn by split_seed).
  c.audio = ml_collections.ConfigDict()
  c.audio.num_mels = 40  # Mel filter-bank channels of the log-mel features.
  c.audio.window_ms = 25.0  # Analysis window (Hann) per frame, in milliseconds.
  c.audio.hop_ms = 10.0  # Step between frames, in milliseconds.
  c.audio.max_frames = 160  # Frames per padded utterance (static shape); longer ones are cut.
  c.audio.eval_max_frames = 0  # Frames per padded eval utterance; 0 = max_frames.
  c.audio.max_label_len = 32  # Transcripts: characters per padded label sequence; longer are cut.
  c.audio.eval_max_label_len = 0  # Eval transcripts: characters per padded label; 0 = max_label_len.
  c.audio.max_digits = 5  # fsdd_connected: an utterance joins 1..max_digits recordings.
  c.audio.min_silence_ms = 50.0  # fsdd_connected: shortest silence between two digits.
  c.audio.max_silence_ms = 250.0  # fsdd_connected: longest silence between two digits.
  c.audio.num_train_utterances = 4000  # fsdd_connected: utterances built from train recordings.
  c.audio.num_eval_utterances = 600  # fsdd_connected: utterances built from test recordings.
  c.audio.freq_masks = 2  # SpecAugment: frequency masks per training utterance; 0 disables.
  c.audio.freq_width = 8  # SpecAugment: widest frequency mask, in mel channels (F).
  c.audio.time_masks = 2  # SpecAugment: time masks per training utterance; 0 disables.
  c.audio.time_width = 20  # SpecAugment: widest time mask, in frames (T).
  c.audio.time_width_fraction = 0.2  # SpecAugment: a time mask covers at most this share (p).
  c.decoding = ml_collections.ConfigDict()
  c.decoding.beam_size = 4  # Transcription eval: beam width of the beam-search figures; 0 = greedy only.
  c.decoding.max_symbols_per_frame = 3  # RNN-T greedy decoding: most labels emitted per frame.
  c.decoding.beam_max_symbols_per_frame = 0  # RNN-T beam's labels/frame: 0 greedy's, 1 fastest.
  return c
