"""tune/: search spaces read from config files, Optuna studies on a real journal file, trials
that train, prune, fail and resume, workers in separate processes sharing one study."""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import ml_collections
import optuna
import pytest
from absl import flags
from ml_collections import config_flags
from optuna.trial import TrialState

from core.errors import KilnError
from loop.training import train_and_evaluate
from tests.tiny import REPO, tiny_config
from tune import results, space as space_lib, study as study_lib

LR = 'optimizer.learning_rate'


def _space(params, objectives=(('accuracy', 'max'),), config=None):
  return space_lib.parse_search_space({'params': params, 'objectives': objectives},
                                      config or tiny_config())


@pytest.mark.parametrize('params, objectives, message', [
    ({'optimizer.learning_rat': {'type': 'float', 'low': 1e-3, 'high': 1e-1}}, None,
     "optimizer has no field 'learning_rat'"),
    ({LR: {'type': 'float', 'low': 1e-1, 'high': 1e-3}}, None, 'empty range [0.1, 0.001]'),
    ({LR: {'type': 'float', 'low': 0.0, 'high': 1e-1, 'log': True}}, None,
     'log scale needs a positive range'),
    ({'model.dense_features': {'type': 'float', 'low': 8, 'high': 64}}, None,
     "config field is an int: use type 'int'"),
    ({LR: {'type': 'uniform', 'low': 1e-3, 'high': 1e-1}}, None, "'type' one of"),
    ({'model.features': {'type': 'categorical', 'choices': ()}}, None, "'choices' is empty"),
    ({LR: {'type': 'float', 'low': 1e-3, 'high': 1e-1}}, (('acuracy', 'max'),),
     "'acuracy' is not an eval metric of this task: choose one of loss, accuracy"),
    ({LR: {'type': 'float', 'low': 1e-3, 'high': 1e-1}}, (('accuracy', 'up'),),
     "give (metric, 'max' or 'min')"),
])
def test_a_bad_space_fails_with_one_line_naming_it(params, objectives, message):
  with pytest.raises(KilnError) as error:
    _space(params, objectives or (('accuracy', 'max'),))
  assert message in str(error.value) and '\n' not in str(error.value)


def test_the_default_config_declares_a_valid_four_knob_space():
  path = str(REPO / 'configs/default.py')
  space = space_lib.read_search_space(path, space_lib.load_config_module(path).get_config())
  assert [p.key for p in space.params] == [LR, 'regularization.weight_decay',
                                           'model.dropout_rate', 'model.dense_features']
  assert space.objectives[0].name == 'accuracy' and space.params[0].log


def test_objectives_can_be_replaced_from_the_command_line():
  path = str(REPO / 'configs/default.py')
  config = space_lib.load_config_module(path).get_config()
  space = space_lib.read_search_space(path, config, (('accuracy', 'max'),
                                                     ('model_stats.params', 'min')))
  assert [(o.name, o.direction) for o in space.objectives] == [
      ('accuracy', 'max'), ('model_stats.params', 'min')]
  with pytest.raises(KilnError, match='model_stats has params'):
    space_lib.read_search_space(path, config, (('model_stats.flops', 'min'),))


def test_tuple_choices_reach_the_config_as_tuples():
  space = _space({'model.features': {'type': 'categorical', 'choices': ((8, 16), (16, 32))}})
  study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
  overrides = space.suggest(study.ask())
  assert overrides['model.features'] in ((8, 16), (16, 32))
  config = space_lib.apply_overrides(tiny_config(), overrides)
  assert config.model.features == overrides['model.features']
  assert tiny_config().model.features == (8, 16)  # The base config is left alone.


# tests.tiny.tiny_config as train.py flags on configs/default.py (what a study records).
TINY_FLAGS = ('--config.model.features=(8, 16)', '--config.model.dense_features=32',
              '--config.batch_size=32', '--config.eval_batch_size=64',
              '--config.num_train_steps=40', '--config.schedule.warmup_steps=5',
              '--config.optimizer.learning_rate=0.01', '--config.log_every_steps=10',
              '--config.eval_every_steps=20', '--config.checkpoint_every_steps=20')


def _spec(tmp_path, space, **kwargs):
  return study_lib.StudySpec(config_path='configs/default.py', config=tiny_config(),
                             config_overrides=TINY_FLAGS, space=space, study_dir=str(tmp_path),
                             study_name='test', **kwargs)


def _asked_params(tmp_path, sampler, seed, n=4):
  """The params a fresh journal study proposes for its first n trials (told a fixed value)."""
  space = _space({LR: {'type': 'float', 'low': 1e-4, 'high': 1e-1, 'log': True},
                  'model.dropout_rate': {'type': 'float', 'low': 0.0, 'high': 0.5}})
  study = study_lib.open_study(_spec(tmp_path, space, sampler=sampler, seed=seed))
  params = []
  for i in range(n):
    trial = study.ask()
    space.suggest(trial)
    study.tell(trial, 0.5 + 0.1 * (i % 3))
    params.append(trial.params)
  return params


@pytest.mark.parametrize('sampler', ['random', 'tpe', 'nsga2', 'cmaes'])
def test_a_seed_repeats_a_study_and_another_seed_does_not(tmp_path, sampler):
  first = _asked_params(tmp_path / 'a', sampler, seed=3)
  assert first == _asked_params(tmp_path / 'b', sampler, seed=3)
  assert first != _asked_params(tmp_path / 'c', sampler, seed=4)
  assert len({tuple(p.values()) for p in first}) == len(first)


@pytest.mark.slow
def test_gp_fits_past_its_random_start_or_says_what_to_install(tmp_path):
  """With torch: 12 trials, the last two proposed by the fitted Gaussian process, repeat with
  their seed. Without: one line naming the package."""
  try:
    import torch  # noqa: F401
  except ImportError:
    with pytest.raises(KilnError, match='--sampler=gp needs torch'):
      study_lib.make_sampler('gp', 0, _space({LR: {'type': 'float', 'low': 1e-3, 'high': 1e-1}}))
    return
  first = _asked_params(tmp_path / 'a', 'gp', seed=3, n=12)
  assert first == _asked_params(tmp_path / 'b', 'gp', seed=3, n=12)


def test_grid_needs_values_for_continuous_params():
  space = _space({LR: {'type': 'float', 'low': 1e-3, 'high': 1e-1}})
  with pytest.raises(KilnError, match="grid sampler needs its values: add 'grid'"):
    study_lib.make_sampler('grid', 0, space)


def test_pruning_several_objectives_is_refused():
  space = _space({LR: {'type': 'float', 'low': 1e-3, 'high': 1e-1}},
                 (('accuracy', 'max'), ('model_stats.params', 'min')))
  with pytest.raises(KilnError, match='pass --pruner=none'):
    study_lib.make_pruner('median', space, tiny_config())


def test_a_dead_workers_trial_is_retried_in_its_workdir_and_the_count_holds(tmp_path):
  space = _space({LR: {'type': 'float', 'low': 1e-4, 'high': 1e-1, 'log': True}})
  spec = _spec(tmp_path, space, sampler='random')
  study = study_lib.open_study(spec)
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  first = study_lib._next_trial(study, spec, n_trials=2)
  space.suggest(first)
  first.set_user_attr(study_lib.WORKER, f'{os.uname().nodename}:{dead.pid}')
  retry = study_lib._next_trial(study, spec, n_trials=2)  # Sees trial 0's worker gone.
  trials = study.get_trials()
  assert trials[0].state == TrialState.FAIL and study_lib.ERROR not in trials[0].user_attrs
  assert retry.params == trials[0].params
  frozen = study._storage.get_trial(retry._trial_id)
  assert study_lib.origin_number(frozen) == 0 and frozen.number == 1
  study.tell(retry, 0.9)
  last = study_lib._next_trial(study, spec, n_trials=2)  # The retry took trial 0's place.
  study.tell(last, 0.8)
  assert study_lib._next_trial(study, spec, n_trials=2) is None


def _parse_train_command(command: str, monkeypatch) -> ml_collections.ConfigDict:
  """The config train.py builds from `command` (its flags parsed as train.py parses them:
  ml_collections reads the overrides from sys.argv while the flag is defined)."""
  words = shlex.split(command)
  assert words[:2] == ['python', 'train.py']
  monkeypatch.setattr(sys, 'argv', words[1:])
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=True)
  flags.DEFINE_string('workdir', None, '', flag_values=values)
  values(words[1:])
  return values.config


@pytest.mark.slow
def test_a_study_trains_prunes_fails_and_reports(tmp_path, monkeypatch):
  """Three trials, queued in order: a good rate completes; a rate 1000x too small is pruned at
  the first eval; a dropout the config rejects fails, and the study goes on. best.json's
  command reproduces the best trial's accuracy."""
  space = _space({LR: {'type': 'categorical', 'choices': (1e-2, 1e-5)},
                  'model.dropout_rate': {'type': 'categorical', 'choices': (0.0, 1.5)}})
  spec = _spec(tmp_path, space, sampler='tpe', pruner='median', pruner_startup_trials=1)
  study = study_lib.open_study(spec)
  for lr, dropout in ((1e-2, 0.0), (1e-5, 0.0), (1e-2, 1.5)):
    study.enqueue_trial({LR: lr, 'model.dropout_rate': dropout})
  study = study_lib.run_worker(spec, n_trials=3)
  best = results.write_results(study, str(tmp_path))
  complete, pruned, failed = study.get_trials()
  assert complete.state == TrialState.COMPLETE and complete.user_attrs['steps'] == 40
  assert pruned.state == TrialState.PRUNED and pruned.user_attrs['steps'] == 20
  assert pruned.intermediate_values[20] < complete.intermediate_values[20]
  assert failed.state == TrialState.FAIL and 'dropout_rate' in failed.user_attrs['error']
  assert best['trials'] == {'complete': 1, 'pruned': 1, 'fail': 1}
  assert best['total_steps'] == 60 and best['best']['trial'] == 0
  with open(tmp_path / results.TRIALS_CSV) as f:
    rows = list(csv.DictReader(f))
  assert [r['state'] for r in rows] == ['COMPLETE', 'PRUNED', 'FAIL']
  assert float(rows[0]['accuracy']) == complete.value
  assert os.path.getsize(tmp_path / results.PLOTS['history']) > 10_000
  # The printed command is what train.py would run: the trial's config, the same accuracy.
  monkeypatch.chdir(REPO)
  config = _parse_train_command(best['best']['command'], monkeypatch)
  assert config.to_dict() == space_lib.apply_overrides(
      tiny_config(), {LR: 1e-2, 'model.dropout_rate': 0.0}).to_dict()
  again = train_and_evaluate(config, str(tmp_path / 'again'))
  assert again['final_eval']['accuracy'] == pytest.approx(complete.value, abs=1e-6)


@pytest.mark.slow
def test_nsga2_returns_a_pareto_front_and_draws_it(tmp_path):
  space = _space({'model.dense_features': {'type': 'categorical', 'choices': (4, 64)}},
                 (('accuracy', 'max'), ('model_stats.params', 'min')))
  spec = _spec(tmp_path, space, sampler='nsga2', pruner='none', population_size=2)
  spec.config.num_train_steps = spec.config.eval_every_steps = 10
  study = study_lib.open_study(spec)
  for width in (4, 64):
    study.enqueue_trial({'model.dense_features': width})
  best = results.write_results(study_lib.run_worker(spec, n_trials=2), str(tmp_path))
  front = best['pareto_front']
  assert front and all(study_lib.OVERRIDES in t or 'overrides' in t for t in front)
  values = [(t['values']['accuracy'], t['values']['model_stats.params']) for t in front]
  for a in values:  # No member of the front is dominated by another.
    assert not any(b != a and b[0] >= a[0] and b[1] <= a[1] for b in values)
  assert min(v[1] for v in values) == min(t.values[1] for t in study.trials)
  assert os.path.getsize(tmp_path / results.PLOTS['pareto']) > 10_000


# A study whose trials differ only in the seed: every trial after the first reuses the
# compiled steps, so the test pays for processes and storage, not compiles.
SEED_STUDY_CONFIG = """
from tests.tiny import tiny_config


def get_config():
  c = tiny_config()
  c.num_train_steps = 200  # Long enough to be killed after a checkpoint, before the end.
  c.eval_every_steps = 100  # Two evals a trial.
  c.checkpoint_every_steps = 20  # A killed trial has a checkpoint to resume from.
  return c


def get_search_space():
  return {'params': {'seed': {'type': 'int', 'low': 0, 'high': 1000000}},  # Init and data order.
          'objectives': (('accuracy', 'max'),)}  # Held-out accuracy.
"""


def _tune_command(study_dir, n_trials):
  return [sys.executable, str(REPO / 'tune.py'), f'--config={study_dir}/seed_study.py',
          f'--study_dir={study_dir}', f'--n_trials={n_trials}', '--sampler=random',
          '--pruner=none']


@pytest.mark.slow
def test_two_workers_share_a_study_and_a_killed_one_is_replaced(tmp_path):
  """Two tune.py processes on one journal; one is killed mid-trial and started again: the
  study ends with exactly N finished trials, none twice, and the killed trial's retry resumed
  from its checkpoint."""
  n = 3
  (tmp_path / 'seed_study.py').write_text(SEED_STUDY_CONFIG)
  env = dict(os.environ)
  logs = [open(tmp_path / f'worker{i}.log', 'w') for i in range(3)]
  workers = [subprocess.Popen(_tune_command(tmp_path, n), cwd=REPO, env=env, stdout=logs[i],
                              stderr=subprocess.STDOUT) for i in range(2)]
  storage = None
  victim_trial = None
  deadline = time.monotonic() + 240
  while victim_trial is None and time.monotonic() < deadline:
    time.sleep(0.1)
    if storage is None and os.path.exists(tmp_path / study_lib.JOURNAL_FILE):
      storage = study_lib.storage_for(str(tmp_path))
    if storage is None:
      continue
    try:
      study = optuna.load_study(study_name='kiln', storage=storage)
    except KeyError:
      continue
    for t in study.get_trials(states=(TrialState.RUNNING,)):
      workdir = t.user_attrs.get(study_lib.WORKDIR, '')
      ckpt = os.path.join(workdir, 'checkpoints')
      if (t.user_attrs.get(study_lib.WORKER, '').endswith(f':{workers[0].pid}')
          and os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))):
        victim_trial = t
  assert victim_trial is not None, 'worker 0 never started a trial'
  workers[0].send_signal(signal.SIGKILL)
  workers[0].wait()
  workers.append(subprocess.Popen(_tune_command(tmp_path, n), cwd=REPO, env=env, stdout=logs[2],
                                  stderr=subprocess.STDOUT))
  for w in workers[1:]:
    assert w.wait(timeout=400) == 0, (tmp_path / 'worker1.log').read_text()[-2000:]
  study = optuna.load_study(study_name='kiln', storage=study_lib.storage_for(str(tmp_path)))
  trials = study.get_trials()
  done = [t for t in trials if t.state == TrialState.COMPLETE]
  assert len(done) == n
  assert len({t.params['seed'] for t in done}) == n
  killed = [t for t in trials if t.number == victim_trial.number][0]
  assert killed.state == TrialState.FAIL and study_lib.ERROR not in killed.user_attrs
  retry = [t for t in done if study_lib.retry_of(t) == victim_trial.number]
  assert len(retry) == 1 and retry[0].params == killed.params
  assert retry[0].user_attrs[study_lib.WORKDIR] == killed.user_attrs[study_lib.WORKDIR]
  log = '\n'.join((tmp_path / f'worker{i}.log').read_text() for i in (1, 2))
  assert 'Resumed from step' in log
  with open(tmp_path / results.BEST_JSON) as f:
    assert json.load(f)['trials'] == {'complete': n, 'pruned': 0, 'fail': 1}


CANDIDATE_CONFIG = """
from tests.tiny import tiny_config


def get_config():
  c = tiny_config()
  c.num_train_steps = -1  # Lengths come from select's epoch budgets.
  c.eval_every_steps = 1000  # One eval, at the end.
  {model}
  return c
"""


@pytest.mark.slow
def test_successive_halving_ranks_equal_budgets_and_repeats_with_its_seed(tmp_path):
  """A CNN and a one-hidden-unit MLP on the digits: the first round trains both for half the
  budget, the better goes on to the full budget; the leaderboard is the same when run again."""
  from tune import selection
  paths = []
  for name, model in (('cnn', "c.model.dense_features = 32  # Tiny."),
                      ('mlp1', "c.model = c.model.__class__({'name': 'mlp', "
                               "'hidden_features': (1,)})  # One hidden unit: a poor model.")):
    path = tmp_path / f'{name}.py'
    path.write_text(CANDIDATE_CONFIG.format(model=model))
    paths.append(str(path))
  candidates = selection.load_candidates(paths)
  assert selection.round_budgets(2, 1.0) == [0.5, 1.0]
  board = selection.successive_halving(candidates, 1.0, str(tmp_path / 'a'), seed=1)
  assert [r['candidate'] for r in board] == ['cnn', 'mlp1']
  assert [r['round'] for r in board] == [1, 0] and board[0]['epochs'] == 1.0
  assert abs(board[0]['steps'] - 2 * board[1]['steps']) <= 1  # Epochs: twice the examples.
  assert board[0]['params'] > board[1]['params'] and board[0]['latency_ms_per_example'] > 0
  text = selection.write_leaderboard(board, str(tmp_path / 'a'), 'accuracy')
  assert text.splitlines()[2].startswith('| 1 | cnn | 1 |')
  again = selection.successive_halving(candidates, 1.0, str(tmp_path / 'b'), seed=1)
  keys = ('candidate', 'round', 'steps', 'val_accuracy', 'params', 'seed')
  assert [{k: r[k] for k in keys} for r in again] == [{k: r[k] for k in keys} for r in board]
  # The full-budget check trains only the candidate the halving stopped early.
  full = selection.full_budget_best(candidates, 1.0, str(tmp_path / 'a'), seed=1, board=board)
  by_name = {r['candidate']: r for r in full}
  assert by_name['cnn']['workdir'] == board[0]['workdir']
  assert not (tmp_path / 'a' / 'full' / 'cnn').exists()
  assert by_name['mlp1']['steps'] == board[0]['steps']  # Now at the full budget.


def test_candidates_must_share_task_and_data(tmp_path):
  from tune import selection
  with pytest.raises(KilnError, match='give two or more'):
    selection.load_candidates([str(REPO / 'configs/default.py')])
  with pytest.raises(KilnError, match='same task and dataset'):
    selection.load_candidates([str(REPO / 'configs/default.py'),
                               str(REPO / 'configs/mnist_cnn.py')])


@pytest.mark.slow  # A heartbeat must go stale: seconds of waiting.
def test_a_database_url_opens_an_rdb_study_with_heartbeats(tmp_path, monkeypatch):
  """An RDB (SQLite here; PostgreSQL or MySQL across hosts) holds the same study, with the
  heartbeat that fails a dead host's trials; other URLs are refused in one line."""
  storage = study_lib.storage_for(str(tmp_path), f'sqlite:///{tmp_path}/study.db')
  assert isinstance(storage, optuna.storages.RDBStorage) and storage.heartbeat_interval == 60
  space = _space({LR: {'type': 'float', 'low': 1e-4, 'high': 1e-1, 'log': True}})
  spec = _spec(tmp_path, space, sampler='random', storage_url=f'sqlite:///{tmp_path}/study.db')
  monkeypatch.setattr(study_lib, 'GRACE_SECONDS', 1)  # A host silent for 1 s counts as gone.
  study = study_lib.open_study(spec)
  trial = study_lib._next_trial(study, spec, n_trials=1)
  trial.set_user_attr(study_lib.WORKER, 'another-host:1')  # Its pid cannot be checked here.
  storage.record_heartbeat(trial._trial_id)  # Its last pulse; then its host falls silent.
  time.sleep(2.5)  # SQLite's clock counts whole seconds: 2.5 s reads as 2 or 3 > the 1 s grace.
  retry = study_lib._next_trial(study, spec, n_trials=1)  # Failed by the heartbeat, requeued.
  assert study.get_trials()[0].state == TrialState.FAIL and retry.params == trial.params
  study.tell(retry, 0.5)
  assert study_lib._next_trial(study_lib.open_study(spec), spec, n_trials=1) is None
  with pytest.raises(KilnError, match="use postgresql://, mysql://"):
    study_lib.storage_for(str(tmp_path), 'redis://localhost')


@pytest.mark.slow
def test_a_signal_mid_trial_requeues_it_and_the_next_worker_resumes_it(tmp_path, monkeypatch,
                                                                      caplog):
  """SIGINT (or a scheduler's SIGTERM) during a trial: the loop checkpoints, the worker marks the
  trial interrupted, queues it again and stops; the next worker resumes it from that step."""
  space = _space({LR: {'type': 'categorical', 'choices': (1e-2,)}})
  spec = _spec(tmp_path, space, sampler='random', pruner='none')
  hear = study_lib._EvalListener.__call__

  def signal_at_first_eval(self, step, metrics):
    os.kill(os.getpid(), signal.SIGINT)  # Handled by the loop's Preemption: no exception.
    return hear(self, step, metrics)
  monkeypatch.setattr(study_lib._EvalListener, '__call__', signal_at_first_eval)
  study = study_lib.run_worker(spec, n_trials=1)
  first, retry = study.get_trials()
  assert first.state == TrialState.FAIL and study_lib.ERROR not in first.user_attrs
  assert retry.state == TrialState.WAITING and study_lib.retry_of(retry) == 0
  monkeypatch.setattr(study_lib._EvalListener, '__call__', hear)
  # absl's logger, not only the root: a test that parsed absl flags leaves it at WARNING.
  caplog.set_level('INFO', logger='absl')
  study = study_lib.run_worker(spec, n_trials=1)
  assert 'Resumed from step 20' in caplog.text
  retry = study.get_trials()[1]
  assert retry.state == TrialState.COMPLETE and retry.user_attrs['steps'] == 40
  assert retry.user_attrs[study_lib.WORKDIR] == first.user_attrs[study_lib.WORKDIR]
