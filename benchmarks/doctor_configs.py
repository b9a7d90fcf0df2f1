"""The doctor's initial-loss and overfit-one-batch checks on every config in configs/, and the
default config trained at the range test's suggested learning rate.

  .venv/bin/python benchmarks/doctor_configs.py [CONFIG.py ...] [--overfit_steps N]
  .venv/bin/python benchmarks/doctor_configs.py --suggested_lr [--config configs/default.py]

Configs whose data is not on this machine (TFDS downloads) are listed as skipped, with why.
"""

import argparse
import dataclasses
import glob
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import backends  # noqa: E402  (first: before JAX or TF start threads)

backends.configure_host()

from benchmarks.throughput import load_config  # noqa: E402
from core.errors import KilnError  # noqa: E402
from doctor import run  # noqa: E402
from loop import experiment  # noqa: E402


def check(config_path: str, overfit_steps: int) -> dict:
  started = time.perf_counter()
  try:
    config = load_config(config_path)
    exp = experiment.build_experiment(config)
  except (KilnError, OSError) as error:
    return {'config': config_path, 'skipped': ' '.join(str(error).split())}
  options = dataclasses.replace(run.Options.from_config(config), checks=('init', 'overfit'))
  if overfit_steps:  # Else the config's own doctor.overfit_steps.
    options = dataclasses.replace(options, overfit_steps=overfit_steps)
  with tempfile.TemporaryDirectory() as workdir:
    report = run.diagnose_experiment(exp, workdir, options)
  by_check = {f.check: f for f in report['findings']}
  overfit = by_check.get('overfit_one_batch') or by_check.get('overfit_failed')
  initial = [f for f in report['findings'] if f.check == 'initial_loss' and f.severity != 'info']
  return {'config': config_path, 'initial': report['initial']['loss'],
          'uniform': report['initial']['uniform_loss'], 'initial_ok': not initial,
          'overfit_ok': 'overfit_one_batch' in by_check, 'overfit': overfit.message,
          'problems': sorted({f.check for f in report['findings'] if f.severity != 'info'}),
          'seconds': time.perf_counter() - started}


def suggested_lr(config_path: str) -> None:
  import train  # Heavy: only this mode trains.
  config = load_config(config_path)
  exp = experiment.build_experiment(config)
  options = dataclasses.replace(run.Options(), checks=('lr_range',))
  with tempfile.TemporaryDirectory() as workdir:
    report = run.diagnose_experiment(exp, workdir, options)
    rate = report['lr_range']['suggested']
    config = load_config(config_path)
    config.optimizer.learning_rate = rate
    summary = train.train_and_evaluate(config, os.path.join(workdir, 'run'))
  print(f"| {config_path} | configured {load_config(config_path).optimizer.learning_rate:g} | "
        f"suggested {rate:.3g} | final accuracy {100 * summary['final_eval']['accuracy']:.2f}% |")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('configs', nargs='*')
  parser.add_argument('--overfit_steps', type=int, default=0, help='0: config.doctor.overfit_steps')
  parser.add_argument('--suggested_lr', action='store_true')
  parser.add_argument('--config', default='configs/default.py')
  args = parser.parse_args(argv)
  if args.suggested_lr:
    suggested_lr(args.config)
    return
  paths = args.configs or sorted(
      p for p in glob.glob(os.path.join(REPO_ROOT, 'configs', '*.py'))
      if not os.path.basename(p).startswith('_') and 'def get_config' in open(p).read())
  print('| config | initial loss | uniform loss | initial ok | overfit one batch | problems | s |')
  print('| --- | --- | --- | --- | --- | --- | --- |')
  for path in paths:
    row = check(os.path.relpath(path, REPO_ROOT), args.overfit_steps)
    if 'skipped' in row:
      print(f"| {row['config']} | skipped: {row['skipped']} | | | | | |", flush=True)
      continue
    uniform = 'n/a' if row['uniform'] is None else f"{row['uniform']:.4g}"
    initial_ok = 'n/a' if row['uniform'] is None else 'yes' if row['initial_ok'] else 'NO'
    print(f"| {row['config']} | {row['initial']:.4g} | {uniform} | {initial_ok} | "
          f"{'yes' if row['overfit_ok'] else 'NO'}: "
          f"{row['overfit']} | {', '.join(row['problems']) or '-'} | {row['seconds']:.0f} |",
          flush=True)


if __name__ == '__main__':
  main()
