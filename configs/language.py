"""Text: causal and masked language modelling and sequence classification over a text file
(input_pipeline/text.py, labeled_text.py): the run-wide base plus the text dataset fields.

Sources: 'tiny_shakespeare' (the shared copy), 'text_file' (config.dataset.text_file)
or 'tfds:<name>'.
"""

import ml_collections

from configs import base


def get_language_config() -> ml_collections.ConfigDict:
  c = base.get_base_config()
  c.task = 'causal_lm'
  c.dataset.name = 'tiny_shakespeare'
  c.dataset.text_file = ''  # Text: UTF-8 file to read; '' = tiny_shakespeare's shared copy.
  c.dataset.tokenizer = 'char'  # Text: 'char', 'byte' (UTF-8) or 'sentencepiece'.
  c.dataset.vocab_size = 8192  # Text, sentencepiece only: pieces incl. the 5 special tokens.
  c.dataset.seq_len = 256  # Text: tokens per window the model sees (windows hold seq_len + 1).
  c.dataset.window_stride = 0  # Text: tokens between training windows' starts; 0 = seq_len.
  return c
