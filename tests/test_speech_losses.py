"""The RNN-T and CTC losses and gradients against a brute-force sum over every alignment
(NumPy, float64), on random small padded batches; the decoders and error counts against
plain-Python references."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasks import decoding
from tasks.ctc import ctc_loss
from tasks.rnnt_loss import rnnt_loss


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def grad_from_occupancy(logits, occupancy, total):
  """d(-log P)/d logits, where occupancy[..., v] sums the probability of the paths that
  emit v at that node and P = total: through log_softmax, g - softmax * sum(g)."""
  g = -occupancy / total
  return g - np.exp(log_softmax(logits)) * g.sum(-1, keepdims=True)


def brute_rnnt(logits, labels):
  """logits [T, U+1, V] float64, labels [U] -> (loss, grad) by enumerating every path."""
  length, width, _ = logits.shape
  num_labels = width - 1
  lp = log_softmax(logits)
  occupancy, total = np.zeros_like(logits), 0.0
  moves = length - 1 + num_labels
  for emits in itertools.combinations(range(moves), num_labels):
    t = u = 0
    nodes = []
    for step in range(moves):
      if step in emits:
        nodes.append((t, u, labels[u]))
        u += 1
      else:
        nodes.append((t, u, 0))
        t += 1
    nodes.append((length - 1, num_labels, 0))  # The final blank leaves the lattice.
    p = np.exp(sum(lp[node] for node in nodes))
    total += p
    for node in nodes:
      occupancy[node] += p
  return -np.log(total), grad_from_occupancy(logits, occupancy, total)


def collapse(path):
  out, previous = [], None
  for s in path:
    if s != previous and s != 0:
      out.append(s)
    previous = s
  return out


def brute_ctc(logits, labels):
  """logits [T, V] float64, labels list -> (loss, grad) over all V^T frame labellings."""
  length, vocab = logits.shape
  lp = log_softmax(logits)
  occupancy, total = np.zeros_like(logits), 0.0
  for path in itertools.product(range(vocab), repeat=length):
    if collapse(path) == list(labels):
      p = np.exp(sum(lp[t, s] for t, s in enumerate(path)))
      total += p
      for t, s in enumerate(path):
        occupancy[t, s] += p
  return -np.log(total), grad_from_occupancy(logits, occupancy, total)


def random_batch(rng, batch, max_t, max_u, vocab, extra_dims):
  frames = rng.integers(1, max_t + 1, batch)
  label_len = rng.integers(0, max_u + 1, batch)
  labels = rng.integers(1, vocab, (batch, max_u))
  labels[np.arange(max_u)[None, :] >= label_len[:, None]] = 0
  logits = rng.normal(0, 2, (batch, max_t, *extra_dims, vocab))
  return logits, frames, labels, label_len


@pytest.mark.parametrize('vocab', [2, 3, 5])
def test_rnnt_loss_and_gradient_equal_brute_force(vocab):
  rng = np.random.default_rng(vocab)
  logits, frames, labels, label_len = random_batch(rng, 6, 4, 3, vocab, (4,))
  frames[0], label_len[0] = 4, 3  # The full lattice appears at least once.
  labels[0] = rng.integers(1, vocab, 3)
  frames[1], label_len[1] = 1, 0  # ... and the smallest.

  def total(x):
    return rnnt_loss(x, jnp.array(frames), jnp.array(labels), jnp.array(label_len)).sum()
  x = jnp.array(logits, jnp.float32)
  losses = jax.jit(rnnt_loss)(x, jnp.array(frames), jnp.array(labels), jnp.array(label_len))
  grads = jax.jit(jax.grad(total))(x)
  assert np.isfinite(np.asarray(grads)).all()
  for b in range(len(frames)):
    t, u = frames[b], label_len[b]
    loss, grad = brute_rnnt(logits[b, :t, :u + 1], labels[b, :u])
    np.testing.assert_allclose(losses[b], loss, atol=1e-5, rtol=1e-5)
    expected = np.zeros_like(logits[b])
    expected[:t, :u + 1] = grad  # Padding cells get exactly zero gradient.
    np.testing.assert_allclose(grads[b], expected, atol=1e-5)


@pytest.mark.parametrize('vocab', [2, 3, 4])
def test_ctc_loss_and_gradient_equal_brute_force(vocab):
  rng = np.random.default_rng(10 + vocab)
  logits, frames, labels, label_len = random_batch(rng, 6, 4, 3, vocab, ())
  frames[0], label_len[0] = 4, 2
  labels[0, :2] = rng.integers(1, vocab, 2)
  frames[1], label_len[1] = 4, 0
  per, feasible = jax.jit(ctc_loss)(jnp.array(logits, jnp.float32), jnp.array(frames),
                                    jnp.array(labels), jnp.array(label_len))

  def total(x):
    loss, ok = ctc_loss(x, jnp.array(frames), jnp.array(labels), jnp.array(label_len))
    return jnp.where(ok, loss, 0.0).sum()
  grads = jax.jit(jax.grad(total))(jnp.array(logits, jnp.float32))
  assert np.isfinite(np.asarray(grads)).all()
  checked = 0
  for b in range(len(frames)):
    t, u = frames[b], label_len[b]
    target = list(labels[b, :u])
    reachable = any(collapse(p) == target for p in itertools.product(range(vocab), repeat=t))
    assert bool(feasible[b]) == reachable, (b, t, target)
    if not reachable:
      np.testing.assert_array_equal(grads[b], 0.0)
      continue
    loss, grad = brute_ctc(logits[b, :t], target)
    np.testing.assert_allclose(per[b], loss, atol=1e-5, rtol=1e-5)
    expected = np.zeros_like(logits[b])
    expected[:t] = grad
    np.testing.assert_allclose(grads[b], expected, atol=1e-5)
    checked += 1
  assert checked >= 2


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_impossible_ctc_pair_is_flagged():
  # "aa" needs a blank between the two a's: 3 frames; 2 are too few.
  labels = jnp.array([[1, 1]])
  _, feasible = ctc_loss(jnp.zeros((1, 2, 3)), jnp.array([2]), labels, jnp.array([2]))
  assert not bool(feasible[0])
  _, feasible = ctc_loss(jnp.zeros((1, 3, 3)), jnp.array([3]), labels, jnp.array([2]))
  assert bool(feasible[0])


def levenshtein(a, b):
  d = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    prev, d[0] = d[0], i
    for j, y in enumerate(b, 1):
      prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
  return d[-1]


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_error_counts_match_python_reference():
  from input_pipeline.audio import decode_ids, encode_text
  from tasks.speech import SPACE_ID
  rng = np.random.default_rng(0)
  words = ['one', 'two', 'three', 'oh', 'on']
  pairs = [('three one four', 'three one four'), ('', 'one'), ('one two', ''),
           ('  one   two ', 'one two'), ('tree one', 'three one four')]
  for _ in range(20):
    pairs.append((' '.join(rng.choice(words, rng.integers(0, 5))),
                  ' '.join(rng.choice(words, rng.integers(1, 5)))))
  hyp = np.stack([encode_text(h, 24)[0] for h, _ in pairs])
  hyp_len = np.array([encode_text(h, 24)[1] for h, _ in pairs])
  ref = np.stack([encode_text(r, 24)[0] for _, r in pairs])
  ref_len = np.array([encode_text(r, 24)[1] for _, r in pairs])
  we, nw, ce, nc = decoding.error_counts(jnp.array(hyp), jnp.array(hyp_len), jnp.array(ref),
                                         jnp.array(ref_len), SPACE_ID)
  for i, (h, r) in enumerate(pairs):
    assert decode_ids(hyp[i][:hyp_len[i]]) == h
    assert we[i] == levenshtein(h.split(), r.split()), (h, r)
    assert nw[i] == len(r.split())
    assert ce[i] == levenshtein(h, r) and nc[i] == len(r)


def test_ctc_greedy_collapses_repeats_and_blanks():
  path = np.array([[0, 1, 1, 0, 1, 2, 2, 0, 3, 3]])
  log_probs = np.log(np.eye(4)[path] * 0.9 + 0.025)
  ids, lengths = decoding.ctc_greedy(jnp.array(log_probs), jnp.array([8]))  # Last 2 padded.
  assert int(lengths[0]) == 3 and list(np.asarray(ids[0, :3])) == [1, 1, 2]


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_ctc_beam_search_finds_most_probable_labelling():
  """With a beam as wide as the number of prefixes (31 of length <= 4 over 2 labels),
  prefix beam search is exact."""
  rng = np.random.default_rng(3)
  vocab, length = 3, 4
  greedy_differs = 0
  for trial in range(6):
    logits = rng.normal(0, 1.5, (length, vocab))
    lp = log_softmax(logits)
    scores = {}
    for path in itertools.product(range(vocab), repeat=length):
      key = tuple(collapse(path))
      scores[key] = scores.get(key, 0.0) + np.exp(sum(lp[t, s] for t, s in enumerate(path)))
    best = max(scores, key=scores.get)
    ids, n = decoding.ctc_beam_search(jnp.array(lp[None], jnp.float32), jnp.array([length]),
                                      beam_size=32, max_len=length)
    assert tuple(np.asarray(ids[0, :int(n[0])])) == best, trial
    greedy_ids, greedy_n = decoding.ctc_greedy(jnp.array(lp[None]), jnp.array([length]))
    greedy_differs += tuple(np.asarray(greedy_ids[0, :int(greedy_n[0])])) != best
  assert greedy_differs  # Some case where the best single path is not the best labelling.


def _toy_transducer(rng, length, vocab, batch=1, table=None):
  """A prediction network whose state is the last emitted label, and a joint network whose
  logits are a random table indexed by (frame, last label): small enough to enumerate."""
  if table is None:
    table = rng.normal(0, 1.5, (batch, length, vocab, vocab))  # [b, t, last label, output]
  encoded = jnp.array(table.reshape(batch, length, vocab * vocab), jnp.float32)

  def predict_fn(state, tokens):
    return tokens, jax.nn.one_hot(tokens, vocab)

  def joint_fn(enc_t, out):
    return jnp.einsum('blv,bl->bv', enc_t.reshape(-1, vocab, vocab), out)

  init = predict_fn(jnp.zeros(batch, jnp.int32), jnp.zeros(batch, jnp.int32))
  return table, encoded, predict_fn, joint_fn, init


def _budgeted_labellings(lp, max_symbols):
  """lp [T, last label, V] -> {labelling: probability} over every alignment in which a
  frame emits up to `max_symbols` labels, then a blank (none after `max_symbols`)."""
  length, vocab = lp.shape[0], lp.shape[-1]
  scores = {}

  def walk(t, emitted, last, labels, logp):
    if t == length:
      scores[labels] = scores.get(labels, 0.0) + np.exp(logp)
      return
    walk(t + 1, 0, last, labels, logp + lp[t, last, 0])
    for c in range(1, vocab):
      done = emitted + 1 == max_symbols
      walk(t + done, 0 if done else emitted + 1, c, labels + (c,), logp + lp[t, last, c])
  walk(0, 0, 0, (), 0.0)
  return scores


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
@pytest.mark.parametrize('max_symbols', [1, 2])
def test_rnnt_beam_search_finds_the_best_labelling_within_the_budget(max_symbols):
  """With a beam holding every hypothesis, the search returns the labelling of highest
  total probability over the alignments with at most `max_symbols` labels per frame, and
  that probability as its score (1 label per frame: icefall's modified beam search)."""
  rng = np.random.default_rng(5)
  length, vocab = 3, 3
  for trial in range(3):
    table, encoded, predict_fn, joint_fn, init = _toy_transducer(rng, length, vocab)
    scores = _budgeted_labellings(log_softmax(table[0]), max_symbols)
    best = max(scores, key=scores.get)
    ids, n, logp = decoding.rnnt_beam_search(joint_fn, predict_fn, init, encoded,
                                             jnp.array([length]), max_len=2 * length,
                                             beam_size=len(scores), max_symbols=max_symbols)
    assert tuple(np.asarray(ids[0, 0, :int(n[0, 0])])) == best, trial
    np.testing.assert_allclose(float(logp[0, 0]), np.log(scores[best]), rtol=1e-5)


def test_rnnt_beam_of_one_is_greedy():
  """Ragged utterances, budgets of 1 and 3 labels per frame, a label width that cuts some
  transcripts short: a one-hypothesis beam decodes exactly what greedy does."""
  rng = np.random.default_rng(7)
  _, encoded, predict_fn, joint_fn, init = _toy_transducer(rng, 6, 4, batch=6)
  frames = jnp.array([6, 5, 3, 6, 1, 0])
  @functools.partial(jax.jit, static_argnums=0)
  def decode(max_symbols):
    args = (joint_fn, predict_fn, init, encoded, frames, 7)
    return (decoding.rnnt_greedy(*args, max_symbols),
            decoding.rnnt_beam_search(*args, beam_size=1, max_symbols=max_symbols))

  for max_symbols in (1, 3):
    (greedy_ids, greedy_n), (ids, n, _) = decode(max_symbols)
    np.testing.assert_array_equal(n[:, 0], greedy_n)
    np.testing.assert_array_equal(ids[:, 0], greedy_ids)
    assert int(greedy_n.max()) > 1


def test_rnnt_beam_puts_two_labels_on_one_frame():
  """One frame whose transcript is two labels: 'a' from the start, then 'b', then blank.
  A budget of 2 finds both; the one-label-per-frame search can only return one."""
  a, b = 1, 2
  probs = np.full((1, 1, 3, 3), 0.05)
  probs[0, 0, 0, a] = probs[0, 0, a, b] = probs[0, 0, b, 0] = 0.9
  _, encoded, predict_fn, joint_fn, init = _toy_transducer(None, 1, 3, table=np.log(probs))
  for max_symbols, expected in ((2, [a, b]), (1, [a])):
    ids, n, _ = jax.jit(functools.partial(
        decoding.rnnt_beam_search, joint_fn, predict_fn, init, max_len=4, beam_size=3,
        max_symbols=max_symbols))(encoded, jnp.array([1]))
    assert list(np.asarray(ids[0, 0, :int(n[0, 0])])) == expected, max_symbols


def _toy_log_prob(table, frames):
  """log p(labels | x) of _toy_transducer's model, by the RNN-T loss on its lattice."""
  def log_prob(labels, label_len):
    last = jnp.pad(labels, ((0, 0), (1, 0)))  # [B, U+1]: the label before each position.
    logits = jnp.take_along_axis(jnp.asarray(table, jnp.float32)[:, :, None],  # [B, T, 1, V, V]
                                 last[:, None, :, None, None], 3)[:, :, :, 0]
    return -rnnt_loss(logits, frames, labels, label_len)
  return log_prob


def test_rnnt_beam_pick_never_scores_below_greedy():
  """On random small models, the n-best and greedy's answer picked by log p(y | x) over
  every alignment: never below greedy's, above it on some utterances, and equal to the
  brute-force best of the candidates."""
  rng = np.random.default_rng(11)
  batch, length, vocab, max_len = 64, 5, 4, 8
  table, encoded, predict_fn, joint_fn, init = _toy_transducer(rng, length, vocab, batch)
  frames = jnp.array(rng.integers(1, length + 1, batch))
  log_prob = _toy_log_prob(table, frames)

  @jax.jit
  def decode():
    args = (joint_fn, predict_fn, init, encoded, frames, max_len)
    greedy = decoding.rnnt_greedy(*args, max_symbols=2)
    ids, n, scores = decoding.rnnt_beam_search(*args, beam_size=3, max_symbols=2)
    candidates = (jnp.concatenate([ids, greedy[0][:, None]], 1),
                  jnp.concatenate([n, greedy[1][:, None]], 1))
    live = jnp.pad(scores > decoding.NEG / 2, ((0, 0), (0, 1)), constant_values=True)
    picked = decoding.most_likely(log_prob, *candidates, live)
    each = jax.vmap(log_prob, (1, 1), 1)(*candidates)  # [B, 4]: every candidate at once.
    return log_prob(*picked), log_prob(*greedy), jnp.where(live, each, -jnp.inf).max(1)

  picked_lp, greedy_lp, best_lp = map(np.asarray, decode())
  assert np.all(picked_lp >= greedy_lp - 1e-5)
  assert np.sum(picked_lp > greedy_lp + 1e-3) >= 3
  np.testing.assert_allclose(picked_lp, best_lp, rtol=1e-6)


def test_rnnt_greedy_follows_the_argmax_path():
  rng = np.random.default_rng(6)
  length, vocab = 5, 4
  table, encoded, predict_fn, joint_fn, init = _toy_transducer(rng, length, vocab)
  for max_symbols in (1, 3):
    expected, last = [], 0
    for t in range(length):
      for _ in range(max_symbols):
        c = int(np.argmax(table[0, t, last]))
        if c == 0:
          break
        expected.append(c)
        last = c
    ids, n = decoding.rnnt_greedy(joint_fn, predict_fn, init, encoded, jnp.array([length]),
                                  max_len=12, max_symbols=max_symbols)
    assert list(np.asarray(ids[0, :int(n[0])])) == expected
