"""Model selection: candidate configs compared on the same data with equal budgets, by
successive halving, into a leaderboard.

  python select_models.py \
      --candidates=configs/default.py,configs/digits_mlp.py,configs/digits_resnet18.py \
      --budget_epochs=8 --workdir=selections/digits [--metric=accuracy --mode=max] [--seed=0] \
      [--check_full_budget] [--set=KEY=VALUE ...]

Round i trains the survivors for budget / 2^(rounds - i) epochs; the better half goes on.
Writes <workdir>/leaderboard.json and leaderboard.md (candidate, validation and test metric,
params, train time, examples/s, inference latency per example, seed) and prints the table.
--check_full_budget also trains every candidate at the full budget and says whether the
halving's winner is the best of those.

(Not select.py: a select.py in the repository root would shadow Python's own `select` module
for every script started from here.)
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

import backends  # noqa: E402  First: before JAX or TF start threads.

backends.configure_host(may_restart=__name__ == '__main__')

import train  # noqa: E402  (its own configure_host call repeats the settings above)
from absl import app, flags, logging  # noqa: E402

from core.errors import KilnError  # noqa: E402

_CANDIDATES = flags.DEFINE_list('candidates', None, 'Config files to compare, comma-separated.')
_BUDGET = flags.DEFINE_float('budget_epochs', None, 'Epochs the winner trains (the full budget).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for every run and the leaderboard.')
_METRIC = flags.DEFINE_string('metric', 'accuracy', 'Eval metric that ranks the candidates.')
_MODE = flags.DEFINE_enum('mode', 'max', ['max', 'min'], 'Whether a larger metric is better.')
_SEED = flags.DEFINE_integer('seed', 0, 'config.seed of every run: the same seed, the same board.')
_CHECK = flags.DEFINE_bool('check_full_budget', False,
                           'Also train every candidate at the full budget and compare winners.')
_SET = flags.DEFINE_multi_string('set', [], 'KEY=VALUE config override for every candidate '
                                 '(Python literals: 1e-3, (8, 16), True).')


def main(argv):
  logging.get_absl_handler().addFilter(train._OwnLinesOnly())
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  for flag in (_CANDIDATES, _BUDGET, _WORKDIR):
    if flag.value is None:
      sys.exit(f'error: --{flag.name} is required: {flags.FLAGS[flag.name].help}')
  # Imported here: a missing flag is reported without loading the training stack (~5 s).
  from tune import selection, space
  try:
    candidates = selection.load_candidates(_CANDIDATES.value, space.parse_overrides(_SET.value))
    board = selection.successive_halving(candidates, _BUDGET.value, _WORKDIR.value,
                                         _METRIC.value, _MODE.value, _SEED.value)
    extra = {'budget_epochs': _BUDGET.value, 'metric': _METRIC.value, 'mode': _MODE.value}
    if _CHECK.value:
      full = selection.full_budget_best(candidates, _BUDGET.value, _WORKDIR.value, _METRIC.value,
                                        _MODE.value, _SEED.value, board)
      extra['full_budget'] = full
      extra['winner_matches_full_budget'] = full[0]['candidate'] == board[0]['candidate']
    text = selection.write_leaderboard(board, _WORKDIR.value, _METRIC.value, extra)
  except KilnError as e:
    sys.exit(f'error: {e}')
  print(text)
  if _CHECK.value:
    print('full budget: ' + ', '.join(f"{r['candidate']} {r[f'val_{_METRIC.value}']:.4f}"
                                      for r in extra['full_budget']))
    print(f"winner {board[0]['candidate']} matches the full-budget best: "
          f"{extra['winner_matches_full_budget']}")
  print(f'leaderboard in {os.path.abspath(_WORKDIR.value)}/{selection.LEADERBOARD_MD}')


if __name__ == '__main__':
  app.run(main)
