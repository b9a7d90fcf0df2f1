"""Hyper-parameter search over a config's get_search_space(), with Optuna.

  python tune.py --config=configs/default.py --study_dir=studies/digits --n_trials=30 \
      [--sampler=tpe|gp|cmaes|nsga2|random|grid] \
      [--pruner=median|median_all|hyperband|none] [--pruner_startup_trials=5] \
      [--pruner_warmup_steps=0] [--pruner_interval_steps=1] \
      [--storage=postgresql://...] [--seed=0] [--config.KEY=VALUE ...]

Each trial trains in <study_dir>/trials/<number>. --n_trials counts the whole study: start
the same command several times (one per core group, GPU or host) and the workers share it.
When the last trial ends, the worker writes <study_dir>/trials.csv, best.json (with a
command line that reproduces the best trial) and the plots.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

import backends  # noqa: E402  First: before JAX or TF start threads.

backends.configure_host(may_restart=__name__ == '__main__')

import train  # noqa: E402  (its own configure_host call repeats the settings above)
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from core.errors import KilnError  # noqa: E402
from tune import results, space as space_lib, study as study_lib  # noqa: E402

_STUDY_DIR = flags.DEFINE_string('study_dir', None,
                                 'Folder of the study: journal, trials, results.')
_N_TRIALS = flags.DEFINE_integer('n_trials', None, 'Trials in the whole study (all workers).',
                                 lower_bound=0)
_SAMPLER = flags.DEFINE_enum('sampler', 'tpe', list(study_lib.SAMPLERS), 'Optuna sampler.')
_PRUNER = flags.DEFINE_enum('pruner', 'auto', ['auto', *study_lib.PRUNERS],
                            'auto: median for one eval-metric objective, none otherwise.')
_PRUNER_STARTUP = flags.DEFINE_integer(
    'pruner_startup_trials', 5, 'median*: trials that complete before any is pruned.',
    lower_bound=0)
_PRUNER_WARMUP = flags.DEFINE_integer(
    'pruner_warmup_steps', 0, 'median*: no trial is judged before this train step; hyperband: '
    'its smallest budget (at least eval_every_steps).', lower_bound=0)
_PRUNER_INTERVAL = flags.DEFINE_integer(
    'pruner_interval_steps', 1, 'median: judge a trial only at the first eval at or after '
    'warm-up + k * this many steps (fewer checks on noisy evals; 1: every eval).')
_STORAGE = flags.DEFINE_string('storage', '', 'RDB URL for workers on many hosts; empty: the '
                               'journal file in --study_dir (workers on one host).')
_STUDY_NAME = flags.DEFINE_string('study_name', 'kiln', 'Study name inside the storage.')
_SEED = flags.DEFINE_integer('seed', 0, "Seeds the sampler (trial k draws from (seed, k)).")
_OBJECTIVES = flags.DEFINE_list(
    'objectives', None, "Replace the space's objectives: METRIC:max|min,... (e.g. "
    'accuracy:max,model_stats.params:min).')
_POPULATION = flags.DEFINE_integer('population_size', 0, 'nsga2: individuals per generation '
                                   "(0: Optuna's 50).", lower_bound=0)


def _objectives(values: list[str] | None) -> tuple | None:
  if values is None:
    return None
  return tuple(tuple(v.rsplit(':', 1)) if ':' in v else (v, '') for v in values)


def main(argv, config_flag):
  train.check_arguments(argv)
  for flag in (_STUDY_DIR, _N_TRIALS):
    if flag.value is None:
      sys.exit(f'error: --{flag.name} is required: {flags.FLAGS[flag.name].help}')
  config = train.load_config(config_flag)
  config_path = config_flags.get_config_filename(flags.FLAGS['config'])
  overrides = tuple(a for a in sys.argv[1:] if a.startswith('--config.'))
  try:
    space = space_lib.read_search_space(config_path, config, _objectives(_OBJECTIVES.value))
    pruner = _PRUNER.value
    if pruner == 'auto':
      single = len(space.objectives) == 1 and space.objectives[0].is_eval_metric
      pruner = 'median' if single else 'none'
    spec = study_lib.StudySpec(
        config_path=config_path, config=config, config_overrides=overrides, space=space,
        study_dir=_STUDY_DIR.value, study_name=_STUDY_NAME.value, storage_url=_STORAGE.value,
        sampler=_SAMPLER.value, pruner=pruner, seed=_SEED.value,
        population_size=_POPULATION.value, pruner_startup_trials=_PRUNER_STARTUP.value,
        pruner_warmup_steps=_PRUNER_WARMUP.value, pruner_interval_steps=_PRUNER_INTERVAL.value)
    study = study_lib.run_worker(spec, _N_TRIALS.value)
    summary = results.write_results(study, _STUDY_DIR.value)
  except KilnError as e:
    sys.exit(f'error: {e}')
  logging.info('Study %s: %s', study.study_name, summary['trials'])
  if 'best' in summary:
    print(f"best trial {summary['best']['trial']}: {summary['best']['values']}")
    print(f"reproduce: {summary['best']['command']}")
  elif 'pareto_front' in summary:
    print(f"Pareto front: {len(summary['pareto_front'])} trials")
  print(f'results in {os.path.abspath(_STUDY_DIR.value)}: {results.TRIALS_CSV}, '
        f'{results.BEST_JSON}, plots')


if __name__ == '__main__':
  train.run_entry_point(main, config_flag=train.define_config_flag(
      'Config file with get_config() and get_search_space().'))
