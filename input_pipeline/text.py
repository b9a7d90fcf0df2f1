"""Text for language models: a local file or a TFDS text dataset -> token windows.

The token stream is cut into windows of `seq_len + 1` tokens, {'tokens', 'token_mask',
'index'}: the task feeds tokens[:-1] and predicts tokens[1:], and 'token_mask'
(float32[seq_len]) is 1 where that target is a real token. Training windows start every
`window_stride` tokens. Eval windows start every `seq_len` tokens, so neighbours share one
boundary token and every held-out token after the first is a target exactly once; the last
window is padded with `pad_id` and masked. Every host reads the whole text and keeps its
rows of each global batch (`HostSplit.sliced`), like the small array sources.
"""

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow as tf

from core.errors import KilnError
from input_pipeline import sources
from input_pipeline.sources import TFDS_PREFIX, HostSplit, shared_datasets_dir
from input_pipeline.tokenizers import Tokenizer, build_tokenizer, check_tokenizer_name

TEXT_SOURCES = ('tiny_shakespeare', 'text_file')
TFDS_TEXT_FEATURE = 'text'
DOCUMENT_SEPARATOR = '\n'


@dataclasses.dataclass(frozen=True)
class TextSource:
  train: HostSplit  # Windows over the training text, starting every window_stride tokens.
  eval: HostSplit  # Windows covering the held-out text once; the last one padded and masked.
  tokenizer: Tokenizer  # Fitted to the training text only.
  seq_len: int  # Model input length; windows hold seq_len + 1 tokens.
  eval_chars_per_token: float  # Turns eval nats per token into bits per character.
  train_token_counts: np.ndarray  # Occurrences of each token id in the training stream.


def check_text_dataset_name(name: str) -> None:
  if name in TEXT_SOURCES or (name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX)):
    return
  raise KilnError(
      f"unknown text dataset '{name}': set config.dataset.name to one of "
      f"{', '.join(TEXT_SOURCES)} or 'tfds:<name>' (e.g. tfds:lm1b)")


def text_file_path(dataset_config) -> Path:
  """The local file to read, checked to exist."""
  if dataset_config.text_file:
    path = Path(dataset_config.text_file).expanduser()
  elif dataset_config.name == 'tiny_shakespeare':
    path = shared_datasets_dir() / 'tinyshakespeare' / 'input.txt'
  else:
    raise KilnError("dataset 'text_file' needs a file: set config.dataset.text_file to the "
                    'path of a UTF-8 text file')
  if not path.is_file():
    raise KilnError(f"text file '{path}' not found: set config.dataset.text_file (or "
                    '$KILN_DATASETS for tiny_shakespeare) to an existing UTF-8 text file')
  return path


def split_text(text: str, holdout_fraction: float) -> tuple[str, str]:
  """(train, held out): the held-out part is the last `holdout_fraction` of the characters,
  unshuffled, as nanoGPT splits (n = int(0.9 * len(text)) for 0.1)."""
  if not 0.0 < holdout_fraction < 1.0:
    raise KilnError(f'config.dataset.holdout_fraction={holdout_fraction} must lie in (0, 1)')
  num_train = int((1.0 - holdout_fraction) * len(text))
  return text[:num_train], text[num_train:]


def read_tfds_text(dataset_config, split: str) -> str:
  """All documents of a TFDS split's 'text' feature, in order, joined by newlines."""
  builder = sources.tfds_builder(dataset_config)
  if TFDS_TEXT_FEATURE not in builder.info.features:
    raise KilnError(f"TFDS dataset '{builder.name}' has no '{TFDS_TEXT_FEATURE}' feature: pick a "
                    'text dataset (e.g. tfds:lm1b, tfds:tiny_shakespeare) in config.dataset.name')
  sources.check_tfds_split(builder, split)
  with sources.tfds_prepared(builder):
    documents = builder.as_dataset(split=split, shuffle_files=False).map(
        lambda example: example[TFDS_TEXT_FEATURE], num_parallel_calls=tf.data.AUTOTUNE)
  return DOCUMENT_SEPARATOR.join(
      document.decode('utf-8') for document in documents.as_numpy_iterator())


def read_text(dataset_config) -> tuple[str, str]:
  """(train text, eval text) of the dataset that `dataset_config.name` names."""
  check_text_dataset_name(dataset_config.name)
  if dataset_config.name.startswith(TFDS_PREFIX):
    return (read_tfds_text(dataset_config, dataset_config.train_split),
            read_tfds_text(dataset_config, dataset_config.eval_split))
  path = text_file_path(dataset_config)
  try:
    text = path.read_text(encoding='utf-8')
  except UnicodeDecodeError as e:
    raise KilnError(f"'{path}' is not UTF-8 text ({e.reason} at byte {e.start}): convert it "
                    'or set config.dataset.text_file to a UTF-8 file') from e
  return split_text(text, dataset_config.holdout_fraction)


def num_train_windows(num_tokens: int, seq_len: int, stride: int) -> int:
  """Full windows of seq_len + 1 tokens starting every `stride` tokens; a tail too short
  for one more window is left out."""
  return max(0, (num_tokens - seq_len - 1) // stride + 1)


def num_eval_windows(num_tokens: int, seq_len: int) -> int:
  """Windows whose targets (all tokens but the first) cover the stream exactly once."""
  return -(-(num_tokens - 1) // seq_len)


def window_examples(tokens: np.ndarray, seq_len: int, stride: int, num_windows: int,
                    pad_id: int) -> tf.data.Dataset:
  """Window i is tokens[i * stride : i * stride + seq_len + 1], padded past the end.

  Windows are sliced on demand, so overlapping windows (small strides) cost no memory.
  """
  window_len = seq_len + 1
  stream_len = max(len(tokens), (num_windows - 1) * stride + window_len)
  stream = np.full(stream_len, pad_id, np.int32)
  stream[:len(tokens)] = tokens
  stream = tf.constant(stream)
  target_offsets = tf.range(1, window_len, dtype=tf.int64)

  def window(index):
    start = index * stride
    return {'tokens': tf.slice(stream, [start], [window_len]),
            'token_mask': tf.cast(start + target_offsets < len(tokens), tf.float32),
            'index': tf.cast(index, tf.int32)}

  return tf.data.Dataset.range(num_windows).map(window, num_parallel_calls=tf.data.AUTOTUNE)


def _check_window_config(dataset_config) -> tuple[int, int]:
  seq_len, stride = dataset_config.seq_len, dataset_config.window_stride
  if seq_len < 1:
    raise KilnError(f'config.dataset.seq_len={seq_len} must be at least 1')
  if stride < 0:
    raise KilnError(f'config.dataset.window_stride={stride} must be 0 (= seq_len) or positive')
  return seq_len, stride or seq_len


def load_text(dataset_config, process_index: int, process_count: int) -> TextSource:
  """This host's view of the text dataset that `dataset_config.name` names."""
  check_text_dataset_name(dataset_config.name)
  check_tokenizer_name(dataset_config.tokenizer)
  seq_len, stride = _check_window_config(dataset_config)
  train_text, eval_text = read_text(dataset_config)
  tokenizer = build_tokenizer(dataset_config, train_text)
  train_tokens, eval_tokens = tokenizer.encode(train_text), tokenizer.encode(eval_text)
  num_train = num_train_windows(len(train_tokens), seq_len, stride)
  if num_train == 0:
    raise KilnError(f'the training text has {len(train_tokens)} tokens, fewer than one window '
                    f'of seq_len + 1 = {seq_len + 1}: lower config.dataset.seq_len')
  if len(eval_tokens) < 2:
    raise KilnError(f'the held-out text has {len(eval_tokens)} tokens, too few to predict one: '
                    'raise config.dataset.holdout_fraction or use a longer eval split')
  num_eval = num_eval_windows(len(eval_tokens), seq_len)

  def host_split(examples, num_windows):
    return HostSplit(examples, num_windows, num_windows, process_index, process_count,
                     sliced=True)

  return TextSource(
      train=host_split(window_examples(train_tokens, seq_len, stride, num_train,
                                       tokenizer.pad_id), num_train),
      eval=host_split(window_examples(eval_tokens, seq_len, seq_len, num_eval,
                                      tokenizer.pad_id), num_eval),
      tokenizer=tokenizer, seq_len=seq_len,
      eval_chars_per_token=len(eval_text) / len(eval_tokens),
      train_token_counts=np.bincount(train_tokens, minlength=tokenizer.vocab_size))
