"""TPE with median pruning against random search without pruning, same space, same trial count:
best validation accuracy and total train steps of each study, in one table.

  .venv/bin/python benchmarks/tune_search.py [--root studies/bench] [--n_trials 30]
      [--config configs/default.py] [--set num_epochs=10 --set eval_every_steps=25]
      [--pruner median|median_all|hyperband] [--pruner_startup_trials 5]
      [--pruner_warmup_steps 0] [--pruner_interval_steps 1]

Each study runs `tune.py` in --root/<name>; a study that already holds its trials is only
read (its journal continues an interrupted one).
"""

import argparse
import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default='studies/bench')
  parser.add_argument('--n_trials', type=int, default=30)
  parser.add_argument('--config', default='configs/default.py')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--pruner', default='median', help="tune.py's, for the TPE study")
  parser.add_argument('--pruner_startup_trials', type=int, default=5,
                      help="tune.py's, for the TPE study")
  parser.add_argument('--pruner_warmup_steps', type=int, default=0,
                      help="tune.py's, for the TPE study")
  parser.add_argument('--pruner_interval_steps', type=int, default=1,
                      help="tune.py's, for the TPE study (median only)")
  parser.add_argument('--set', action='append', default=[],
                      help='KEY=VALUE config override for every trial of both studies')
  args = parser.parse_args()
  rows = []
  for name, sampler, pruner in ((f'tpe_{args.pruner}', 'tpe', args.pruner),
                                ('random', 'random', 'none')):
    study_dir = os.path.join(args.root, name)
    command = [sys.executable, os.path.join(REPO_ROOT, 'tune.py'), f'--config={args.config}',
               f'--study_dir={study_dir}', f'--n_trials={args.n_trials}', f'--sampler={sampler}',
               f'--pruner={pruner}', f'--seed={args.seed}',
               *[f'--config.{kv}' for kv in args.set]]
    if pruner != 'none':
      command += [f'--pruner_startup_trials={args.pruner_startup_trials}',
                  f'--pruner_warmup_steps={args.pruner_warmup_steps}']
      if args.pruner_interval_steps != 1:  # Other pruners reject it.
        command.append(f'--pruner_interval_steps={args.pruner_interval_steps}')
    print('$', ' '.join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO_ROOT)
    with open(os.path.join(study_dir, 'best.json')) as f:
      best = json.load(f)
    rows.append((name, best))
  print('\n| study | best accuracy | trials complete / pruned / failed | total train steps |')
  print('| --- | --- | --- | --- |')
  for name, best in rows:
    t = best['trials']
    print(f"| {name} | {best['best']['values']['accuracy']:.4f} | {t['complete']} / {t['pruned']} "
          f"/ {t['fail']} | {best['total_steps']:,} |")
  (_, tpe), (_, rnd) = rows
  print(f"\nTPE+{args.pruner} best - random best: "
        f"{tpe['best']['values']['accuracy'] - rnd['best']['values']['accuracy']:+.4f}; "
        f"steps TPE / random: {tpe['total_steps'] / rnd['total_steps']:.1%}")


if __name__ == '__main__':
  main()
