"""Trains one config once per optimizer, changing only config.optimizer.name, and prints
final eval figures as a markdown table.

  .venv/bin/python benchmarks/optimizer_sweep.py [--config configs/default.py] [NAME ...]
"""

import argparse
import os
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from absl import logging  # noqa: E402

import train  # noqa: E402
from benchmarks.throughput import load_config  # noqa: E402
from optim import OPTIMIZERS  # noqa: E402


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('names', nargs='*', default=list(OPTIMIZERS), help='optimizer names')
  parser.add_argument('--config', default='configs/default.py', help='config file')
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  rows = []
  for name in args.names:
    config = load_config(args.config)
    config.optimizer.name = name
    with tempfile.TemporaryDirectory() as workdir:
      summary = train.train_and_evaluate(config, workdir)
    rows.append((name, summary['final_eval'], summary['steps'], summary['wall_time_s']))
    print(f'{name}: {summary["final_eval"]}', flush=True)
  metrics = sorted(rows[0][1])
  print(f'\nconfig {args.config}, only config.optimizer.name changed\n')
  print('| optimizer | ' + ' | '.join(f'eval {m}' for m in metrics) + ' | steps | wall s |')
  print('|' + ' --- |' * (len(metrics) + 3))
  for name, final_eval, steps, seconds in rows:
    print(f'| {name} | ' + ' | '.join(f'{final_eval[m]:.4f}' for m in metrics)
          + f' | {steps} | {seconds:.0f} |')


if __name__ == '__main__':
  main()
