"""KV-cached autoregressive sampling: greedy, temperature, top-k and top-p (nucleus)."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from core.errors import KilnError


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Logits with everything outside the top-k and outside the smallest set whose
  probability reaches top_p set to -inf (0 and 1.0 disable each filter)."""
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep a token while the mass before it is below top_p (so the first always stays).
    keep_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def choose(logits: jax.Array, key: jax.Array, temperature: float, top_k: int,
           top_p: float) -> jax.Array:
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('graphdef', 'num_tokens', 'temperature', 'top_k',
                                             'top_p'))
def _sample(graphdef, state, prompt, key, num_tokens, temperature, top_k, top_p):
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(prompt.shape[0], prompt.shape[1] + num_tokens)
  logits, cache = model.decode(prompt, cache)

  def step(carry, step_key):
    cache, last_logits = carry
    token = choose(last_logits, step_key, temperature, top_k, top_p)
    logits, cache = model.decode(token[:, None], cache)
    return (cache, logits[:, -1]), (token, last_logits)

  _, (tokens, step_logits) = jax.lax.scan(step, (cache, logits[:, -1]),
                                          jax.random.split(key, num_tokens))
  return tokens.T, step_logits.swapaxes(0, 1)


def sample(model: nnx.Module, prompt: jax.Array, num_tokens: int, key: jax.Array,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Continues `prompt` [B, P] by `num_tokens` tokens. Returns (tokens [B, num_tokens],
  logits [B, num_tokens, V] each token was drawn from).

  Within the model's context this is one compiled program: a prefill of the prompt,
  then one cached decode step per token. Past the context, the last half-context of
  tokens is prefilled again and decoding continues, so every token still sees at
  least half a context of history.
  """
  if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
    raise KilnError(f'temperature={temperature} must be >= 0 (0 = greedy), top_k={top_k} >= 0 '
                    f'(0 = off) and top_p={top_p} in (0, 1]')
  if num_tokens < 1 or prompt.ndim != 2 or prompt.shape[1] < 1:
    raise KilnError(f'need num_tokens >= 1 (got {num_tokens}) and a [batch, length>=1] prompt '
                    f'(got shape {tuple(prompt.shape)})')
  max_len = model.transformer.max_len
  keep = max(max_len // 2, 1)
  graphdef, state = nnx.split(model)
  context = jnp.asarray(prompt, jnp.int32)
  if context.shape[1] >= max_len:
    context = context[:, -keep:]
  tokens, logits = [], []
  while num_tokens:
    count = min(num_tokens, max_len - context.shape[1])
    new_tokens, new_logits = _sample(graphdef, state, context, jax.random.fold_in(key, len(tokens)),
                                     count, float(temperature), int(top_k), float(top_p))
    tokens.append(new_tokens)
    logits.append(new_logits)
    num_tokens -= count
    context = jnp.concatenate([context, new_tokens], axis=1)[:, -keep:]
  return jnp.concatenate(tokens, axis=1), jnp.concatenate(logits, axis=1)
