"""Text for language models: tokenizers, the nanoGPT split, exact eval windows, TFDS path."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from core.errors import KilnError
from input_pipeline import batching, sources, text, tokenizers
from configs import language

SHAKESPEARE = sources.shared_datasets_dir() / 'tinyshakespeare' / 'input.txt'


def _text_config(**overrides):
  config = language.get_language_config().dataset
  config.holdout_fraction = 0.1
  config.seq_len = 64
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope='module')
def shakespeare():
  return SHAKESPEARE.read_text(encoding='utf-8')


def test_char_tokenizer_matches_nanogpt(shakespeare):
  tokenizer = tokenizers.CharTokenizer.from_text(shakespeare)
  stoi = {ch: i for i, ch in enumerate(sorted(set(shakespeare)))}  # nanoGPT's vocabulary.
  assert len(stoi) == 65 and tokenizer.vocab_size == 65 + len(tokenizers.SPECIAL_TOKENS)
  ids = tokenizer.encode(shakespeare[:5000])
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, [stoi[ch] for ch in shakespeare[:5000]])
  assert tokenizer.decode(ids) == shakespeare[:5000]
  assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.mask_id) == (65, 66, 67)
  # Unseen characters encode as unk instead of crashing, and show as U+FFFD.
  ids = tokenizer.encode('a☃b')
  assert ids[1] == tokenizer.unk_id and tokenizer.decode(ids) == 'a\ufffdb'
  assert tokenizer.decode([stoi['a'], tokenizer.pad_id, tokenizer.mask_id]) == 'a[MASK]'
  with pytest.raises(KilnError, match='outside the vocabulary'):
    tokenizer.decode([tokenizer.vocab_size])


def test_byte_tokenizer_round_trips_any_text():
  tokenizer = tokenizers.ByteTokenizer()
  sample = 'naïve café — 東京 🙂\n'
  ids = tokenizer.encode(sample)
  assert ids.dtype == np.int32 and len(ids) == len(sample.encode('utf-8'))
  assert ids.max() < 256 and tokenizer.vocab_size == 261 and tokenizer.pad_id == 256
  assert tokenizer.decode(ids) == sample
  assert tokenizer.decode(np.concatenate([ids, [tokenizer.pad_id] * 3])) == sample


def test_sentencepiece_is_deterministic_and_round_trips(shakespeare):
  train, held_out = shakespeare[:200_000], shakespeare[-5_000:]
  first = tokenizers.SentencePieceTokenizer.train(train, vocab_size=300)
  second = tokenizers.SentencePieceTokenizer.train(train, vocab_size=300)
  assert first.vocab_size == 300 and first.model_proto == second.model_proto
  ids = first.encode(held_out)
  np.testing.assert_array_equal(ids, second.encode(held_out))
  assert ids.dtype == np.int32 and ids.max() < 300
  assert len(ids) < 0.75 * len(held_out)  # Subword pieces, not characters.
  assert first.decode(ids) == held_out
  assert (first.pad_id, first.unk_id, first.mask_id, first.cls_id, first.sep_id) == (0, 1, 2, 3, 4)
  assert first.unk_id in first.encode('☃') and first.decode(first.encode('a☃')) == 'a\ufffd'
  rebuilt = tokenizers.SentencePieceTokenizer(first.model_proto)
  np.testing.assert_array_equal(rebuilt.encode(held_out), ids)
  with pytest.raises(KilnError, match='vocab_size'):
    tokenizers.SentencePieceTokenizer.train(train, vocab_size=20)  # Fewer than the characters.


def test_split_is_the_last_tenth(shakespeare):
  source = text.load_text(_text_config(), 0, 1)
  train_text, eval_text = text.read_text(_text_config())
  num_train = int(0.9 * len(shakespeare))  # nanoGPT's split.
  assert (train_text, eval_text) == (shakespeare[:num_train], shakespeare[num_train:])
  assert len(eval_text) == 111_540
  assert source.tokenizer.vocab_size == 65 + len(tokenizers.SPECIAL_TOKENS)


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_windows_predict_every_held_out_token_once(process_count):
  config = _text_config()
  eval_text = text.read_text(config)[1]
  host_batch = 24 // process_count  # 1743 eval windows: the last batch is padded.
  windows, mask_total, batch_counts = {}, 0.0, set()
  for process_index in range(process_count):
    source = text.load_text(config, process_index, process_count)
    batches = list(batching.eval_batches(source.eval, host_batch))
    batch_counts.add(len(batches))
    for batch in batches:
      assert batch['tokens'].shape == (host_batch, 65) and batch['tokens'].dtype == np.int32
      assert batch['token_mask'].shape == (host_batch, 64)
      mask_total += batch['token_mask'].sum()
      assert np.all(batch['token_mask'][batch['mask'] == 0] == 0)
      for row in np.flatnonzero(batch['mask']):
        windows[int(batch['index'][row])] = (batch['tokens'][row], batch['token_mask'][row])
  assert len(batch_counts) == 1 and mask_total == len(eval_text) - 1
  assert sorted(windows) == list(range(source.eval.num_examples))
  pad_id = source.tokenizer.pad_id
  targets = []
  for index in sorted(windows):
    tokens, token_mask = windows[index]
    real = tokens[1:][token_mask > 0]
    assert np.all(tokens[1:][token_mask == 0] == pad_id)
    targets.append(real)
  assert source.tokenizer.decode(np.concatenate(targets)) == eval_text[1:]


def test_train_windows_with_a_stride_are_shifted_slices():
  config = _text_config(seq_len=16, window_stride=5)
  source = text.load_text(config, 0, 1)
  train_text = text.read_text(config)[0]
  assert source.train.num_examples == (len(train_text) - 17) // 5 + 1
  batch = next(batching.train_batches(source.train, 32, seed=0, shuffle_buffer=1000))
  assert sorted(batch) == ['index', 'token_mask', 'tokens']
  assert np.all(batch['token_mask'] == 1.0) and batch['token_mask'].shape == (32, 16)
  for tokens, index in zip(batch['tokens'], batch['index']):
    start = 5 * int(index)
    inputs, targets = tokens[:-1], tokens[1:]
    assert source.tokenizer.decode(inputs) == train_text[start:start + 16]
    assert source.tokenizer.decode(targets) == train_text[start + 1:start + 17]


def test_default_stride_predicts_every_training_token_once():
  source = text.load_text(_text_config(tokenizer='byte', seq_len=32), 0, 1)
  windows = next(source.train.examples.batch(source.train.num_examples).as_numpy_iterator())
  np.testing.assert_array_equal(windows['index'], np.arange(source.train.num_examples))
  tokens = windows['tokens']
  np.testing.assert_array_equal(tokens[:-1, -1], tokens[1:, 0])  # One shared boundary token.
  stream = np.concatenate([tokens[0, :1], tokens[:, 1:].reshape(-1)])
  train_text = text.read_text(_text_config())[0]
  np.testing.assert_array_equal(stream, source.tokenizer.encode(train_text)[:len(stream)])
  assert len(train_text.encode('utf-8')) - len(stream) < 32  # Only a short tail is left out.


def test_hosts_get_their_rows_of_the_same_training_batches():
  config = _text_config(seq_len=8)
  single = batching.train_batches(text.load_text(config, 0, 1).train, 16, seed=1,
                                  shuffle_buffer=500)
  hosts = [batching.train_batches(text.load_text(config, i, 2).train, 8, seed=1,
                                  shuffle_buffer=500) for i in range(2)]
  for _ in range(3):
    rows = [next(host)['tokens'] for host in hosts]
    np.testing.assert_array_equal(np.concatenate(rows), next(single)['tokens'])


def test_text_file_source_and_sentencepiece(tmp_path, shakespeare):
  path = tmp_path / 'corpus.txt'
  path.write_text(shakespeare[:60_000], encoding='utf-8')
  config = _text_config(name='text_file', text_file=str(path), tokenizer='sentencepiece',
                        vocab_size=200, seq_len=32)
  source = text.load_text(config, 0, 1)
  assert source.tokenizer.vocab_size == 200 and source.seq_len == 32
  eval_text = shakespeare[int(0.9 * 60_000):60_000]
  eval_tokens = source.tokenizer.encode(eval_text)
  masks = [b['token_mask'].sum() for b in batching.eval_batches(source.eval, 8)]
  assert sum(masks) == len(eval_tokens) - 1


def test_bad_text_configs_are_clear_errors(tmp_path, monkeypatch):
  with pytest.raises(KilnError, match=r"'.*absent\.txt' not found.*text_file"):
    text.load_text(_text_config(name='text_file', text_file=str(tmp_path / 'absent.txt')), 0, 1)
  with pytest.raises(KilnError, match='set config.dataset.text_file'):
    text.load_text(_text_config(name='text_file'), 0, 1)
  monkeypatch.setenv('KILN_DATASETS', str(tmp_path))
  with pytest.raises(KilnError, match=r'tinyshakespeare/input\.txt. not found'):
    text.load_text(_text_config(), 0, 1)
  with pytest.raises(KilnError, match="unknown tokenizer 'words'.*char, byte, sentencepiece"):
    text.load_text(_text_config(tokenizer='words'), 0, 1)
  with pytest.raises(KilnError, match="unknown text dataset 'shakespeare'"):
    text.load_text(_text_config(name='shakespeare'), 0, 1)
  with pytest.raises(KilnError, match='seq_len'):
    path = tmp_path / 'short.txt'
    path.write_text('to be or not to be', encoding='utf-8')
    text.load_text(_text_config(name='text_file', text_file=str(path)), 0, 1)


@pytest.mark.parametrize('name', ['tfds:tiny_shakespeare', 'tfds:lm1b'])
def test_tfds_text_under_mock_data(name):
  config = _text_config(name=name, seq_len=16)
  with tfds.testing.mock_data(num_examples=40):
    train_text, eval_text = text.read_text(config)
    hosts = [text.load_text(config, process_index, 2) for process_index in range(2)]
  assert train_text.count('\n') == 39  # 40 documents, newline-separated.
  vocab = sorted(set(train_text))
  tokenizer = hosts[1].tokenizer
  assert tokenizer.vocab_size == len(vocab) + len(tokenizers.SPECIAL_TOKENS)
  batch = next(batching.train_batches(hosts[1].train, 4, seed=0, shuffle_buffer=100))
  assert batch['tokens'].shape == (4, 17) and batch['tokens'].dtype == np.int32
  assert batch['tokens'].max() < len(vocab)  # Training text has no unk and no padding.
  mask_total = sum(batch['token_mask'].sum() for host in hosts
                   for batch in batching.eval_batches(host.eval, 4))
  assert mask_total == len(tokenizer.encode(eval_text)) - 1
