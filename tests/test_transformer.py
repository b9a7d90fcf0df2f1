"""The Transformer library: cached decoding, sampling, FLOP counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from backends import ops
from models import sampling
from core.errors import KilnError
from models.transformer import BERT, GPT, gelu
from monitor import flops


def _gpt(scan_layers=False, **kwargs):
  args = dict(vocab_size=65, max_len=64, num_layers=2, num_heads=4, embed_dim=32)
  return GPT(**{**args, **kwargs}, scan_layers=scan_layers, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('positions', ['learned', 'rotary'])
@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_cached_generation_matches_full_recomputation(scan_layers, positions):
  model = _gpt(scan_layers, positions=positions)
  prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 65)
  tokens, step_logits = sampling.sample(model, prompt, 32, jax.random.key(2), temperature=1.0)
  sequence = jnp.concatenate([prompt, tokens], axis=1)
  full = model(sequence)  # No cache: every position recomputed from scratch.
  np.testing.assert_allclose(step_logits, full[:, 4:-1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_sampling_is_reproducible_and_filters_work():
  model = _gpt()
  prompt = jnp.zeros((3, 4), jnp.int32)
  draw = lambda seed, **kw: sampling.sample(model, prompt, 16, jax.random.key(seed), **kw)[0]  # noqa: E731
  np.testing.assert_array_equal(draw(7), draw(7))
  assert not np.array_equal(draw(7), draw(8))
  greedy, logits = sampling.sample(model, prompt, 16, jax.random.key(0), temperature=0.0)
  np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
  top1 = draw(3, top_k=1)
  np.testing.assert_array_equal(top1, greedy)  # top-1 sampling is greedy decoding.
  tiny_p = draw(4, top_p=1e-6)
  np.testing.assert_array_equal(tiny_p, greedy)


def test_gelu_is_the_exact_gelu_with_its_derivative_kept_from_the_forward_pass():
  x = jnp.linspace(-9.0, 9.0, 2001)
  np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
  # d/dx x Phi(x) = Phi(x) + x phi(x), against autodiff of the published formula.
  reference = jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=False)))(x)
  np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(x), reference, rtol=1e-5, atol=1e-6)
  # Differentiable twice still (the slope is traced from x): 2 phi(0) = 2 / sqrt(2 pi).
  second = jax.vmap(jax.grad(jax.grad(gelu)))(jnp.array([0.0]))
  np.testing.assert_allclose(second, [2 * 0.3989422804014327], rtol=1e-5)


def test_filter_logits_by_hand():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()  # noqa: E731
  assert kept(sampling.filter_logits(logits, top_k=2)) == [True, True, False, False]
  assert kept(sampling.filter_logits(logits, top_p=0.7)) == [True, True, False, False]
  assert kept(sampling.filter_logits(logits, top_p=0.5)) == [True, False, False, False]
  assert kept(sampling.filter_logits(logits, top_p=0.81)) == [True, True, True, False]


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_generation_past_the_context_slides_the_window():
  model = _gpt()  # Context 64.
  prompt = jax.random.randint(jax.random.key(1), (1, 10), 0, 65)
  tokens, step_logits = sampling.sample(model, prompt, 100, jax.random.key(3))
  assert tokens.shape == (1, 100) and step_logits.shape == (1, 100, 65)
  # The first 54 tokens fill the context; the next ones see the last 32 tokens again.
  sequence = jnp.concatenate([prompt, tokens], axis=1)
  window = sequence[:, 64 - 32:64]
  np.testing.assert_allclose(step_logits[:, 54], model(window)[:, -1], rtol=1e-4, atol=1e-4)
  with pytest.raises(KilnError, match='temperature'):
    sampling.sample(model, prompt, 4, jax.random.key(0), temperature=-1.0)


@pytest.mark.parametrize('cls', [GPT, BERT])
@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_forward_flops_match_xla(cls):
  model = cls(vocab_size=65, max_len=128, num_layers=2, num_heads=4, embed_dim=128,
              rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jnp.zeros((2, 128), jnp.int32)
  xla = flops.xla_flops(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)), state, tokens)
  analytic = 2 * flops.forward_flops(model, (128,))
  # XLA also computes the masked half of causal attention (see models.cost.attention_flops).
  assert analytic / xla == pytest.approx(1.0, abs=0.10)


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_scanned_and_unrolled_layers_compute_the_same_function():
  unrolled, scanned = _gpt(False), _gpt(True)
  # Copy the unrolled parameters into the stacked layout.
  blocks = [nnx.state(b) for b in unrolled.transformer.blocks]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  nnx.update(scanned.transformer.blocks, stacked)
  for name in ('token_embed', 'position_embed'):
    getattr(scanned.transformer, name)[...] = getattr(unrolled.transformer, name)[...]
  nnx.update(scanned.transformer.ln_f, nnx.state(unrolled.transformer.ln_f))
  tokens = jax.random.randint(jax.random.key(5), (2, 20), 0, 65)
  np.testing.assert_allclose(scanned(tokens), unrolled(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('pooling', ['cls', 'mean'])
@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_bert_classification_ignores_padding(pooling):
  model = BERT(vocab_size=70, max_len=32, num_layers=2, num_heads=4, embed_dim=32, num_classes=3,
               pooling=pooling, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 65)
  key_mask = jnp.arange(32)[None, :] < jnp.array([[20], [32]])
  other_padding = jnp.where(key_mask, tokens, 7)
  np.testing.assert_allclose(model.classify(tokens, key_mask=key_mask),
                             model.classify(other_padding, key_mask=key_mask), rtol=1e-5, atol=1e-6)
  if pooling == 'mean':  # Mean pooling sees every real token, not only the first.
    changed = tokens.at[0, 10].set((tokens[0, 10] + 1) % 65)
    assert not np.allclose(model.classify(changed, key_mask=key_mask)[0],
                           model.classify(tokens, key_mask=key_mask)[0])


@pytest.mark.parametrize('shape', [(64, 1000, 16), (999, 1001)])  # Even and odd last dims.
def test_dropout_drops_at_its_rate_and_stays_unbiased(shape):
  from models.dropout import Dropout
  x = jnp.ones(shape)
  y = Dropout(0.2)(x, deterministic=False, rngs=nnx.Rngs(dropout=3))
  dropped = float((y == 0).mean())
  assert abs(dropped - 0.2) < 3e-3, dropped
  assert abs(float(y.mean()) - 1.0) < 5e-3  # Kept values carry 1 / keep probability.
  again = Dropout(0.2)(x, deterministic=False, rngs=nnx.Rngs(dropout=3))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(again))
  other = Dropout(0.2)(x, deterministic=False, rngs=nnx.Rngs(dropout=4))
  assert float((other != y).mean()) > 0.2  # A different key gives a different mask.
  np.testing.assert_array_equal(np.asarray(Dropout(0.2)(x, deterministic=True)), np.asarray(x))


@pytest.mark.slow  # Eager attention, blocked and full, with and without key padding.
def test_blocked_causal_attention_equals_masked_attention():
  from models.transformer import attend, causal_attend, causal_bias
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 3, 12, 8)) for i in range(3))
  key_bias = jnp.where(jnp.arange(12) < 10, 0.0, -1e30)[None, None, None, :]  # Padded keys.
  for bias in (None, key_bias):
    full_bias = causal_bias(12) if bias is None else bias + causal_bias(12)

    def reference(q, k, v):
      return (attend(q, k, v, full_bias) ** 2).sum()

    def blocked(q, k, v):
      return (causal_attend(q, k, v, bias, block=4) ** 2).sum()
    np.testing.assert_allclose(causal_attend(q, k, v, bias, block=4), attend(q, k, v, full_bias),
                               rtol=1e-5, atol=1e-6)
    for g_blocked, g_ref in zip(jax.grad(blocked, (0, 1, 2))(q, k, v),
                                jax.grad(reference, (0, 1, 2))(q, k, v)):
      np.testing.assert_allclose(g_blocked, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_attention_dropout_is_dropout_on_the_softmax_probabilities():
  from models.transformer import attend, causal_attend, causal_bias
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 3, 12, 8)) for i in range(3))
  keep = jax.random.bernoulli(jax.random.key(7), 0.75, (2, 3, 12, 12))
  mask_block = lambda w: jnp.where(keep[..., :w.shape[-2], :w.shape[-1]], w / 0.75, 0.0)
  probabilities = jax.nn.softmax(jnp.einsum('bnth,bnsh->bnts', q, k) + causal_bias(12), axis=-1)
  expected = jnp.einsum('bnts,bnsh->bnth', mask_block(probabilities), v)
  np.testing.assert_allclose(attend(q, k, v, causal_bias(12), mask_block), expected,
                             rtol=1e-5, atol=1e-6)

  def blocked_mask(w):  # Each query block sees its own rows of the same mask.
    rows = w.shape[-2]
    start = 0 if w.shape[-1] == rows else w.shape[-1] - rows
    return jnp.where(keep[..., start:start + rows, :w.shape[-1]], w / 0.75, 0.0)
  np.testing.assert_allclose(causal_attend(q, k, v, block=4, drop=blocked_mask), expected,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kernels', ['xla', 'cpu'])
@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_training_block_drops_attention_weights_then_residual_branches(kernels):
  """A training block equals its parts replayed with the same dropout stream: attention
  weights dropped first, then the two residual branches, as in GPT-2/nanoGPT and BERT."""
  if kernels == 'cpu':
    pytest.importorskip('backends.cpu')  # Deleted: plain XLA only.
  with ops.use(kernels):  # config.backend.cpu_kernels for these (eager) calls.
    model = _gpt(num_layers=1, dropout_rate=0.5)
    block = model.transformer.blocks[0]
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 65)
    x = model.transformer.token_embed[...][tokens]
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    trained, _ = block(x, positions=positions, causal=True, train=True, rngs=nnx.Rngs(dropout=1))

    def replay(attention_dropout: bool):
      rngs = nnx.Rngs(dropout=1)
      y, _ = block.attn(block.ln1(x), positions=positions, causal=True, rngs=rngs,
                        dropout=block.dropout if attention_dropout else None)
      h = x + block.dropout(y, deterministic=False, rngs=rngs)
      return h + block.dropout(block.mlp(block.ln2(h)), deterministic=False, rngs=rngs)
    np.testing.assert_allclose(trained, replay(True), rtol=1e-6, atol=1e-6)
    assert not np.allclose(trained, replay(False), atol=1e-3)


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_baby_gpt_has_nanogpts_parameters_and_gpt2_initialisation():
  """nanoGPT's baby GPT without biases: 12 d^2 per layer, LayerNorm scales only, the tied
  embedding: 10.65M ("number of parameters: 10.65M" without its position table). GPT-2
  draws the projections that end each residual branch with std 0.02 / sqrt(2 layers)."""
  model = GPT(vocab_size=65, max_len=256, num_layers=6, num_heads=6, embed_dim=384,
              use_bias=False, positions='rotary', rngs=nnx.Rngs(0))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == 6 * 12 * 384 ** 2 + (2 * 6 + 1) * 384 + 65 * 384 == 10_646_784
  block = model.transformer.blocks[0]
  residual_std = 0.02 / np.sqrt(2 * 6)
  for kernel in (block.attn.out[...], block.mlp.fc2.kernel[...]):
    assert abs(float(jnp.std(kernel)) - residual_std) < 0.03 * residual_std
  for kernel in (block.attn.qkv[...], block.mlp.fc1.kernel[...]):
    assert abs(float(jnp.std(kernel)) - 0.02) < 0.03 * 0.02
  bert = BERT(vocab_size=65, max_len=64, num_layers=2, num_heads=4, embed_dim=64, rngs=nnx.Rngs(0))
  assert bert.encoder.blocks[0].ln1.bias is not None  # BERT keeps biases and 0.02 everywhere.
  assert abs(float(jnp.std(bert.encoder.blocks[0].mlp.fc2.kernel[...])) - 0.02) < 0.002


def test_palm_count_is_nanogpts_estimate_for_the_baby_gpt():
  """nanoGPT's estimate_mfu at block size 256: 6N + 12*L*H*Q*T per token, N without the
  position table, so learned and rotary positions count alike; about 5% above Kiln's own
  count, which halves causal attention."""
  per_token = 6 * 10_646_784 + 12 * 6 * 6 * 64 * 256
  for positions in ('rotary', 'learned'):
    model = nnx.eval_shape(lambda: GPT(vocab_size=65, max_len=256, num_layers=6, num_heads=6,
                                       embed_dim=384, use_bias=False, positions=positions,
                                       rngs=nnx.Rngs(0)))
    assert flops.palm_train_step_flops(model, 256, 16) == per_token * 256 * 16
  ratio = per_token * 256 * 16 / flops.train_step_flops(model, (256,), 16)
  assert 1.04 < ratio < 1.06
