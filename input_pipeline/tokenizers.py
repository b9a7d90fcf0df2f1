"""Text <-> token ids: characters of the training text, UTF-8 bytes, or SentencePiece.

Every tokenizer has the same five special tokens, always in this order: pad, unk, mask,
cls, sep. Char and byte tokenizers put them after their base vocabulary (so char ids equal
nanoGPT's `stoi`, the sorted characters, and byte ids equal byte values); SentencePiece
gives them ids 0-4. Encoding never fails: characters outside the vocabulary become
`unk_id`. `decode` is for people: pad is dropped, unk shows as U+FFFD and mask / cls / sep
as [MASK] / [CLS] / [SEP].
"""

import abc
import io
from collections.abc import Sequence

import numpy as np

from core.errors import KilnError

TOKENIZERS = ('char', 'byte', 'sentencepiece')
SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[MASK]', '[CLS]', '[SEP]')
UNKNOWN_TEXT = '\ufffd'
SENTENCEPIECE_SEED = 0
# Long enough for any sentence of lm1b; longer lines are cut, as SentencePiece skips them.
SENTENCEPIECE_MAX_SENTENCE_CHARS = 2048
# lm1b has 30M sentences: training on an evenly spaced sample of at most this many bounds
# time and memory, and needs no shuffle seed to stay identical on every host.
SENTENCEPIECE_MAX_SENTENCES = 1_000_000


class Tokenizer(abc.ABC):
  """Special ids: `pad_id` fills windows past the end of the text; `unk_id` stands for text
  outside the vocabulary; `mask_id`, `cls_id`, `sep_id` are BERT's [MASK], [CLS], [SEP]."""

  def __init__(self, vocab_size: int, first_special_id: int):
    self.vocab_size = vocab_size  # Every id is in [0, vocab_size), specials included.
    self.pad_id, self.unk_id, self.mask_id, self.cls_id, self.sep_id = (
        range(first_special_id, first_special_id + len(SPECIAL_TOKENS)))
    self._special_text = {self.pad_id: '', self.unk_id: UNKNOWN_TEXT, self.mask_id: '[MASK]',
                          self.cls_id: '[CLS]', self.sep_id: '[SEP]'}

  @abc.abstractmethod
  def encode(self, text: str) -> np.ndarray:
    """int32 ids of `text`; never raises on unfamiliar characters (they become unk_id)."""

  @abc.abstractmethod
  def _decode_ordinary(self, ids: list[int]) -> str:
    """Text of a run of ids that holds no special id."""

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, np.int64).reshape(-1)
    outside = ids[(ids < 0) | (ids >= self.vocab_size)]
    if outside.size:
      raise KilnError(f'token id {int(outside[0])} is outside the vocabulary of '
                      f'{self.vocab_size}: decode only ids this tokenizer produced')
    pieces, run = [], []
    for token_id in ids.tolist():
      if token_id in self._special_text:
        pieces += [self._decode_ordinary(run), self._special_text[token_id]]
        run = []
      else:
        run.append(token_id)
    return ''.join(pieces + [self._decode_ordinary(run)])


class CharTokenizer(Tokenizer):
  """One id per distinct character of the training text, in sorted order."""

  def __init__(self, chars: str):
    if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
      raise KilnError('CharTokenizer needs sorted distinct characters: build it with '
                      'CharTokenizer.from_text(training_text)')
    super().__init__(len(chars) + len(SPECIAL_TOKENS), first_special_id=len(chars))
    self.chars = chars  # The vocabulary without specials; id i is chars[i].
    self._codepoints = np.array([ord(ch) for ch in chars], np.uint32)

  @classmethod
  def from_text(cls, text: str) -> 'CharTokenizer':
    if not text:
      raise KilnError('the training text is empty: point config.dataset at a non-empty text')
    return cls(''.join(sorted(set(text))))

  def encode(self, text):
    codepoints = np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), '<u4')
    ids = np.searchsorted(self._codepoints, codepoints)
    known = self._codepoints[np.minimum(ids, len(self.chars) - 1)] == codepoints
    return np.where(known, ids, self.unk_id).astype(np.int32)

  def _decode_ordinary(self, ids):
    return ''.join(self.chars[i] for i in ids)


class ByteTokenizer(Tokenizer):
  """Ids 0-255 are the UTF-8 bytes of the text, so any text encodes without unk."""

  def __init__(self):
    super().__init__(256 + len(SPECIAL_TOKENS), first_special_id=256)

  def encode(self, text):
    return np.frombuffer(text.encode('utf-8', 'surrogatepass'), np.uint8).astype(np.int32)

  def _decode_ordinary(self, ids):
    return bytes(ids).decode('utf-8', errors='replace')


class SentencePieceTokenizer(Tokenizer):
  """Unigram SentencePiece over the raw text: no normalization and no dummy prefix, and a
  newline is a piece of its own, so decode(encode(text)) == text for in-vocabulary text."""

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm
    self.model_proto = model_proto  # Serialized model; SentencePieceTokenizer(it) rebuilds this.
    self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
    super().__init__(self._processor.get_piece_size(), first_special_id=0)
    layout = [self._processor.pad_id(), self._processor.unk_id()] + [
        self._processor.piece_to_id(piece) for piece in SPECIAL_TOKENS[2:]]
    if layout != list(range(len(SPECIAL_TOKENS))):
      raise KilnError('this SentencePiece model lacks ids 0-4 for '
                      f"{', '.join(SPECIAL_TOKENS)}: train it with SentencePieceTokenizer.train")

  @classmethod
  def train(cls, text: str, vocab_size: int) -> 'SentencePieceTokenizer':
    """Trains on `text`; the same text and size give the same model on every host."""
    import sentencepiece as spm
    lines = [line[start:start + SENTENCEPIECE_MAX_SENTENCE_CHARS]
             for line in text.split('\n')
             for start in range(0, len(line), SENTENCEPIECE_MAX_SENTENCE_CHARS)]
    if not lines:
      raise KilnError('the training text is empty: point config.dataset at a non-empty text')
    lines = lines[::-(-len(lines) // SENTENCEPIECE_MAX_SENTENCES)]
    spm.set_random_generator_seed(SENTENCEPIECE_SEED)
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
          model_type='unigram', character_coverage=1.0, num_threads=1,
          normalization_rule_name='identity', remove_extra_whitespaces=False,
          add_dummy_prefix=False, shuffle_input_sentence=False,
          max_sentence_length=4 * SENTENCEPIECE_MAX_SENTENCE_CHARS,  # Bytes, not characters.
          pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, unk_surface=UNKNOWN_TEXT,
          control_symbols=list(SPECIAL_TOKENS[2:]), user_defined_symbols=['\n'],
          minloglevel=2)
    except RuntimeError as e:  # SentencePiece reports a size it cannot reach this way.
      reason = str(e).strip().splitlines()[-1].split('] ', 1)[-1]  # Drop the C++ location.
      raise KilnError(f'SentencePiece cannot build {vocab_size} pieces from this text '
                      f'({reason}): change config.dataset.vocab_size') from e
    return cls(model.getvalue())

  def encode(self, text):
    return np.asarray(self._processor.encode(text), np.int32)

  def _decode_ordinary(self, ids):
    return self._processor.decode(ids)


def check_tokenizer_name(name: str) -> None:
  if name not in TOKENIZERS:
    raise KilnError(f"unknown tokenizer '{name}': set config.dataset.tokenizer to one of "
                    f"{', '.join(TOKENIZERS)}")


def build_tokenizer(dataset_config, train_text: str) -> Tokenizer:
  """The tokenizer named by `dataset_config.tokenizer`, fitted to the training text."""
  check_tokenizer_name(dataset_config.tokenizer)
  if dataset_config.tokenizer == 'char':
    return CharTokenizer.from_text(train_text)
  if dataset_config.tokenizer == 'byte':
    return ByteTokenizer()
  return SentencePieceTokenizer.train(train_text, dataset_config.vocab_size)
