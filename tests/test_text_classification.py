"""Speaker classification on tiny Shakespeare, fine-tuned from a masked-LM checkpoint."""

import functools
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import train
from configs import bert_mlm_shakespeare
from loop import pretrained, training
from loop.checkpoint import Checkpointer
from core.errors import KilnError
from loop.experiment import build_experiment
from input_pipeline import batching, labeled_text, text
from core.paths import path_string
from tasks import create_task
from tests.tiny import tiny_bert_classify_config, tiny_bert_config

SNIPPET = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

TITUS:

COMINIUS:
Noble Marcius!
Nay, let them follow:
The Volsces have much corn.
"""


def _dataset_config(**overrides):
  config = tiny_bert_classify_config().dataset
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope='module')
def speeches():
  return labeled_text.parse_speeches(text.text_file_path(_dataset_config()).read_text('utf-8'))


@pytest.fixture(scope='module')
def source():
  return labeled_text.load_labeled_text(_dataset_config(), 0, 1)


def _all_examples(split):
  return next(split.examples.batch(split.num_examples).as_numpy_iterator())


def test_speeches_of_a_hand_checked_snippet(speeches):
  parsed = labeled_text.parse_speeches(SNIPPET)
  # TITUS is interrupted (no lines); a line ending in ':' inside a speech names no speaker.
  assert [(s.index, s.speaker, s.text) for s in parsed] == [
      (0, 'First Citizen', 'Before we proceed any further, hear me speak.'),
      (1, 'All', 'Speak, speak.'),
      (2, 'COMINIUS', 'Noble Marcius!\nNay, let them follow:\nThe Volsces have much corn.')]
  assert len(speeches) == 7097
  assert (speeches[0].speaker, speeches[0].text) == (
      'First Citizen', 'Before we proceed any further, hear me speak.')
  assert (speeches[-1].speaker, speeches[-1].text.splitlines()[0]) == (
      'ANTONIO', 'Noble Sebastian,')


def test_speaker_examples_use_the_masked_lm_tokens(source, speeches):
  assert source.label_names == ('GLOUCESTER', 'DUKE VINCENTIO', 'MENENIUS', 'ROMEO')
  # The char tokenizer of the masked-LM config's run, so pretrained embeddings line up.
  mlm_tokenizer = text.load_text(bert_mlm_shakespeare.get_config().dataset, 0, 1).tokenizer
  assert source.tokenizer.chars == mlm_tokenizer.chars
  tokenizer, examples = source.tokenizer, _all_examples(source.train)
  assert examples['tokens'].shape == (source.train.num_examples, 64)
  assert examples['tokens'].dtype == np.int32 and examples['token_mask'].dtype == np.float32
  assert np.all(examples['tokens'][:, 0] == tokenizer.cls_id)
  assert np.all(examples['tokens'][examples['token_mask'] == 0] == tokenizer.pad_id)
  first_gloucester = int(np.flatnonzero(examples['label'] == 0)[0])
  assert examples['index'][first_gloucester] == 1100
  assert tokenizer.decode(examples['tokens'][first_gloucester]) == (
      '[CLS]Now is the winter of our discontent\nMade glorious summer by thi')  # 63 characters.
  for tokens, token_mask, label, index in zip(*(examples[k][::25] for k in (
      'tokens', 'token_mask', 'label', 'index'))):
    speech = speeches[index]
    assert speech.speaker == source.label_names[label]
    assert tokenizer.decode(tokens[token_mask > 0]) == '[CLS]' + speech.text[:63]
    np.testing.assert_array_equal(tokens[1:int(token_mask.sum())],
                                  mlm_tokenizer.encode(speech.text[:63]))


def test_each_speakers_last_speeches_are_held_out(source, speeches):
  train, held_out = _all_examples(source.train), _all_examples(source.eval)
  assert not set(train['index']) & set(held_out['index'])
  counts = {'GLOUCESTER': 211, 'DUKE VINCENTIO': 189, 'MENENIUS': 161, 'ROMEO': 160}
  for label, name in enumerate(source.label_names):
    own = [s.index for s in speeches if s.speaker == name]
    assert len(own) == counts[name]
    num_held_out = round(0.2 * len(own))  # holdout_fraction of the tiny config.
    assert sorted(held_out['index'][held_out['label'] == label]) == own[-num_held_out:]
    assert sorted(train['index'][train['label'] == label]) == own[:-num_held_out]
    assert source.train_label_counts[label] == len(own) - num_held_out
  assert source.train.num_examples + source.eval.num_examples == sum(counts.values())


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_counts_every_held_out_speech_once(source, process_count):
  host_batch = 20 // process_count  # 144 held-out speeches: the last batch is padded.
  seen, batch_counts = [], set()
  for process_index in range(process_count):
    host = labeled_text.load_labeled_text(_dataset_config(), process_index, process_count)
    batches = list(batching.eval_batches(host.eval, host_batch))
    batch_counts.add(len(batches))
    for batch in batches:
      assert batch['label'].min() >= 0 and batch['label'].max() < 4
      seen += batch['index'][batch['mask'] > 0].tolist()
  assert len(batch_counts) == 1
  assert sorted(seen) == sorted(_all_examples(source.eval)['index'].tolist())


def test_bad_classification_configs_are_clear_errors():
  with pytest.raises(KilnError, match=r'num_speakers=1 must lie in \[2, '):
    labeled_text.load_labeled_text(_dataset_config(num_speakers=1), 0, 1)
  with pytest.raises(KilnError, match='too few to hold out'):
    labeled_text.load_labeled_text(_dataset_config(holdout_fraction=0.999), 0, 1)
  config = tiny_bert_classify_config()
  config.model.num_classes = 8
  with pytest.raises(KilnError, match='num_classes=8 but the data has 4 classes'):
    create_task(config).load_data(0, 1)
  config = tiny_bert_classify_config()
  config.model.name = 'gpt'
  with pytest.raises(KilnError, match="'gpt' has no classification head: use one of bert"):
    create_task(config).load_data(0, 1)


@pytest.mark.parametrize('name,text_feature,eval_split', [
    ('tfds:glue/sst2', 'sentence', 'validation'), ('tfds:imdb_reviews', 'text', 'test')])
def test_tfds_text_classification_under_mock_data(name, text_feature, eval_split):
  config = _dataset_config(name=name, eval_split=eval_split, seq_len=24)
  with tfds.testing.mock_data(num_examples=30):
    hosts = [labeled_text.load_labeled_text(config, i, 2) for i in range(2)]
    raw = list(tfds.builder(name[len('tfds:'):]).as_dataset(
        split=eval_split, shuffle_files=False).as_numpy_iterator())
  source = hosts[0]
  assert source.num_classes == 2 and len(source.label_names) == 2
  assert source.train.num_examples == source.eval.num_examples == len(raw) == 30
  examples = _all_examples(source.eval)
  for i in examples['index']:
    example_text = raw[i][text_feature].decode('utf-8')
    assert examples['label'][i] == raw[i]['label']
    assert source.tokenizer.decode(examples['tokens'][i]) == '[CLS]' + example_text[:23]
  seen = [i for host in hosts for batch in batching.eval_batches(host.eval, 4)
          for i in batch['index'][batch['mask'] > 0]]
  assert sorted(seen) == list(range(30))
  with tfds.testing.mock_data(num_examples=5):
    with pytest.raises(KilnError, match="lacks a 'text' or 'sentence' feature"):
      labeled_text.load_labeled_text(_dataset_config(name='tfds:mnist'), 0, 1)


@pytest.fixture(scope='module')
def mlm_workdir(tmp_path_factory, devices):
  """A masked-LM run's checkpoint, written from an FSDP layout, with other init values."""
  config = tiny_bert_config()
  config.seed = 7  # Seed 0 would give the classifier's encoder the very same init.
  config.mesh.fsdp = 4
  exp = build_experiment(config, devices)
  state, _ = exp.create_state()
  workdir = tmp_path_factory.mktemp('mlm')
  checkpointer = Checkpointer(str(workdir), keep=1)
  checkpointer.save(5, state, {})
  checkpointer.close()
  return str(workdir)


@pytest.fixture(scope='module')
def classifier(devices):
  """(experiment, fresh state, shardings, host copy of its params): a 2-speaker classifier
  whose parameters are sharded (FSDP) unlike the checkpoint's."""
  config = tiny_bert_classify_config()
  config.dataset.num_speakers = 2
  config.mesh.fsdp = 2
  exp = build_experiment(config, devices)
  state, shardings = exp.create_state()
  return exp, state, shardings, jax.device_get(state.params)


def _by_path(tree):
  return {path_string(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_merge_takes_matching_leaves_and_keeps_the_head(mlm_workdir, classifier, tmp_path):
  step, source = pretrained.read_params(mlm_workdir)
  assert step == 5 and all(isinstance(x, np.ndarray) for x in jax.tree.leaves(source))
  params = classifier[3]
  merged, loaded, kept = pretrained.merge_params(params, source)
  assert kept == ('classifier/bias', 'classifier/kernel')
  assert 'encoder/blocks/0/attn/qkv' in loaded and 'mlm_dense/kernel' in loaded
  assert merged['classifier']['kernel'] is params['classifier']['kernel']
  # A prefix moves a subtree: here the encoder alone, found under another name.
  merged, loaded, kept = pretrained.merge_params(
      params, {'transformer': source['encoder']}, ('transformer',), ('encoder',))
  assert all(path.startswith('encoder/') for path in loaded)
  assert 'mlm_dense/kernel' in kept and 'classifier/kernel' in kept
  np.testing.assert_array_equal(merged['encoder']['token_embed'], source['encoder']['token_embed'])
  with pytest.raises(KilnError, match="no parameter of this model matches the checkpoint under"):
    pretrained.merge_params(params, source, ('decoder',))
  source['encoder']['token_embed'] = source['encoder']['token_embed'][:-1]  # Another tokenizer.
  with pytest.raises(KilnError, match=r"'encoder/token_embed' has shape \(69, 64\) but "
                                     r"'encoder/token_embed' has \(70, 64\)"):
    pretrained.merge_params(params, source)
  assert pretrained.newest_step(mlm_workdir) == 5
  assert pretrained.newest_step(os.path.join(mlm_workdir, 'checkpoints')) == 5
  for empty in (tmp_path, tmp_path / 'absent'):
    with pytest.raises(KilnError, match=r"no checkpoint found in '.*': set config.init"):
      pretrained.load_pretrained(params, str(empty))


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_pmap_and_ema_start_from_the_checkpoint(mlm_workdir, devices):
  config = tiny_bert_classify_config()
  config.parallel.strategy = 'pmap'
  config.ema.decay = 0.9
  exp = build_experiment(config, devices)
  state, shardings = exp.create_state()
  head = np.asarray(state.params['classifier']['kernel'])
  state = training._start_from_pretrained(exp, state, shardings, mlm_workdir)
  qkv = pretrained.read_params(mlm_workdir)[1]['encoder']['blocks']['1']['attn']['qkv']
  for params in (state.params, state.ema_params):  # One copy per device.
    np.testing.assert_array_equal(np.asarray(params['encoder']['blocks'][1]['attn']['qkv']),
                                  np.broadcast_to(qkv, (8, *qkv.shape)))
    np.testing.assert_array_equal(np.asarray(params['classifier']['kernel']), head)


@pytest.mark.slow  # A whole fine-tuning run.
def test_fine_tuned_classifier_learns_the_speakers(mlm_workdir, classifier):
  exp, state, shardings, init = classifier
  source = pretrained.read_params(mlm_workdir)[1]
  assert not np.array_equal(init['encoder']['token_embed'], source['encoder']['token_embed'])
  state = training._start_from_pretrained(exp, state, shardings, mlm_workdir)
  tuned, source, init = (_by_path(tree) for tree in (jax.device_get(state.params), source, init))
  assert sorted(source) == sorted(k for k in tuned if not k.startswith('classifier/'))
  for path, value in tuned.items():
    np.testing.assert_array_equal(value, init[path] if path.startswith('classifier/')
                                  else source[path])
  assert state.params['encoder']['token_embed'].sharding == shardings.params['encoder'][
      'token_embed']

  train_step, eval_step = exp.train_step(shardings), exp.eval_step(shardings)
  batches = exp.task.train_batches(exp.host_batch, start_step=0)
  step_metrics = []
  for _ in range(exp.num_steps):
    state, batch_metrics, _ = train_step(state, exp.strategy.place(next(batches)))
    # One step in flight at a time: under load, a deep queue of 8-device steps can starve
    # one device's thread past XLA:CPU's 40 s collective timeout.
    step_metrics.append(jax.device_get(batch_metrics))
  first, last = (functools.reduce(lambda a, b: a.merge(b), part).compute()
                 for part in (step_metrics[:20], step_metrics[-20:]))
  assert last['loss'] < first['loss'] - 0.1
  assert last['accuracy'] > first['majority_accuracy'] + 0.1  # Learns the training speeches.
  total = exp.evaluate(eval_step, state)
  assert int(total.accuracy.count) == exp.task.source.eval.num_examples == 80
  # GLOUCESTER's share of the held-out speeches, counted with the padded batch masked out.
  assert float(total.compute()['majority_accuracy']) == pytest.approx(42 / 80)
