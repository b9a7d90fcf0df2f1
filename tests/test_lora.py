"""LoRA (compress/lora.py): the adapter arithmetic against its formula, a frozen base without
optimizer state, merging, resume, and FSDP against one device."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from compress import lora as lora_lib
from core.errors import KilnError
from loop import trained
from loop.checkpoint import Checkpointer
from loop.experiment import build_experiment
from loop.training import train_and_evaluate
from tests.stepping import run_steps
from tests.tiny import tiny_bert_classify_config, tiny_config, tiny_gpt_config


def _settings(rank=2, targets='fc|qkv', trainable='', alpha=4.0, checkpoint_dir='base'):
  c = ml_collections.ConfigDict()
  c.lora = ml_collections.ConfigDict(
      {'rank': rank, 'alpha': alpha, 'targets': targets, 'trainable': trainable})
  c.init = ml_collections.ConfigDict({'checkpoint_dir': checkpoint_dir})
  c.ema = ml_collections.ConfigDict({'decay': 0.0})
  return c


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_linear_output_is_base_plus_scaled_low_rank_path():
  rng = np.random.default_rng(0)
  w, bias = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)
  params = {'fc': {'kernel': w, 'bias': bias}}
  layout = {'fc': {'kernel': (0, 1), 'bias': None}}
  lora = lora_lib.build(_settings(rank=2, alpha=4.0), _abstract(params), layout)
  assert set(lora.targets) == {'fc/kernel'}  # The bias matches 'fc' but never gets adapters.
  adapters = lora.init(params, jax.random.key(0))
  a = np.asarray(adapters['fc']['kernel']['a'])
  assert a.shape == (6, 2) and np.abs(a).max() <= 1 / math.sqrt(6)  # PEFT's kaiming bound.
  np.testing.assert_array_equal(adapters['fc']['kernel']['b'], np.zeros((2, 5)))
  b = rng.normal(size=(2, 5)).astype(np.float32)  # As if trained.
  adapters['fc']['kernel']['b'] = b
  x = rng.normal(size=(3, 6)).astype(np.float32)
  effective = lora.apply(params, adapters)
  expected = x @ w + (4.0 / 2) * (x @ a) @ b + bias
  np.testing.assert_allclose(x @ np.asarray(effective['fc']['kernel']) + effective['fc']['bias'],
                             expected, rtol=1e-5, atol=1e-5)
  merged = lora.merge(params, adapters)
  np.testing.assert_allclose(merged['fc']['kernel'], w + 2.0 * a @ b, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(merged['fc']['bias'], bias)


def test_fused_and_stacked_kernels_are_matrices_of_their_layout():
  # Attention's fused qkv [E, 3, N, H] is one [E, 3NH] matrix; scanned layers add a stack dim.
  params = {'qkv': np.ones((4, 8, 3, 2, 4), np.float32)}
  lora = lora_lib.build(_settings(rank=3), _abstract(params), {'qkv': (1, 1)})
  adapters = lora.init(params, jax.random.key(1))
  assert adapters['qkv']['a'].shape == (4, 8, 3) and adapters['qkv']['b'].shape == (4, 3, 3, 2, 4)
  b = np.random.default_rng(1).normal(size=(4, 3, 3, 2, 4)).astype(np.float32)
  delta = lora.delta('qkv', adapters['qkv']['a'], b)
  for layer in range(4):
    np.testing.assert_allclose(
        np.asarray(delta[layer]).reshape(8, 24),
        (4.0 / 3) * np.asarray(adapters['qkv']['a'][layer]) @ b[layer].reshape(3, 24),
        rtol=1e-5, atol=1e-6)


def test_bad_settings_are_one_line_errors():
  params = {'fc': {'kernel': np.ones((6, 5), np.float32)}}
  layout = {'fc': {'kernel': (0, 1)}}
  with pytest.raises(KilnError, match=r"config\.lora\.targets='nothing' matches no kernel.*fc/kernel"):
    lora_lib.build(_settings(targets='nothing'), _abstract(params), layout)
  with pytest.raises(KilnError, match=r'config\.lora\.rank=6 exceeds fc/kernel \(6 x 5\)'):
    lora_lib.build(_settings(rank=6), _abstract(params), layout)
  with pytest.raises(KilnError, match=r'config\.init\.checkpoint_dir'):
    lora_lib.build(_settings(checkpoint_dir=''), _abstract(params), layout)
  for error in (lambda: lora_lib.build(_settings(targets='nothing'), _abstract(params), layout),):
    with pytest.raises(KilnError) as info:
      error()
    assert '\n' not in str(info.value)


def test_bert_speaker_config_trains_under_two_percent_at_rank_8():
  from configs import bert_classify_shakespeare
  config = bert_classify_shakespeare.get_config()
  config.lora.rank = 8
  config.init.checkpoint_dir = 'runs/bert_mlm'  # Read only when a run starts.
  exp = build_experiment(config, jax.devices()[:1])
  abstract = jax.eval_shape(lambda: exp.template.split(exp.template.build_model(nnx.Rngs(0)))[0])
  adapters = jax.eval_shape(lambda: exp.lora.init(abstract, jax.random.key(0)))
  counts = exp.lora.count(abstract, adapters)
  assert counts['trainable_fraction'] <= 0.02, counts
  assert counts['adapter_params'] > 0 and counts['trainable_base_params'] > 0  # The classifier.
  # Every block's fused qkv kernel (the config's targets); no biases, no MLM head.
  assert len(exp.lora.targets) == config.model.num_layers
  assert not any('bias' in name for name in exp.lora.targets)


def _base_checkpoint(config, workdir):
  """A checkpoint of `config`'s freshly initialised model, as a pre-trained base."""
  exp = build_experiment(config, jax.devices()[:1])
  state, _ = exp.create_state()
  checkpointer = Checkpointer(str(workdir))
  checkpointer.save(0, state, {'early_stopping': {}, 'stopped_early': False})
  checkpointer.close()
  return jax.device_get(state.params)


def _lora_cnn_config(base_dir):
  c = tiny_config()
  c.model.dropout_rate = 0.0
  c.lora.rank = 2
  c.lora.targets = r'conv|hidden'
  c.num_train_steps = 6
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 3
  c.log_every_steps = 3
  c.init.checkpoint_dir = str(base_dir)
  return c


@pytest.mark.slow  # Compiles a full run twice (straight and resumed).
def test_lora_run_freezes_base_keeps_no_state_for_it_merges_and_resumes(tmp_path):
  base = _base_checkpoint(tiny_config(), tmp_path / 'base')
  config = _lora_cnn_config(tmp_path / 'base')
  summary = train_and_evaluate(config, str(tmp_path / 'straight'))
  assert 0 < summary['lora']['trainable_fraction'] < 0.5
  exp = build_experiment(config, jax.devices())
  checkpointer = Checkpointer(str(tmp_path / 'straight'))
  state, shardings = exp.create_state()
  state, _ = checkpointer.restore(6, state, shardings)
  checkpointer.close()
  params, adapters = jax.device_get(state.params), jax.device_get(state.lora)

  # The frozen base is bit-identical to the checkpoint; the classifier (trainable) moved.
  for (path, value), expected in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                     jax.tree.leaves(base)):
    if 'classifier' in jax.tree_util.keystr(path):
      assert not np.array_equal(value, expected)
    else:
      np.testing.assert_array_equal(value, expected)
  assert any(np.abs(np.asarray(pair['b'])).max() > 0
             for pair in exp.lora._pairs(adapters).values())  # Adapters trained.

  # No optimizer state for frozen leaves: Adam's two moments cover exactly what trains.
  counts = exp.lora.count(params, adapters)
  trained_count = counts['adapter_params'] + counts['trainable_base_params']
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
  assert moments == 2 * trained_count

  # The merged plain model gives the logits of the base with its adapters.
  model, _, _ = trained.load_model(config, str(tmp_path / 'straight'), exp)
  images = np.random.default_rng(0).random((4, 8, 8, 1), np.float32)
  with_adapters = exp.template.merge(exp.lora.apply(params, adapters, freeze=False),
                                     jax.device_get(state.model_state))
  np.testing.assert_allclose(model(images), with_adapters(images), rtol=1e-5, atol=1e-5)
  # Zero B: the adapted model is exactly the base.
  zero = jax.tree.map(jnp.zeros_like, adapters)
  base_model = exp.template.merge(params, jax.device_get(state.model_state))
  np.testing.assert_array_equal(
      exp.template.merge(exp.lora.apply(params, zero, freeze=False),
                         jax.device_get(state.model_state))(images), base_model(images))

  # Resume is exact: 3 steps, stop, 3 more.
  train_and_evaluate(config, str(tmp_path / 'resumed'), stop_at_step=3)
  train_and_evaluate(config, str(tmp_path / 'resumed'))
  checkpointer = Checkpointer(str(tmp_path / 'resumed'))
  resumed, _ = checkpointer.restore(6, exp.create_state()[0], shardings)
  checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.lora), adapters)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), params)


@pytest.mark.slow  # Two eager BERT forwards (~30 s on 2 cores).
def test_adapters_at_zero_b_reproduce_the_base_exactly():
  config = tiny_bert_classify_config()
  config.lora.rank = 4
  config.init.checkpoint_dir = 'unused'  # Not read: create_state alone.
  exp = build_experiment(config, jax.devices()[:1])
  state, _ = exp.create_state()
  tokens = np.random.default_rng(0).integers(1, 20, (2, 16))
  base = exp.template.merge(state.params, state.model_state).classify(tokens)
  adapted = exp.template.merge(exp.lora.apply(state.params, state.lora, freeze=False),
                               state.model_state).classify(tokens)
  np.testing.assert_array_equal(adapted, base)


@pytest.mark.slow  # Two compiles of the tiny GPT's train step.
def test_lora_under_fsdp_matches_one_device(devices):
  def config(data, fsdp):
    c = tiny_gpt_config()
    c.model.dropout_rate = 0.0
    c.lora.rank = 4
    c.lora.alpha = 64.0  # A large scale so that the adapters visibly move the loss.
    c.lora.trainable = ''
    c.init.checkpoint_dir = 'unused'  # run_steps starts from the fresh base.
    c.mesh.data, c.mesh.fsdp = data, fsdp
    return c
  _, one, one_out = run_steps(config(-1, 1), devices[:1], num_steps=4)
  exp, many, many_out = run_steps(config(2, 4), devices, num_steps=4)
  losses = [m['loss'] for m, _ in one_out]
  assert losses[-1] != losses[0]
  np.testing.assert_allclose([m['loss'] for m, _ in many_out], losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               jax.device_get(many.lora), jax.device_get(one.lora))
  # The adapters really shard: some A or B carries the fsdp axis.
  specs = [x.sharding.spec for x in jax.tree.leaves(many.lora)]
  assert any('fsdp' in str(spec) for spec in specs), specs
