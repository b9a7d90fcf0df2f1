"""GPT text generation on the served model's compiled fixed-length logits function.

The served causal LM answers next-token logits at every position of a seq_len window
(Task.serving), compiled at start-up; generation feeds it the context right-padded (a causal
model's logits at position i see tokens <= i only) and reads the last real position. It
follows models/sampling.sample step for step (the same context handling past the model's
length, the same keys per token, the same `choose`), so a seed gives generate.py's text, and
no request compiles anything (sample's cached decoder compiles per prompt length and
settings).
"""

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from models import sampling
from serve.codec import RequestError
from serve.model import ServedModel


def supports(model: ServedModel) -> bool:
  return model.task == 'causal_lm' and model.tokenizer is not None and set(model.inputs) == {
      'tokens'}


def generate(model: ServedModel, prompt: str, max_tokens: int, temperature: float, top_k: int,
             top_p: float, seed: int) -> dict:
  """{'text': prompt + continuation, 'completion': the continuation, 'tokens': its ids}."""
  generated = list(tokens(model, prompt, max_tokens, temperature, top_k, top_p, seed))
  completion = model.tokenizer.decode(generated)
  return {'text': prompt + completion, 'completion': completion, 'tokens': generated}


def encode_prompt(model: ServedModel, prompt: str) -> list[int]:
  ids = [int(i) for i in model.tokenizer.encode(prompt)]
  if not ids:
    raise RequestError(400, 'prompt: encodes to no tokens (send a non-empty prompt)')
  return ids


def tokens(model: ServedModel, prompt: str, max_tokens: int, temperature: float, top_k: int,
           top_p: float, seed: int) -> Iterator[int]:
  """The generated token ids, one at a time (streaming sends each as it comes)."""
  tokenizer = model.tokenizer
  ids = encode_prompt(model, prompt)
  max_len = model.inputs['tokens'][0][0]
  keep = max(max_len // 2, 1)
  key = jax.random.key(seed)
  context = ids[-keep:] if len(ids) >= max_len else ids
  window = np.full((1, max_len), tokenizer.pad_id, np.int32)
  remaining, chunk = max_tokens, 0
  while remaining:
    count = min(remaining, max_len - len(context))
    keys = jax.random.split(jax.random.fold_in(key, chunk), count)
    for i in range(count):
      window[0, :len(context)] = context
      logits = model.run({'tokens': window})['logits'][:, len(context) - 1]
      token = int(sampling.choose(jnp.asarray(logits), keys[i], temperature, top_k, top_p)[0])
      context.append(token)
      yield token
    remaining -= count
    chunk += 1
    context = context[-keep:]
