"""Language-modelling tasks on real tiny Shakespeare: GPT and BERT through the loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import generate
import train
from core.errors import KilnError
from loop.experiment import build_experiment
from input_pipeline import text
from tasks.language import MASK_FRACTION
from tests.tiny import tiny_bert_config, tiny_config, tiny_gpt_config


@pytest.fixture(scope='module')
def gpt_workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('gpt'))


@pytest.fixture(scope='module')
def gpt_run(gpt_workdir, devices):
  return train.train_and_evaluate(tiny_gpt_config(), gpt_workdir)


@pytest.mark.slow  # A whole GPT run (gpt_run).
def test_gpt_learns_shakespeare(gpt_run):
  final = gpt_run['final_eval']
  assert final['loss'] < 3.05  # Guessing from character frequencies costs 3.31 nats.
  assert final['perplexity'] == pytest.approx(math.exp(final['loss']), rel=1e-5)
  # Char tokens: bits per character is nats per token in base 2.
  assert final['bits_per_char'] == pytest.approx(final['loss'] / math.log(2), rel=1e-5)
  assert gpt_run['mfu'] > 0 and gpt_run['train_step_flops'] > 0


@pytest.mark.slow  # Needs the GPT run above.
def test_generate_continues_the_prompt_from_the_checkpoint(gpt_run, gpt_workdir):
  def run(**kwargs):
    args = dict(prompt='ROMEO:', num_tokens=24, temperature=0.8, top_k=10, top_p=1.0, seed=0,
                num_samples=2)
    return generate.generate(tiny_gpt_config(), gpt_workdir, **{**args, **kwargs})
  samples = run()
  assert all(s.startswith('ROMEO:') and len(s) == len('ROMEO:') + 24 for s in samples)
  assert samples == run()  # Same seed, same text.
  assert run(seed=1) != samples
  greedy = run(temperature=0.0)
  assert greedy[0] == greedy[1]
  with pytest.raises(KilnError, match='does not model text'):
    generate.generate(tiny_config(), gpt_workdir, 'x', 1, 0.0, 0, 1.0, 0)


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_eval_counts_every_held_out_target_once(devices):
  exp = build_experiment(tiny_gpt_config(), devices)
  state, shardings = exp.create_state()
  eval_step = exp.eval_step(shardings)
  total = exp.evaluate(eval_step, state)
  _, held_out = text.read_text(exp.config.dataset)
  assert int(total.loss.count) == len(held_out) - 1  # Every character after the first.


def test_bert_masking_follows_80_10_10(devices):
  exp = build_experiment(tiny_bert_config(), devices)
  task = exp.task
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 65, (64, 512)), jnp.int32)
  weights = jnp.ones(tokens.shape).at[:, 400:].set(0.0)  # Padding is never chosen.
  keys = jax.random.split(jax.random.key(0), 64)
  corrupted, chosen = jax.vmap(task.corrupt)(tokens, weights, keys)
  chosen = np.asarray(chosen) > 0
  assert not chosen[:, 400:].any()
  assert chosen[:, :400].mean() == pytest.approx(MASK_FRACTION, abs=0.01)
  corrupted, tokens = np.asarray(corrupted)[chosen], np.asarray(tokens)[chosen]
  masked = corrupted == task.tokenizer.mask_id
  kept = corrupted == tokens
  assert masked.mean() == pytest.approx(0.8, abs=0.02)
  # Random replacements sometimes draw the original token (1 in 65).
  assert kept.mean() == pytest.approx(0.1 + 0.1 / 65, abs=0.02)
  assert (~masked & ~kept).mean() == pytest.approx(0.1 * 64 / 65, abs=0.02)
  assert (np.asarray(corrupted)[~masked] < 65).all()


@pytest.mark.slow  # A whole BERT run.
def test_bert_learns_above_the_unigram_baseline(tmp_path, devices):
  summary = train.train_and_evaluate(tiny_bert_config(), str(tmp_path))
  final = summary['final_eval']
  assert 0.05 < final['unigram_accuracy'] < 0.25  # ' ' is the most frequent character.
  assert final['accuracy'] > final['unigram_accuracy'] + 0.02


@pytest.mark.slow  # Two BERT experiments built, compiled and evaluated in full.
def test_bert_eval_masks_do_not_depend_on_batching(devices):
  config = tiny_bert_config()
  results = []
  for eval_batch_size in (64, 128):
    config.eval_batch_size = eval_batch_size
    exp = build_experiment(config, devices)
    state, shardings = exp.create_state()
    eval_step = exp.eval_step(shardings)
    total = exp.evaluate(eval_step, state)
    results.append((float(total.loss.count), float(total.compute()['loss'])))
  assert results[0][0] == results[1][0]
  assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
