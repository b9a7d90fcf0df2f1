"""Decoding and scoring of transcripts, in JAX with static shapes so it runs in the eval step.

- CTC: greedy (best path, repeats collapsed, blanks dropped) and prefix beam search
  (Hannun et al. 2014, "First-pass large vocabulary continuous speech recognition using
  bi-directional recurrent DNNs"; no language model), prefixes merged exactly.
- RNN-T: greedy (Graves 2012, up to `max_symbols` per frame), a time-synchronous beam
  search with the same per-frame budget (equal hypotheses merged by adding their
  probabilities; `max_symbols=1` is icefall's `modified_beam_search`), and the pick of the
  candidate the model finds most likely.
- Levenshtein distance, word and character error counts (WER/CER = summed errors over
  summed reference words/characters).

Sequences are fixed-size int32 arrays with a length; id 0 is the blank (and padding) and
`space_id` separates words. Hypotheses are identified by a rolling hash of their ids
when merging (collisions need two different prefixes with equal 32-bit hashes).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1e30  # Log of "impossible": finite, so sums and gradients never produce NaN.
_HASH_MULT = np.uint32(1_000_003)  # numpy: a jnp scalar here would start the backend at import.


def _extend_hash(h: jax.Array, token: jax.Array) -> jax.Array:
  return h * _HASH_MULT + token.astype(jnp.uint32) + jnp.uint32(1)


def _merged(values: jax.Array, same: jax.Array) -> jax.Array:
  """values [..., N] log-probabilities, same [..., N, N] equality of hypotheses ->
  for each hypothesis, the log of the summed probability of all its equals."""
  top = jnp.max(jnp.where(same, values[..., None, :], NEG), -1)
  spread = jnp.where(same, jnp.exp(values[..., None, :] - top[..., None]), 0.0)
  return top + jnp.log(jnp.sum(spread, -1) + 1e-30)


def compact(ids: jax.Array, keep: jax.Array):
  """Moves ids[keep] to the front (order kept), zeros after; returns (ids, count)."""
  length = ids.shape[-1]
  pos = jnp.where(keep, jnp.cumsum(keep, -1) - 1, length)  # Dropped ids go out of range.
  out = jnp.zeros_like(ids)
  out = jax.vmap(lambda o, p, v: o.at[p].set(v, mode='drop'))(
      out.reshape(-1, length), pos.reshape(-1, length), ids.reshape(-1, length))
  return out.reshape(ids.shape), keep.sum(-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- CTC

def ctc_greedy(log_probs: jax.Array, frames: jax.Array):
  """[B, T, V] (any scores), [B] valid frames -> (ids [B, T], lengths [B])."""
  best = jnp.argmax(log_probs, -1).astype(jnp.int32)
  previous = jnp.pad(best[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  valid = jnp.arange(best.shape[1])[None, :] < frames[:, None]
  return compact(best, (best != previous) & (best != 0) & valid)


def ctc_beam_search(log_probs: jax.Array, frames: jax.Array, beam_size: int, max_len: int):
  """Prefix beam search over [B, T, V] log-probabilities -> (ids [B, max_len], lengths [B]).

  Each prefix keeps the probability of its alignments ending in blank (pb) and in its
  last symbol (pnb); a frame either keeps the prefix (blank, or repeat of the last symbol)
  or extends it. Equal prefixes reached by different beams are merged by summing, and
  the `beam_size` most probable survive. With a beam as large as the number of prefixes,
  this returns the exact most probable labelling."""
  vocab = log_probs.shape[-1]
  k = beam_size

  def one(lp_seq, length):
    prefix = jnp.zeros((k, max_len), jnp.int32)
    plen = jnp.zeros(k, jnp.int32)
    last = jnp.zeros(k, jnp.int32)
    hashes = jnp.zeros(k, jnp.uint32)
    pb = jnp.full(k, NEG).at[0].set(0.0)
    pnb = jnp.full(k, NEG)

    def step(state, inputs):
      prefix, plen, last, hashes, pb, pnb = state
      lp, t = inputs
      total = jnp.logaddexp(pb, pnb)
      # Candidate (beam i, token c): c == 0 keeps prefix i, c > 0 appends c.
      stay_pb = total + lp[0]
      stay_pnb = jnp.where(plen > 0, pnb + lp[last], NEG)
      tokens = jnp.arange(vocab)[None, :]
      ext_pnb = jnp.where(tokens == last[:, None], pb[:, None], total[:, None]) + lp[None, :]
      ext_pnb = jnp.where(plen[:, None] < max_len, ext_pnb, NEG)
      cand_pb = jnp.concatenate([stay_pb[:, None], jnp.full((k, vocab - 1), NEG)], 1).ravel()
      cand_pnb = jnp.concatenate([stay_pnb[:, None], ext_pnb[:, 1:]], 1).ravel()
      cand_hash = jnp.where(tokens == 0, hashes[:, None],
                            _extend_hash(hashes[:, None], tokens)).ravel()
      cand_len = (plen[:, None] + (tokens > 0)).ravel()
      alive = jnp.maximum(cand_pb, cand_pnb) > NEG / 2
      same = ((cand_hash[:, None] == cand_hash[None, :]) & (cand_len[:, None] == cand_len[None, :])
              & alive[:, None] & alive[None, :])
      merged_pb, merged_pnb = _merged(cand_pb, same), _merged(cand_pnb, same)
      index = jnp.arange(k * vocab)
      first = ~jnp.any(same & (index[None, :] < index[:, None]), 1)
      score = jnp.where(first & alive, jnp.logaddexp(merged_pb, merged_pnb), 2 * NEG)
      _, chosen = jax.lax.top_k(score, k)
      beam, token = chosen // vocab, chosen % vocab
      new_prefix = prefix[beam]
      append_at = (token > 0)[:, None] & (jnp.arange(max_len)[None, :] == plen[beam][:, None])
      new_prefix = jnp.where(append_at, token[:, None], new_prefix)
      dead = score[chosen] <= NEG
      new_state = (new_prefix, cand_len[chosen], jnp.where(token > 0, token, last[beam]),
                   cand_hash[chosen], jnp.where(dead, NEG, jnp.maximum(merged_pb[chosen], NEG)),
                   jnp.where(dead, NEG, jnp.maximum(merged_pnb[chosen], NEG)))
      keep = t < length
      return jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_state, state), None

    state, _ = jax.lax.scan(step, (prefix, plen, last, hashes, pb, pnb),
                            (lp_seq, jnp.arange(lp_seq.shape[0])))
    prefix, plen, _, _, pb, pnb = state
    best = jnp.argmax(jnp.logaddexp(pb, pnb))
    return prefix[best], plen[best]

  return jax.vmap(one)(log_probs, frames)


# ----------------------------------------------------------------------------- RNN-T

def rnnt_greedy(joint_fn, predict_fn, init_state, encoded: jax.Array, frames: jax.Array,
                max_len: int, max_symbols: int):
  """Greedy transducer decoding. `predict_fn(state, tokens [B]) -> (state, out)` advances
  the prediction network; `joint_fn(enc [B, D], out) -> logits [B, V]`; `init_state` is
  (state, out) after the start (blank) token. Returns (ids [B, max_len], lengths [B])."""
  batch = encoded.shape[0]
  state, pred_out = init_state

  def frame(carry, inputs):
    enc_t, t = inputs

    def symbol(_, inner):
      state, pred_out, ids, n, done = inner
      token = jnp.argmax(joint_fn(enc_t, pred_out), -1).astype(jnp.int32)
      emit = (token != 0) & ~done & (t < frames) & (n < max_len)
      new_state, new_out = predict_fn(state, token)
      state = jax.tree.map(
          lambda a, b: jnp.where(emit.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
          new_state, state)
      pred_out = jnp.where(emit[:, None], new_out, pred_out)
      ids = jnp.where(emit[:, None] & (jnp.arange(max_len)[None, :] == n[:, None]),
                      token[:, None], ids)
      return state, pred_out, ids, n + emit, done | ~emit

    state, pred_out, ids, n = carry
    state, pred_out, ids, n, _ = jax.lax.fori_loop(
        0, max_symbols, symbol, (state, pred_out, ids, n, jnp.zeros(batch, bool)))
    return (state, pred_out, ids, n), None

  ids = jnp.zeros((batch, max_len), jnp.int32)
  n = jnp.zeros(batch, jnp.int32)
  (_, _, ids, n), _ = jax.lax.scan(frame, (state, pred_out, ids, n),
                                   (encoded.swapaxes(0, 1), jnp.arange(encoded.shape[1])))
  return ids, n


def rnnt_beam_search(joint_fn, predict_fn, init_state, encoded: jax.Array, frames: jax.Array,
                     max_len: int, beam_size: int, max_symbols: int):
  """Time-synchronous transducer beam search with up to `max_symbols` labels per frame;
  same callables as rnnt_greedy. Returns the n-best, most probable first: (ids [B, K,
  max_len], lengths [B, K], log-probabilities [B, K], NEG in slots left empty).

  Each frame takes `max_symbols` expansion steps. A hypothesis still open on the frame
  either emits blank (closing it: it moves on to the next frame) or a label (it stays
  open); on the last step a label closes it too, as greedy moves on after `max_symbols`.
  Closed hypotheses with equal labels are merged by adding their probabilities, and after
  every step the `beam_size` best of the closed and open ones together survive, so a beam
  of 1 is greedy decoding. `max_symbols=1` is icefall's modified beam search (a label
  consumes its frame), `max_symbols` times cheaper per frame. With a beam that holds every
  hypothesis the result is the most probable labelling under that per-frame budget."""
  batch = encoded.shape[0]
  k = beam_size

  def tile(x):  # [B, ...] -> [B*K, ...]
    return jnp.repeat(x, k, axis=0)

  def rows(mask, a):  # A mask over a's leading dims, broadcast over the rest.
    return mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim))

  # The carry: prediction network (state, output) per hypothesis [B*K, ...], then the
  # hypotheses' ids [B, K, L], lengths, hashes and log-probabilities [B, K].
  net = jax.tree.map(tile, init_state)
  beams = (jnp.zeros((batch, k, max_len), jnp.int32), jnp.zeros((batch, k), jnp.int32),
           jnp.zeros((batch, k), jnp.uint32), jnp.tile(jnp.full(k, NEG).at[0].set(0.0), (batch, 1)))

  def expand(enc_t, step, carry):
    net, (ids, n, hashes, scores), open_ = carry
    logp = jax.nn.log_softmax(joint_fn(enc_t, net[1]).astype(jnp.float32), -1)
    vocab = logp.shape[-1]
    tokens = jnp.arange(vocab)[None, None, :]
    # Candidates: the K hypotheses as they are (closed ones only), then every open one
    # extended by every token (blank closes it; a label keeps it open but on the last step).
    extend = jnp.where(open_[..., None], scores[..., None] + logp.reshape(batch, k, vocab), NEG)
    extend = jnp.where((tokens > 0) & (n[..., None] >= max_len), NEG, extend)
    cand = jnp.concatenate([jnp.where(open_, NEG, scores), extend.reshape(batch, -1)], 1)
    extended_hash = jnp.where(tokens == 0, hashes[..., None],
                              _extend_hash(hashes[..., None], tokens))
    cand_hash = jnp.concatenate([hashes, extended_hash.reshape(batch, -1)], 1)
    cand_len = jnp.concatenate([n, (n[..., None] + (tokens > 0)).reshape(batch, -1)], 1)
    closes = jnp.broadcast_to((tokens == 0) | (step == max_symbols - 1), (batch, k, vocab))
    cand_closed = jnp.concatenate([jnp.ones((batch, k), bool), closes.reshape(batch, -1)], 1)
    alive = cand > NEG / 2
    index = jnp.arange(cand.shape[1])
    # Open candidates are distinct (one-token extensions of distinct hypotheses), so only
    # closed ones merge; each equals itself, so an open one keeps its own score.
    mergeable = alive & cand_closed
    same = ((cand_hash[:, :, None] == cand_hash[:, None, :])
            & (cand_len[:, :, None] == cand_len[:, None, :])
            & mergeable[:, :, None] & mergeable[:, None, :]) | (index[:, None] == index[None, :])
    merged = _merged(cand, same)
    first = ~jnp.any(same & (index[None, None, :] < index[None, :, None]), -1)
    score = jnp.where(first & alive, merged, 2 * NEG)
    # A stable sort along each utterance's row, not lax.top_k (same picks, ties to the lower
    # index): XLA's SPMD partitioner all-gathers TopK's operand over a sharded batch, and
    # XLA:CPU's in-process all-gathers inside this loop hung the 8-fake-device eval.
    chosen = jnp.argsort(-score, axis=-1, stable=True)[:, :k]  # [B, K]
    best = jnp.take_along_axis(score, chosen, 1)
    extended = chosen >= k
    source = jnp.where(extended, (chosen - k) // vocab, chosen)
    token = jnp.where(extended, (chosen - k) % vocab, 0).astype(jnp.int32)
    emit = token > 0

    def pick(x):  # [B, K, ...] -> the chosen candidates' source hypotheses, per utterance.
      return jnp.take_along_axis(x, rows(source, x), 1)
    old_net = jax.tree.map(lambda x: pick(x.reshape((batch, k) + x.shape[1:])).reshape(x.shape),
                           net)
    new_net = predict_fn(old_net[0], token.ravel())
    net = jax.tree.map(lambda a, b: jnp.where(rows(emit.ravel(), a), a, b), new_net, old_net)
    old_n = pick(n)
    ids = jnp.where(emit[..., None] & (jnp.arange(max_len) == old_n[..., None]), token[..., None],
                    pick(ids))
    dead = best <= NEG
    beams = (ids, old_n + emit, jnp.take_along_axis(cand_hash, chosen, 1),
             jnp.where(dead, NEG, best))
    return net, beams, ~jnp.take_along_axis(cand_closed, chosen, 1) & ~dead

  def frame(carry, inputs):
    enc_t, t = inputs
    net, beams = carry
    opened = (net, beams, beams[3] > NEG / 2)  # Every live hypothesis opens on the frame.
    new_net, new_beams, _ = jax.lax.fori_loop(0, max_symbols,
                                              functools.partial(expand, tile(enc_t)), opened)
    keep = t < frames  # [B]
    return (jax.tree.map(lambda a, b: jnp.where(rows(tile(keep), a), a, b), new_net, net),
            jax.tree.map(lambda a, b: jnp.where(rows(keep, a), a, b), new_beams, beams)), None

  (_, (ids, n, _, scores)), _ = jax.lax.scan(
      frame, (net, beams), (encoded.swapaxes(0, 1), jnp.arange(encoded.shape[1])))
  return ids, n, scores


def most_likely(log_prob_fn, ids: jax.Array, lengths: jax.Array, live: jax.Array):
  """Candidates ids [B, C, L], lengths [B, C], live [B, C] (False: an empty slot) ->
  (ids [B, L], lengths [B]) of the live one with the highest `log_prob_fn(ids [B, L],
  lengths [B]) -> [B]`, ties to the lower index. The candidates are scored one at a time
  (lax.map), so one candidate's lattice is in memory at once."""
  log_probs = jax.lax.map(lambda c: log_prob_fn(*c), (ids.swapaxes(0, 1), lengths.swapaxes(0, 1)))
  best = jnp.argmax(jnp.where(live.T, log_probs, 2 * NEG), 0)  # [B]
  return (jnp.take_along_axis(ids, best[:, None, None], 1)[:, 0],
          jnp.take_along_axis(lengths, best[:, None], 1)[:, 0])


# ----------------------------------------------------------------------------- scoring

def edit_distance(hyp: jax.Array, hyp_len: jax.Array, ref: jax.Array, ref_len: jax.Array):
  """Levenshtein distance between hyp[:hyp_len] and ref[:ref_len] (one pair; vmap it).

  Row i of the table is d[i, j] = min(sub/del from row i-1, d[i, j-1] + 1); the
  insertion chain is a running minimum: d[i, j] = j + min_{k<=j} (e[k] - k)."""
  cols = jnp.arange(hyp.shape[0] + 1)

  def row(prev, inputs):
    i, r = inputs
    e = jnp.minimum(prev[:-1] + (hyp != r), prev[1:] + 1)
    e = jnp.concatenate([i[None], e])
    d = jax.lax.cummin(e - cols) + cols
    return jnp.where(i <= ref_len, d, prev), None

  final, _ = jax.lax.scan(row, cols, (jnp.arange(1, ref.shape[0] + 1), ref))
  return final[hyp_len]


def words(ids: jax.Array, length: jax.Array, space_id: int):
  """Character ids -> (word hashes [L], word count), words split on runs of spaces."""
  size = ids.shape[0]
  pos = jnp.arange(size)
  is_char = (ids != space_id) & (pos < length)
  previous = jnp.pad(is_char[:-1], (1, 0))
  starts = is_char & ~previous
  word_index = jnp.cumsum(starts) - 1
  start_pos = jax.lax.cummax(jnp.where(starts, pos, 0))
  powers = jnp.cumprod(jnp.full(size, _HASH_MULT).at[0].set(1))  # 1, m, m^2, ... (mod 2^32)
  terms = (ids.astype(jnp.uint32) + 1) * powers[pos - start_pos]
  hashed = jax.ops.segment_sum(jnp.where(is_char, terms, 0),
                               jnp.where(is_char, word_index, size), num_segments=size + 1)[:size]
  return hashed, starts.sum().astype(jnp.int32)


def error_counts(hyp, hyp_len, ref, ref_len, space_id: int):
  """Per utterance of a batch: (word errors, reference words, char errors, reference
  chars), all float32. Characters are compared as written, spaces included."""
  def one(h, hl, r, rl):
    hw, hn = words(h, hl, space_id)
    rw, rn = words(r, rl, space_id)
    return (edit_distance(hw, hn, rw, rn), rn, edit_distance(h, hl, r, rl), rl)
  return tuple(x.astype(jnp.float32) for x in jax.vmap(one)(hyp, hyp_len, ref, ref_len))
