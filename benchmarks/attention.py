"""One causal self-attention block's forward + backward on this CPU, from the qkv projection's
output to the attention output, three ways, in one run:

  nice -n 5 .venv/bin/python benchmarks/attention.py [--rounds 300] [--isa native|avx2]
      [--positions rotary|learned]

- 'packed kernel': backends.ops.causal_attention_packed, what models/transformer.py runs
  where the CPU kernels do: q, k and v read in place from [B, T, 3, N, H], q scaled and
  q and k turned by the rotary tables inside the kernel, one packed gradient;
- 'kernel on slices': the chain it replaced: q, k, v sliced out by XLA, turned and scaled
  (ops.apply_rotary), the unpacked kernel, and the three gradients concatenated back;
- 'XLA': the same chain with the portable attention (config.backend.cpu_kernels='xla').

Shapes are the GPT CPU config's ([12, 64, 4, 32]) and the baby GPT's ([16, 256, 6, 64]);
each is one jitted gradient of sum(attention output * g) with respect to the projection's
output. Variants are timed interleaved (cpu_host.interleaved), medians per call.
"""

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import cpu_host  # noqa: E402  (imports neither JAX nor torch)


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=300, help='timed calls per variant')
  parser.add_argument('--isa', choices=cpu_host.ISAS, default='native',
                      help='avx2: Kiln kernels and XLA capped at AVX2')
  parser.add_argument('--positions', choices=('rotary', 'learned'), default='rotary',
                      help='learned: no rotary tables (q scaled only)')
  args = parser.parse_args(argv)
  if args.rounds < 1:
    sys.exit(f'error: --rounds={args.rounds} must be >= 1')
  return args


ARGS = _parse(sys.argv[1:] if __name__ == '__main__' else [])
cpu_host.cap_isa(ARGS.isa)  # Before JAX, XLA or Kiln's kernel build read them.

import backends  # noqa: E402  (before JAX starts threads)

backends.configure_host(may_restart=__name__ == '__main__')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from backends import ops  # noqa: E402
from models.transformer import rotary_tables  # noqa: E402

SHAPES = {'GPT CPU config': (12, 64, 4, 32), 'baby GPT': (16, 256, 6, 64)}


def gradients(shape, rotary: bool) -> dict:
  """{variant: run()} for one [B, T, N, H] shape."""
  batch, length, heads, dim = shape
  qkv = jax.random.normal(jax.random.key(0), (batch * length, 3 * heads * dim))
  g = jax.random.normal(jax.random.key(1), (batch, length, heads, dim))
  tables = (rotary_tables(np.broadcast_to(np.arange(length), (batch, length)), dim // 2)
            if rotary else None)

  def packed(qkv):
    y = ops.causal_attention_packed(qkv.reshape(batch, length, 3, heads, dim),
                                    scale=dim ** -0.5, rotary=tables)
    return (y * g).sum()

  def sliced(qkv):
    q, k, v = (t.reshape(batch, length, heads, dim) for t in jnp.split(qkv, 3, axis=1))
    if tables is not None:
      q, k = ops.apply_rotary(q, *tables), ops.apply_rotary(k, *tables)
    return (ops.causal_attention(q * dim ** -0.5, k, v) * g).sum()

  runs = {}
  for name, loss, kernels in (('packed kernel', packed, 'auto'),
                              ('kernel on slices', sliced, 'auto'), ('XLA', sliced, 'xla')):
    with ops.use(kernels):  # The choice is made when the function is traced.
      step = jax.jit(jax.grad(loss))
      step(qkv).block_until_ready()
    runs[name] = lambda step=step: step(qkv).block_until_ready()
  return runs


def main() -> None:
  print(cpu_host.host_line(ARGS.isa))
  print(f'{ARGS.positions} positions; {ARGS.rounds} interleaved calls per variant, medians\n')
  print('| shape [B, T, N, H] | variant | us per forward + backward | vs kernel on slices |')
  print('| --- | --- | --- | --- |')
  for label, shape in SHAPES.items():
    medians = cpu_host.interleaved(gradients(shape, ARGS.positions == 'rotary'), ARGS.rounds,
                                   warmup=10)
    reference = medians['kernel on slices'][0]
    for name, (seconds, _) in medians.items():
      print(f'| {label} {list(shape)} | {name} | {1e6 * seconds:,.0f} | '
            f'{reference / seconds:.2f}x |')


if __name__ == '__main__':
  main()
