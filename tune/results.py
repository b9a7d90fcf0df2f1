"""What a study leaves in its study dir: trials.csv, best.json (with the command line that
reproduces the best trial; the Pareto front for several objectives) and PNG plots drawn by
optuna's matplotlib visualisations."""

import csv
import io
import os
import shlex
import warnings

import optuna
from optuna.trial import TrialState

from core.io import write_json_atomic, write_text_atomic
from tune import study as study_lib

TRIALS_CSV = 'trials.csv'
BEST_JSON = 'best.json'
PLOTS = {'history': 'optimization_history.png', 'importances': 'param_importances.png',
         'pareto': 'pareto_front.png'}


def objective_names(study: optuna.Study) -> list[str]:
  return [name for name, _ in study.user_attrs['objectives']]


def train_command(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
  """The train.py command line that reruns `trial` as an ordinary run."""
  words = ['python', 'train.py', f"--config={study.user_attrs['config_path']}",
           f'--workdir=runs/{study.study_name}_trial{trial.number}',
           *study.user_attrs['config_overrides']]
  for key, value in trial.user_attrs.get(study_lib.OVERRIDES, {}).items():
    value = tuple(value) if isinstance(value, list) else value
    words.append(f'--config.{key}={value!r}' if isinstance(value, (tuple, float)) else
                 f'--config.{key}={value}')
  return ' '.join(shlex.quote(w) for w in words)


def _trial_record(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict:
  names = objective_names(study)
  values = dict(zip(names, trial.values)) if trial.values else {}
  return {'trial': trial.number, 'values': values,
          'overrides': trial.user_attrs.get(study_lib.OVERRIDES, {}),
          'steps': trial.user_attrs.get(study_lib.STEPS),
          'workdir': trial.user_attrs.get(study_lib.WORKDIR),
          'command': train_command(study, trial)}


def write_trials_csv(study: optuna.Study, path: str) -> None:
  names = objective_names(study)
  keys = sorted({k for t in study.trials for k in t.params})
  header = ['number', 'state', *names, *keys, 'steps', 'train_time_s', 'retry_of', 'error',
            'worker', 'workdir', 'duration_s']
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(header)
  for t in study.trials:
    values = list(t.values) if t.values else [''] * len(names)
    duration = t.duration.total_seconds() if t.duration is not None else ''
    retry_of = study_lib.retry_of(t)
    writer.writerow([t.number, t.state.name, *values, *[t.params.get(k, '') for k in keys],
                     t.user_attrs.get(study_lib.STEPS, ''), t.user_attrs.get('train_time_s', ''),
                     '' if retry_of is None else retry_of, t.user_attrs.get(study_lib.ERROR, ''),
                     t.user_attrs.get(study_lib.WORKER, ''),
                     t.user_attrs.get(study_lib.WORKDIR, ''),
                     duration])
  write_text_atomic(path, out.getvalue())


def best(study: optuna.Study) -> dict:
  """best.json's content: the best trial, or the Pareto front for several objectives."""
  complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
  counts = {s.name.lower(): sum(t.state == s for t in study.trials)
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
  out = {'study': study.study_name, 'objectives': study.user_attrs['objectives'],
         'trials': counts, 'total_steps': sum(t.user_attrs.get(study_lib.STEPS, 0) or 0
                                             for t in study.trials)}
  if not complete:
    return out
  if len(study.directions) == 1:
    out['best'] = _trial_record(study, study.best_trial)
  else:
    out['pareto_front'] = [_trial_record(study, t)
                           for t in sorted(study.best_trials, key=lambda t: t.values)]
  return out


def plot(study: optuna.Study, study_dir: str) -> list[str]:
  """PNGs of the optimisation history, parameter importances and (several objectives) the
  Pareto front; returns the paths written (a plot its trials cannot support is skipped)."""
  import matplotlib.pyplot as plt  # Headless: matplotlib picks Agg; a notebook keeps its own.
  from optuna.visualization import matplotlib as optuna_plots

  names = objective_names(study)
  complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
  jobs = {}
  if len(names) == 1:
    jobs['history'] = lambda: optuna_plots.plot_optimization_history(study, target_name=names[0])
    if len(complete) >= 2:
      jobs['importances'] = lambda: optuna_plots.plot_param_importances(
          study, target_name=names[0])
  else:
    jobs['history'] = lambda: optuna_plots.plot_optimization_history(
        study, target=lambda t: t.values[0], target_name=names[0])
    if len(complete) >= 2:
      jobs['importances'] = lambda: optuna_plots.plot_param_importances(
          study, target=lambda t: t.values[0], target_name=names[0])
    if len(names) in (2, 3) and complete:
      jobs['pareto'] = lambda: optuna_plots.plot_pareto_front(study, target_names=names)
  written = []
  for name, draw in jobs.items():
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
      axes = draw()
    figure = axes.figure if hasattr(axes, 'figure') else axes.flat[0].figure
    path = os.path.join(study_dir, PLOTS[name])
    figure.savefig(path + '.tmp.png', dpi=100, bbox_inches='tight')
    os.replace(path + '.tmp.png', path)
    plt.close(figure)
    written.append(path)
  return written


def write_results(study: optuna.Study, study_dir: str) -> dict:
  """trials.csv, best.json and the plots; returns best.json's content."""
  write_trials_csv(study, os.path.join(study_dir, TRIALS_CSV))
  summary = best(study)
  write_json_atomic(os.path.join(study_dir, BEST_JSON), summary)
  if study.trials:  # A study only just created (--n_trials=0) has nothing to draw.
    plot(study, study_dir)
  return summary
