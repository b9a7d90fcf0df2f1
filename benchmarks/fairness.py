"""ERM against Group DRO on FSDD with one speaker cut to 10% of his training recordings
(configs/speech_digits_groupdro.py, issue 25): one table of per-speaker test accuracy.

  .venv/bin/python benchmarks/fairness.py [--root runs] [--dry_run] [--flags k=v,...]

Both runs go through train.py into --root/fsdd_erm and --root/fsdd_groupdro (the same
config; ERM with --config.fairness.mitigation=none); a run whose summary.json exists is read,
not run again. FSDD's eval split is its official test set (50 recordings per speaker: one
is 2 points). The table ends with the worst speaker's lift and the mean's cost.
"""

import argparse
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks.compression import Run, command, display_command, read_summary  # noqa: E402
from trust.fairness import comparison_table  # noqa: E402

CONFIG = 'configs/speech_digits_groupdro.py'


def runs(extra: dict) -> list[Run]:
  return [Run('fsdd_erm', 'fairness', 'ERM', '-', CONFIG,
              {'fairness.mitigation': 'none', **extra}),
          Run('fsdd_groupdro', 'fairness', 'Group DRO', '-', CONFIG, dict(extra))]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default='runs', help='folder of the two run workdirs')
  parser.add_argument('--flags', default='', help='comma-separated key=value config overrides '
                      'for both runs (their workdirs must then differ: use --root)')
  parser.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  args = parser.parse_args(argv)
  extra = dict(item.split('=', 1) for item in filter(None, args.flags.split(',')))
  summaries = []
  for run in runs(extra):
    summary = read_summary(args.root, run)
    if summary is None:
      print('$', display_command(run, args.root), flush=True)
      if args.dry_run:
        continue
      subprocess.run(command(run, args.root), cwd=REPO_ROOT, check=True)
      summary = read_summary(args.root, run)
    summaries.append(summary)
  if len(summaries) == 2:
    print('\n'.join(comparison_table(*summaries)))


if __name__ == '__main__':
  main()
