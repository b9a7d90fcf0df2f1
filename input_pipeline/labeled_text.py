"""Labelled text for sequence classification: speakers of a play, or a TFDS text dataset.

Every example is {'tokens': int32[seq_len], 'token_mask': float32[seq_len], 'label': int32,
'index': int32}: [CLS], then the text's first seq_len - 1 tokens, then `pad_id`;
'token_mask' is 1 on [CLS] and the text. 'index' is the example's position in its source
(the speech's number in the play text, the example's number in the TFDS split).

Local text ('tiny_shakespeare' or a 'text_file' in the same layout) is blocks of
"NAME:\\n<speech lines>\\n\\n"; the label is the speaker, one of the `num_speakers` who
speak most often. Each speaker's last `holdout_fraction` of speeches (in text order, never
shuffled) is held out. The cut is per speaker because tiny Shakespeare is whole plays one
after another: one cut through the file would hold out only the last plays' characters.
The char tokenizer is fitted exactly as input_pipeline.text.load_text fits it for a
language model on the same file, so token ids match a masked-LM checkpoint's embeddings.

TFDS ('tfds:glue/sst2', 'tfds:imdb_reviews', ...): a 'text' or 'sentence' feature and a
ClassLabel 'label'. Each split is read whole into memory (sentiment sets are tens of
MB of text) and, like the local sources, every host keeps its rows of each global batch.
"""

import collections
import dataclasses
import operator
import re

import numpy as np
import tensorflow as tf

from core.errors import KilnError
from input_pipeline import sources, text
from input_pipeline.sources import TFDS_PREFIX, HostSplit
from input_pipeline.tokenizers import Tokenizer, build_tokenizer, check_tokenizer_name

TFDS_TEXT_FEATURES = ('text', 'sentence')  # The first one a dataset has is the input text.
TFDS_LABEL_FEATURE = 'label'
# A speech is a block (after a blank line or at the start) whose first line names the speaker.
_SPEECH = re.compile(r'(?:\A|(?<=\n\n))(?P<speaker>[^\n]+):\n(?P<speech>[^\n]+(?:\n[^\n]+)*)')


@dataclasses.dataclass(frozen=True)
class LabeledTextSource:
  train: HostSplit  # Training examples, in source order (batching shuffles them).
  eval: HostSplit  # Held-out examples, each once.
  tokenizer: Tokenizer  # The pretraining run's tokenizer (char: fitted to the same text).
  seq_len: int  # Tokens per example, [CLS] included.
  label_names: tuple[str, ...]  # Label i is label_names[i].
  train_label_counts: np.ndarray  # Training examples per label.

  @property
  def num_classes(self) -> int:
    return len(self.label_names)


@dataclasses.dataclass(frozen=True)
class Speech:
  index: int  # Position among all speeches of the text.
  speaker: str
  text: str  # The speech's lines, joined by newlines, without the speaker line.


def parse_speeches(play_text: str) -> list[Speech]:
  """Every speech with at least one line, in text order; a speaker line followed by a
  blank line (an interrupted speech) is skipped."""
  return [Speech(i, m['speaker'], m['speech']) for i, m in enumerate(_SPEECH.finditer(play_text))]


def top_speakers(speeches: list[Speech], num_speakers: int) -> tuple[str, ...]:
  """The `num_speakers` most frequent speakers, most frequent first (ties by name)."""
  counts = collections.Counter(s.speaker for s in speeches)
  if not 2 <= num_speakers <= len(counts):
    raise KilnError(f'config.dataset.num_speakers={num_speakers} must lie in [2, {len(counts)}] '
                    '(the speakers this text has)')
  ranked = sorted(counts, key=lambda name: (-counts[name], name))
  return tuple(ranked[:num_speakers])


def split_speeches(speeches: list[Speech], speakers: tuple[str, ...], holdout_fraction: float
                   ) -> tuple[list[Speech], list[Speech]]:
  """(train, held out), each in text order: per speaker, the last `holdout_fraction` of
  that speaker's speeches (at least one) is held out."""
  if not 0.0 < holdout_fraction < 1.0:
    raise KilnError(f'config.dataset.holdout_fraction={holdout_fraction} must lie in (0, 1)')
  train, held_out = [], []
  for speaker in speakers:
    own = [s for s in speeches if s.speaker == speaker]
    num_held_out = max(1, int(round(len(own) * holdout_fraction)))
    if num_held_out >= len(own):
      raise KilnError(f"speaker '{speaker}' has {len(own)} speeches, too few to hold out "
                      f'{holdout_fraction:.0%}: lower config.dataset.num_speakers or '
                      'config.dataset.holdout_fraction')
    train += own[:-num_held_out]
    held_out += own[-num_held_out:]
  by_position = operator.attrgetter('index')
  return sorted(train, key=by_position), sorted(held_out, key=by_position)


def encode_examples(texts: list[str], tokenizer: Tokenizer, seq_len: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32[N, seq_len], token_mask float32[N, seq_len]): [CLS], the text cut to
  seq_len - 1 tokens, then padding."""
  tokens = np.full((len(texts), seq_len), tokenizer.pad_id, np.int32)
  token_mask = np.zeros((len(texts), seq_len), np.float32)
  tokens[:, 0], token_mask[:, 0] = tokenizer.cls_id, 1.0
  for row, example_text in enumerate(texts):
    ids = tokenizer.encode(example_text)[:seq_len - 1]
    tokens[row, 1:1 + len(ids)] = ids
    token_mask[row, 1:1 + len(ids)] = 1.0
  return tokens, token_mask


def _host_split(tokens, token_mask, labels, indices, process_index, process_count) -> HostSplit:
  examples = tf.data.Dataset.from_tensor_slices({
      'tokens': tokens, 'token_mask': token_mask, 'label': np.asarray(labels, np.int32),
      'index': np.asarray(indices, np.int32)})
  return HostSplit(examples, len(labels), len(labels), process_index, process_count, sliced=True)


def _check_seq_len(seq_len: int) -> None:
  if seq_len < 2:
    raise KilnError(f'config.dataset.seq_len={seq_len} must be at least 2 ([CLS] and a token)')


def _local_source(dataset_config, process_index, process_count) -> LabeledTextSource:
  # read_text with the pretraining run's holdout_fraction gives the text load_text fitted
  # the language model's tokenizer to; the two parts together are the whole file.
  tokenizer_view = dataset_config.copy_and_resolve_references()
  tokenizer_view.holdout_fraction = dataset_config.pretrain_holdout_fraction
  pretrain_text, rest = text.read_text(tokenizer_view)
  tokenizer = build_tokenizer(dataset_config, pretrain_text)
  speeches = parse_speeches(pretrain_text + rest)
  if not speeches:
    raise KilnError('the text has no speeches ("NAME:" lines followed by text): point '
                    'config.dataset.text_file at a play in the tiny Shakespeare layout')
  speakers = top_speakers(speeches, dataset_config.num_speakers)
  train, held_out = split_speeches(speeches, speakers, dataset_config.holdout_fraction)
  label_of = {name: label for label, name in enumerate(speakers)}

  def host_split(part):
    tokens, token_mask = encode_examples([s.text for s in part], tokenizer,
                                         dataset_config.seq_len)
    return _host_split(tokens, token_mask, [label_of[s.speaker] for s in part],
                       [s.index for s in part], process_index, process_count)

  return LabeledTextSource(
      train=host_split(train), eval=host_split(held_out), tokenizer=tokenizer,
      seq_len=dataset_config.seq_len, label_names=speakers,
      train_label_counts=np.bincount([label_of[s.speaker] for s in train],
                                     minlength=len(speakers)))


def _read_tfds_split(builder, text_feature: str, split: str) -> tuple[list[str], np.ndarray]:
  sources.check_tfds_split(builder, split)
  with sources.tfds_prepared(builder):
    pairs = builder.as_dataset(split=split, shuffle_files=False).map(
        lambda example: (example[text_feature], example[TFDS_LABEL_FEATURE]),
        num_parallel_calls=tf.data.AUTOTUNE)
    texts, labels = [], []
    for example_text, label in pairs.as_numpy_iterator():
      texts.append(example_text.decode('utf-8'))
      labels.append(label)
  labels = np.asarray(labels, np.int32)
  if labels.size and labels.min() < 0:
    raise KilnError(f"split '{split}' of TFDS dataset '{builder.name}' is unlabelled (label "
                    '-1): set config.dataset.train_split / eval_split to labelled splits')
  return texts, labels


def _tfds_source(dataset_config, process_index, process_count) -> LabeledTextSource:
  import tensorflow_datasets as tfds
  builder = sources.tfds_builder(dataset_config)
  features = builder.info.features
  text_feature = next((f for f in TFDS_TEXT_FEATURES if f in features), None)
  label = features[TFDS_LABEL_FEATURE] if TFDS_LABEL_FEATURE in features else None
  if text_feature is None or not isinstance(label, tfds.features.ClassLabel):
    raise KilnError(f"TFDS dataset '{builder.name}' lacks a 'text' or 'sentence' feature and "
                    "a class 'label': pick a text classification dataset (e.g. tfds:glue/sst2, "
                    'tfds:imdb_reviews) in config.dataset.name')
  train_texts, train_labels = _read_tfds_split(builder, text_feature,
                                               dataset_config.train_split)
  eval_texts, eval_labels = _read_tfds_split(builder, text_feature, dataset_config.eval_split)
  # The text a language model on this dataset's train split would have been fitted to.
  tokenizer = build_tokenizer(dataset_config, text.DOCUMENT_SEPARATOR.join(train_texts))

  def host_split(texts, labels):
    tokens, token_mask = encode_examples(texts, tokenizer, dataset_config.seq_len)
    return _host_split(tokens, token_mask, labels, np.arange(len(labels)), process_index,
                       process_count)

  return LabeledTextSource(
      train=host_split(train_texts, train_labels), eval=host_split(eval_texts, eval_labels),
      tokenizer=tokenizer, seq_len=dataset_config.seq_len, label_names=tuple(label.names),
      train_label_counts=np.bincount(train_labels, minlength=label.num_classes))


def load_labeled_text(dataset_config, process_index: int, process_count: int
                      ) -> LabeledTextSource:
  """This host's view of the labelled text dataset that `dataset_config.name` names."""
  text.check_text_dataset_name(dataset_config.name)
  check_tokenizer_name(dataset_config.tokenizer)
  _check_seq_len(dataset_config.seq_len)
  if dataset_config.name.startswith(TFDS_PREFIX):
    source = _tfds_source(dataset_config, process_index, process_count)
  else:
    source = _local_source(dataset_config, process_index, process_count)
  if source.train.num_examples == 0 or source.eval.num_examples == 0:
    raise KilnError(f'the train or eval split of {dataset_config.name} is empty: set '
                    'config.dataset.train_split / eval_split to splits with examples')
  return source
