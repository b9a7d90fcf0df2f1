"""tune/study.py's pruners: median_all's reference is every earlier trial (pruned ones counted as
behind), median's (Optuna's) the completed ones; startup, warm-up and median's interval come
from tune.py's flags, and bad values fail in one line."""

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from core.errors import KilnError
from tests.tiny import tiny_config
from tune import space as space_lib, study as study_lib

LR = 'optimizer.learning_rate'
SPACE = space_lib.parse_search_space(
    {'params': {LR: {'type': 'float', 'low': 1e-3, 'high': 1e-1}},
     'objectives': (('accuracy', 'max'),)}, tiny_config())
DIST = {LR: optuna.distributions.FloatDistribution(1e-3, 1e-1)}


def _study(pruner):
  """Four completed trials (0.96-0.99 at step 50) and two pruned at step 25 (0.30)."""
  study = optuna.create_study(direction='maximize', pruner=pruner)
  for final, at_50 in ((0.97, 0.96), (0.98, 0.97), (0.99, 0.98), (0.995, 0.99)):
    study.add_trial(create_trial(params={LR: 0.01}, distributions=DIST, value=final,
                                 intermediate_values={25: 0.5, 50: at_50, 100: final}))
  for _ in range(2):
    study.add_trial(create_trial(params={LR: 0.001}, distributions=DIST,
                                 state=TrialState.PRUNED, intermediate_values={25: 0.30}))
  return study


def _pruned_at(study, reports: dict[int, float]) -> bool:
  trial = study.ask()
  for step, value in reports.items():
    trial.report(value, step)
  return trial.should_prune()


def test_pruned_trials_count_as_behind_so_the_bar_is_the_population_median():
  # Of the six, two stopped at 25 and count as behind at 50: the median is (0.96 + 0.97) / 2.
  study = _study(study_lib.make_pruner('median_all', SPACE, tiny_config(), startup_trials=4))
  assert not _pruned_at(study, {50: 0.966})
  assert _pruned_at(study, {50: 0.964})
  # Optuna's rule (the median of the completed four, 0.975) prunes what this one keeps.
  optunas = study_lib.make_pruner('median', SPACE, tiny_config(), startup_trials=4)
  assert _pruned_at(_study(optunas), {50: 0.966})


def test_startup_and_warmup_hold_pruning_off():
  config = tiny_config()
  early = _study(study_lib.make_pruner('median_all', SPACE, config, startup_trials=5))
  assert not _pruned_at(early, {50: 0.5})  # Four completed trials: not yet five.
  warm = _study(study_lib.make_pruner('median_all', SPACE, config, startup_trials=4,
                                      warmup_steps=100))
  assert not _pruned_at(warm, {50: 0.5})
  assert _pruned_at(warm, {50: 0.5, 100: 0.5})


def test_an_interval_judges_only_its_steps():
  # Judged at 25, then at the first eval at or after 75: the dip at 50 goes unjudged.
  spaced = study_lib.make_pruner('median', SPACE, tiny_config(), startup_trials=4,
                                 warmup_steps=25, interval_steps=50)
  assert not _pruned_at(_study(spaced), {25: 0.6, 50: 0.6})
  assert _pruned_at(_study(spaced), {25: 0.6, 50: 0.6, 100: 0.6})
  every = study_lib.make_pruner('median', SPACE, tiny_config(), startup_trials=4, warmup_steps=25)
  assert _pruned_at(_study(every), {25: 0.6, 50: 0.6})


def test_the_spec_reaches_the_pruner(tmp_path):
  spec = study_lib.StudySpec(
      config_path='configs/default.py', config=tiny_config(), config_overrides=(), space=SPACE,
      study_dir=str(tmp_path), study_name='test', pruner_startup_trials=3, pruner_warmup_steps=60,
      pruner_interval_steps=40)
  pruner = study_lib.open_study(spec).pruner  # The spec's default pruner: Optuna's median.
  assert (pruner._n_startup_trials, pruner._n_warmup_steps, pruner._interval_steps) == (3, 60, 40)
  ours = study_lib.make_pruner('median_all', SPACE, tiny_config(), 3, 60)
  assert (ours.startup_trials, ours.warmup_steps) == (3, 60)
  optunas = study_lib.make_pruner('median', SPACE, tiny_config(), 3, 60)
  assert (optunas._n_startup_trials, optunas._n_warmup_steps) == (3, 60)
  # Hyperband's smallest budget is the warm-up, once it is past the first eval.
  assert study_lib.make_pruner('hyperband', SPACE, tiny_config(), 5, 60)._min_resource == 60
  assert study_lib.make_pruner('hyperband', SPACE, tiny_config(), 5, 0)._min_resource == 20


@pytest.mark.parametrize('name, startup, warmup, interval, message', [
    ('median_all', -1, 0, 1, '--pruner_startup_trials=-1: it counts trials: pass 0 or more'),
    ('median_all', 5, -25, 1, '--pruner_warmup_steps=-25: it counts train steps: pass 0 or more'),
    ('median', 5, 0, 0, r'--pruner_interval_steps=0: .* pass 1 or more'),
    ('median_all', 5, 0, 50, r'--pruner_interval_steps=50 is an option of --pruner=median'),
    ('hyperband', 5, 0, 50, r'--pruner_interval_steps=50 is an option of --pruner=median')])
def test_a_bad_count_fails_with_one_line(name, startup, warmup, interval, message):
  with pytest.raises(KilnError, match=message) as e:
    study_lib.make_pruner(name, SPACE, tiny_config(), startup, warmup, interval)
  assert '\n' not in str(e.value)
