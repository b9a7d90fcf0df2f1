"""The RNN-T loss (Graves 2012, "Sequence Transduction with Recurrent Neural Networks").

p(y | x) sums over every path through the T x (U+1) lattice: at node (t, u) the joint
distribution either emits blank (to (t+1, u)) or the next label y_{u+1} (to (t, u+1));
paths end with a blank from (T-1, U). The forward variables

  alpha(t, u) = logsumexp(alpha(t-1, u) + blank(t-1, u), alpha(t, u-1) + emit(t, u-1))

are computed in log space one anti-diagonal n = t + u at a time (`lax.scan` over n; all
u of a diagonal at once), so each step is a vector op and no cell waits on its row.
Cells outside an utterance's own T_b x (U_b + 1) lattice hold a large finite negative
log-probability rather than -inf, so padding never yields NaN values or gradients.
JAX differentiates through the scan (the backward pass is the beta recursion).
"""

import jax
import jax.numpy as jnp

from tasks.decoding import NEG


def rnnt_loss(logits: jax.Array, frames: jax.Array, labels: jax.Array, label_len: jax.Array
              ) -> jax.Array:
  """-log p(labels | inputs) per utterance.

  logits [B, T, U+1, V] from the joint network (blank = 0), frames [B] (T_b >= 1),
  labels [B, U] (padded), label_len [B] (U_b <= U)."""
  batch, length, width, _ = logits.shape
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  blank = log_probs[..., 0]  # [B, T, U+1]
  emit = jnp.take_along_axis(log_probs[:, :, :-1, :], labels[:, None, :, None], -1)[..., 0]
  emit = jnp.pad(emit, ((0, 0), (0, 0), (0, 1)), constant_values=NEG)  # [B, T, U+1]
  num_diagonals = length + width - 1
  u = jnp.arange(width)
  inside = u[None, :] <= label_len[:, None]  # [B, U+1]

  def skew(values, t_of_n):
    """values[b, t, u] gathered at t = t_of_n(n, u) -> [N, B, U+1], NEG where t is off."""
    n = jnp.arange(num_diagonals)[:, None]
    t = t_of_n(n, u[None, :])  # [N, U+1]
    ok = (t >= 0) & (t < length)
    gathered = values[:, jnp.clip(t, 0, length - 1), u[None, :]]  # [B, N, U+1]
    return jnp.where(ok[None], gathered, NEG).swapaxes(0, 1)

  from_blank = skew(blank, lambda n, u: n - 1 - u)  # Arriving at (t, u) from (t-1, u).
  from_emit = skew(jnp.roll(emit, 1, axis=2), lambda n, u: n - u)  # From (t, u-1).
  from_emit = from_emit.at[:, :, 0].set(NEG)

  def diagonal(alpha, inputs):
    n, b_in, e_in = inputs
    shifted = jnp.pad(alpha[:, :-1], ((0, 0), (1, 0)), constant_values=NEG)
    new = jnp.logaddexp(alpha + b_in, shifted + e_in)
    t = n - u[None, :]
    on = inside & (t >= 0) & (t < frames[:, None])
    new = jnp.where(on, jnp.maximum(new, NEG), NEG)
    return new, new

  alpha0 = jnp.where(u[None, :] == 0, 0.0, NEG) * jnp.ones((batch, 1))
  _, alphas = jax.lax.scan(diagonal, alpha0,
                           (jnp.arange(1, num_diagonals), from_blank[1:], from_emit[1:]))
  alphas = jnp.concatenate([alpha0[None], alphas])  # [N, B, U+1]
  last_t = frames - 1
  final_n = last_t + label_len
  final_alpha = alphas[final_n, jnp.arange(batch), label_len]
  final_blank = blank[jnp.arange(batch), last_t, label_len]
  return -(final_alpha + final_blank)
