"""Samples text from a trained language model's latest checkpoint.

  python generate.py --config=configs/gpt_shakespeare_char_cpu.py --workdir=runs/gpt_cpu \
      --prompt="ROMEO:" --num_tokens=200 --temperature=0.8 --top_k=40 --seed=0

The config must be the one the run was trained with (it rebuilds the tokenizer
from the training text and the model from its settings). --temperature=0 decodes
greedily; --top_k and --top_p (nucleus) filter the distribution before sampling.
"""

import functools
import sys

import backends  # First: before JAX or TF start threads.

backends.configure_host(may_restart=__name__ == '__main__')

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from loop import experiment, trained  # noqa: E402
from models import sampling  # noqa: E402
from core.errors import KilnError  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory holding checkpoints/.')
_PROMPT = flags.DEFINE_string('prompt', '\n', 'Text to continue.')
_NUM_TOKENS = flags.DEFINE_integer('num_tokens', 200, 'Tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0 = all.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sample from the smallest set with this much mass.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed: the same seed gives the same text.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Independent continuations to print.')


def generate(config, workdir: str, prompt: str, num_tokens: int, temperature: float,
             top_k: int, top_p: float, seed: int, num_samples: int = 1) -> list[str]:
  exp = experiment.build_experiment(config)
  if not hasattr(exp.task, 'tokenizer'):
    raise KilnError(f"config.task='{config.task}' does not model text: use a causal_lm config")
  model, _, _ = trained.load_model(config, workdir, exp)
  tokenizer = exp.task.tokenizer
  ids = np.tile(tokenizer.encode(prompt)[None], (num_samples, 1))
  if ids.shape[1] == 0:
    raise KilnError('the prompt encodes to no tokens: pass a non-empty --prompt')
  tokens, _ = sampling.sample(model, ids, num_tokens, jax.random.key(seed), temperature, top_k,
                              top_p)
  return [prompt + tokenizer.decode(row) for row in np.asarray(tokens)]


def main(argv, config_flag):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  if not _WORKDIR.value:
    sys.exit('error: --workdir is required: pass the directory of a trained run')
  try:
    samples = generate(config_flag.value, _WORKDIR.value, _PROMPT.value, _NUM_TOKENS.value,
                       _TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _SEED.value,
                       _NUM_SAMPLES.value)
  except KilnError as e:
    sys.exit(f'error: {e}')
  print('\n\n---\n\n'.join(samples))


if __name__ == '__main__':
  config_flag = config_flags.DEFINE_config_file(
      'config', 'configs/gpt_shakespeare_char_cpu.py', 'Config the run was trained with.',
      lock_config=True)
  app.run(functools.partial(main, config_flag=config_flag))
