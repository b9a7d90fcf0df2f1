"""What --config.batch_size=auto measures: every global batch it compiled, its peak bytes per
device (XLA's memory analysis), the batch it chose and the next legal size.

  .venv/bin/python benchmarks/auto_batch.py --config configs/gpt_shakespeare_char_cpu.py \
      --limit_gb 1.0 [--set optimizer.lr_scaling=sqrt --set optimizer.reference_batch_size=64]
"""

import argparse
import ast
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import backends  # noqa: E402  First: before JAX or TF start threads.

backends.configure_host(may_restart=__name__ == '__main__')

from loop import auto_batch  # noqa: E402
from tune.space import apply_overrides, load_config_module  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/gpt_shakespeare_char_cpu.py')
  parser.add_argument('--limit_gb', type=float, required=True)
  parser.add_argument('--set', action='append', default=[], help='KEY=VALUE config override')
  args = parser.parse_args()
  overrides = {k: ast.literal_eval(v) for k, _, v in (kv.partition('=') for kv in args.set)}
  config = apply_overrides(load_config_module(args.config).get_config(),
                           {**overrides, 'auto_batch.limit_gb': args.limit_gb})
  found = auto_batch.search(config)
  print(f'budget {found.budget_bytes / 2**30:.3f} GiB per device ({found.budget_source}); '
        f'legal batches are multiples of {found.step}')
  print('| global batch | compiled peak GiB per device | fits |')
  print('| --- | --- | --- |')
  for size in sorted(found.measured):
    peak = found.measured[size]
    print(f'| {size} | {peak / 2**30:.4f} | {"yes" if peak <= found.budget_bytes else "no"} |')
  print(f'chosen: {found.batch_size}; next legal size {found.next_size}: '
        + ('does not fit' if found.next_size else 'not measured (max_batch_size reached)'))
  rate = auto_batch.scaled_learning_rate(config, found.batch_size)
  print(f'learning rate {config.optimizer.learning_rate:g} -> {rate:g} '
        f'({config.optimizer.lr_scaling} scaling)')


if __name__ == '__main__':
  main()
