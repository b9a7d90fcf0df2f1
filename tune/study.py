"""One Optuna study shared by any number of workers: storage, samplers, pruners, the trial.

Each trial is a `train_and_evaluate` in `<study_dir>/trials/<number>`, told every eval so that
the pruner can stop it. Workers on one machine share a journal file in the study dir (Optuna's
JournalFileStorage: appends under a lock, safe for parallel writers); workers on many
machines share an RDB (`--storage=postgresql://...`), whose heartbeats fail the trials of a
worker that died. On one machine, a worker that died is seen by its pid instead: its running
trial is marked failed (interrupted) and enqueued again, and the retry resumes from the dead
trial's newest checkpoint.
"""

import contextlib
import dataclasses
import fcntl
import math
import os
import socket
import traceback
import warnings

import ml_collections
import numpy as np
import optuna
from absl import logging
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import TrialState

from core.errors import KilnError
from loop.training import train_and_evaluate
from tune.space import SearchSpace, apply_overrides

SAMPLERS = ('tpe', 'gp', 'cmaes', 'nsga2', 'random', 'grid')
PRUNERS = ('median', 'median_all', 'hyperband', 'none')
JOURNAL_FILE = 'journal.log'  # The default storage, inside the study dir.
TRIALS_DIR = 'trials'  # Each trial's workdir: <study_dir>/trials/<number>.
_RDB_SCHEMES = ('postgresql', 'mysql', 'sqlite')
HEARTBEAT_SECONDS = 60  # RDB storages: a worker's pulse while it trains.
GRACE_SECONDS = 180  # RDB storages: silence after which a running trial counts as dead.

# Trial user attributes.
ERROR = 'error'  # Why a trial failed (a bad sample, a non-finite objective, an exception).
WORKER = 'worker'  # host:pid of the worker that runs it.
STEPS = 'steps'  # Train steps it ran (pruned trials stop early).
WORKDIR = 'workdir'
OVERRIDES = 'overrides'  # Its config overrides, as the config holds them (tuples as lists).


def storage_for(study_dir: str, url: str = '') -> optuna.storages.BaseStorage:
  """The journal file in `study_dir`, or the database at `url`."""
  if not url:
    os.makedirs(study_dir, exist_ok=True)
    path = os.path.join(study_dir, JOURNAL_FILE)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
  scheme = url.split(':', 1)[0].split('+', 1)[0]
  if scheme not in _RDB_SCHEMES:
    raise KilnError(f"--storage='{url}': use postgresql://, mysql:// (many hosts) or sqlite:/// "
                    '(one process), or leave it empty for the journal file in --study_dir')
  try:
    with warnings.catch_warnings():  # Experimental since Optuna 2.8; pinned by pyproject.
      warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
      retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    return optuna.storages.RDBStorage(
        url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
        heartbeat_stale_trial_callback=retry)
  except (ImportError, ModuleNotFoundError) as e:
    raise KilnError(f"--storage='{url}': {e}: install its driver (psycopg2-binary or pymysql)"
                    ) from None


def make_sampler(name: str, seed: int, space: SearchSpace, population_size: int = 0
                 ) -> optuna.samplers.BaseSampler:
  several = len(space.objectives) > 1
  if name == 'tpe':  # constant_liar: running trials count as bad, so parallel workers spread.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
  if name == 'gp':
    try:
      import torch  # noqa: F401  Optuna's GP sampler fits its kernel with torch.
    except ImportError:
      raise KilnError('--sampler=gp needs torch (Optuna fits the Gaussian process with it): '
                      'pip install torch (the CPU build suffices), or pick another --sampler'
                      ) from None
    return optuna.samplers.GPSampler(seed=seed)
  if name == 'cmaes':
    if several:
      raise KilnError('--sampler=cmaes optimises one objective: use nsga2 (or tpe) for '
                      f'{len(space.objectives)}')
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
  if name == 'nsga2':
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size or 50)
  if name == 'random':
    return optuna.samplers.RandomSampler(seed=seed)
  if name == 'grid':
    return optuna.samplers.GridSampler(space.grid(), seed=seed)
  raise KilnError(f"--sampler='{name}': choose one of {', '.join(SAMPLERS)}")


def make_pruner(name: str, space: SearchSpace, config, startup_trials: int = 5,
                warmup_steps: int = 0, interval_steps: int = 1) -> optuna.pruners.BasePruner:
  if name == 'none':
    return optuna.pruners.NopPruner()
  if name not in PRUNERS:
    raise KilnError(f"--pruner='{name}': choose one of {', '.join(PRUNERS)}")
  if len(space.objectives) > 1 or not space.objectives[0].is_eval_metric:
    raise KilnError(f'--pruner={name} needs one eval-metric objective (Optuna prunes on a single '
                    'reported value): pass --pruner=none')
  for flag, value, unit in (('pruner_startup_trials', startup_trials, 'trials'),
                            ('pruner_warmup_steps', warmup_steps, 'train steps')):
    if value < 0:
      raise KilnError(f'--{flag}={value}: it counts {unit}: pass 0 or more')
  if interval_steps < 1:
    raise KilnError(f'--pruner_interval_steps={interval_steps}: it counts train steps between '
                    'judgements: pass 1 or more (1: every eval)')
  if interval_steps != 1 and name != 'median':
    raise KilnError(f'--pruner_interval_steps={interval_steps} is an option of --pruner=median '
                    f"(Optuna's MedianPruner), not of {name}: drop it or pass --pruner=median")
  if name == 'median':  # Vizier's median stopping rule as Optuna has it (README, tune section).
    # interval_steps: judged at the first eval at or after warm-up + k * interval only.
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials,
                                       n_warmup_steps=warmup_steps,
                                       interval_steps=interval_steps)
  if name == 'median_all':  # Keeps late starters; costs more steps (README: both on digits).
    return MedianOfAllPruner(startup_trials, warmup_steps)
  return optuna.pruners.HyperbandPruner(min_resource=max(config.eval_every_steps, warmup_steps),
                                        max_resource='auto')


class MedianOfAllPruner(optuna.pruners.BasePruner):
  """Stops a trial whose best value so far is worse than the median of all earlier finished
  trials at the same step, a trial pruned before that step counting as worse than any that
  reached it (it was stopped for being behind).

  The median stopping rule (Golovin et al. 2017, Google Vizier; Optuna's MedianPruner,
  `--pruner=median`) takes the median of completed trials alone. Once pruning starts those
  are the survivors of every earlier check, so its bar is the median of the better half, and it
  climbs as TPE concentrates on good regions. On the digits space that pruned exactly the best
  trials: high learning rates lag the leaders at the first evals (peak rate, not yet decayed)
  and pass them late, and TPE then learned that high rates were bad. The price is that more
  trials complete: 63-72% of random search's steps there, against 37-57% for Optuna's rule
  (`median`), which matched random search's best on seeds 0 and 2 and ended one held-out
  image short on seed 1 (README, tune section).
  """

  def __init__(self, startup_trials: int = 5, warmup_steps: int = 0):
    self.startup_trials = startup_trials  # Trials that complete before any is pruned.
    self.warmup_steps = warmup_steps  # No trial is judged before this train step.

  def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    step = trial.last_step
    if step is None or step < self.warmup_steps:
      return False
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if sum(t.state == TrialState.COMPLETE for t in finished) < self.startup_trials:
      return False
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    behind = -math.inf if maximize else math.inf
    reference = []
    for t in finished:
      value = t.intermediate_values.get(step)
      if value is None and t.state == TrialState.PRUNED and (t.last_step or 0) < step:
        value = behind
      if value is not None and not math.isnan(value):  # A complete trial with another eval
        reference.append(value)                         # cadence says nothing at this step.
    ours = [v for v in trial.intermediate_values.values() if not math.isnan(v)]
    if not reference or not ours:  # Nothing to compare (non-finite values fail elsewhere).
      return False
    median = float(np.median(reference))
    return max(ours) < median if maximize else min(ours) > median


class _PerTrialSeed(optuna.samplers.BaseSampler):
  """Wraps a sampler so that trial k draws from a generator seeded by (seed, k): a study run
  twice with one worker repeats itself, and parallel workers (which share the seed) never
  propose the same random points."""

  def __init__(self, inner: optuna.samplers.BaseSampler, seed: int):
    self._inner, self._seed = inner, seed

  def _reseed(self, number: int) -> None:
    generators, seen, stack = [], set(), [self._inner]
    while stack:  # The sampler's generators and those of the samplers it holds.
      obj = stack.pop()
      if id(obj) in seen:
        continue
      seen.add(id(obj))
      for value in vars(obj).values():
        if isinstance(value, LazyRandomState):
          generators.append(value)
        elif isinstance(value, optuna.samplers.BaseSampler):
          stack.append(value)
    for i, generator in enumerate(generators):
      generator.rng.seed(np.random.SeedSequence([self._seed, number, i]).generate_state(1)[0])

  def before_trial(self, study, trial):
    self._inner.before_trial(study, trial)
    self._reseed(trial.number)

  def infer_relative_search_space(self, study, trial):
    return self._inner.infer_relative_search_space(study, trial)

  def sample_relative(self, study, trial, search_space):
    return self._inner.sample_relative(study, trial, search_space)

  def sample_independent(self, study, trial, param_name, param_distribution):
    return self._inner.sample_independent(study, trial, param_name, param_distribution)

  def after_trial(self, study, trial, state, values):
    self._inner.after_trial(study, trial, state, values)

  def reseed_rng(self) -> None:
    self._inner.reseed_rng()


@dataclasses.dataclass
class StudySpec:
  """What every worker of a study agrees on."""
  config_path: str
  config: ml_collections.ConfigDict  # The config file's, with the command line's overrides.
  config_overrides: tuple[str, ...]  # The command line's --config.KEY=VALUE (best.json's command).
  space: SearchSpace
  study_dir: str
  study_name: str
  storage_url: str = ''
  sampler: str = 'tpe'
  pruner: str = 'median'
  seed: int = 0
  population_size: int = 0
  pruner_startup_trials: int = 5  # median*: trials that finish unpruned before pruning starts.
  pruner_warmup_steps: int = 0  # median*: no trial is judged before this step (hyperband: min).
  pruner_interval_steps: int = 1  # median: judged every this many steps from the warm-up on.


def open_study(spec: StudySpec) -> optuna.Study:
  """The study, created on first use (a second creator loads it instead)."""
  sampler = make_sampler(spec.sampler, spec.seed, spec.space, spec.population_size)
  pruner = make_pruner(spec.pruner, spec.space, spec.config, spec.pruner_startup_trials,
                       spec.pruner_warmup_steps, spec.pruner_interval_steps)
  study = optuna.create_study(
      storage=storage_for(spec.study_dir, spec.storage_url), study_name=spec.study_name,
      sampler=_PerTrialSeed(sampler, spec.seed), pruner=pruner, load_if_exists=True,
      directions=[o.optuna_direction for o in spec.space.objectives])
  wanted = [o.optuna_direction for o in spec.space.objectives]
  have = ['maximize' if d == optuna.study.StudyDirection.MAXIMIZE else 'minimize'
          for d in study.directions]
  if have != wanted:
    raise KilnError(f"study '{spec.study_name}' exists with directions {have}, the search space "
                    f'asks {wanted}: use another --study_dir or --study_name')
  if 'config_path' not in study.user_attrs:
    study.set_user_attr('config_path', spec.config_path)
    study.set_user_attr('config_overrides', list(spec.config_overrides))
    study.set_user_attr('objectives', [[o.name, o.direction] for o in spec.space.objectives])
  return study


def _this_worker() -> str:
  return f'{socket.gethostname()}:{os.getpid()}'


def _is_dead_here(worker: str | None) -> bool:
  """True for a worker of this host whose process is gone."""
  if not worker or worker.rsplit(':', 1)[0] != socket.gethostname():
    return False
  try:
    os.kill(int(worker.rsplit(':', 1)[1]), 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # Alive, another user's.
    return False
  return False


def _is_interrupted(trial: optuna.trial.FrozenTrial) -> bool:
  """A failed trial that no error explains: its worker died or was stopped (it is retried)."""
  return trial.state == TrialState.FAIL and ERROR not in trial.user_attrs


def _retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
  """Marks a dead worker's running trial interrupted and enqueues its params again."""
  try:
    study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
  except optuna.exceptions.UpdateFinishedTrialError:
    return  # Another worker got there first.
  logging.info('Trial %d: its worker %s stopped; marked interrupted and queued again',
               trial.number, trial.user_attrs.get(WORKER))
  with warnings.catch_warnings():  # Experimental since Optuna 2.8; pinned by pyproject.
    warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
  retry(study, study._storage.get_trial(trial._trial_id))


def retry_of(trial) -> int | None:
  """The number of the interrupted trial that `trial` retries, if it is a retry."""
  with warnings.catch_warnings():  # Experimental since Optuna 2.8; pinned by pyproject.
    warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
    return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def origin_number(trial) -> int:
  """The number of the trial whose workdir this one uses (a retry resumes its original's)."""
  original = retry_of(trial)
  return trial.number if original is None else original


def trial_workdir(study_dir: str, number: int) -> str:
  return os.path.join(study_dir, TRIALS_DIR, f'{number:04d}')


@contextlib.contextmanager
def _study_lock(spec: StudySpec):
  """Serialises 'count, then ask' among the workers of one machine, so that a study of N trials
  gets exactly N; workers on many hosts (an RDB) may add one trial per extra worker."""
  os.makedirs(spec.study_dir, exist_ok=True)
  with open(os.path.join(spec.study_dir, '.ask.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _next_trial(study: optuna.Study, spec: StudySpec, n_trials: int) -> optuna.Trial | None:
  """A new (or re-queued) trial, or None once the study has its N trials."""
  with _study_lock(spec):
    if is_heartbeat_enabled(study._storage):  # An RDB: trials of silent hosts fail and requeue.
      with warnings.catch_warnings():
        warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
      if trial.state == TrialState.RUNNING and _is_dead_here(trial.user_attrs.get(WORKER)):
        _retry(study, trial)
    trials = study.get_trials(deepcopy=False)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    counted = sum(t.state != TrialState.WAITING and not _is_interrupted(t) for t in trials)
    if not waiting and counted >= n_trials:
      return None
    with warnings.catch_warnings():  # run_worker runs the heartbeat that Study.optimize would.
      warnings.filterwarnings('ignore', message='Heartbeat of storage is supposed')
      trial = study.ask()
    trial.set_user_attr(WORKER, _this_worker())
    return trial


class _EvalListener:
  """Hears every eval of a trial: reports the objective to the pruner and stops a run whose
  metrics turned non-finite (diverged: a failed trial, not a pruned one)."""

  def __init__(self, trial: optuna.Trial, spec: StudySpec):
    objective = spec.space.objectives[0]
    self._trial = trial
    self._metric = (objective.name if len(spec.space.objectives) == 1
                    and objective.is_eval_metric else None)
    self.diverged: str | None = None

  def __call__(self, step: int, metrics: dict[str, float]) -> bool:
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
      self.diverged = f'diverged: eval {", ".join(bad)} not finite at step {step}'
      return True
    if self._metric is None:
      return False
    self._trial.report(metrics[self._metric], step)
    return self._trial.should_prune()


def run_trial(study: optuna.Study, trial: optuna.Trial, spec: StudySpec) -> TrialState | None:
  """Trains one trial and tells the study how it ended; None when a SIGTERM/SIGINT stopped it
  (the loop checkpointed it; it is marked interrupted and queued again, to resume there)."""
  frozen = study._storage.get_trial(trial._trial_id)
  workdir = trial_workdir(spec.study_dir, origin_number(frozen))
  trial.set_user_attr(WORKDIR, workdir)
  try:
    overrides = spec.space.suggest(trial)
    trial.set_user_attr(OVERRIDES, {k: list(v) if isinstance(v, tuple) else v
                                    for k, v in overrides.items()})
    config = apply_overrides(spec.config, overrides)
    logging.info('Trial %d in %s: %s', trial.number, workdir, overrides)
    listener = _EvalListener(trial, spec)
    summary = train_and_evaluate(config, workdir, on_eval=listener)
  except KilnError as e:  # A sample the config rejects: a failed trial, and the study goes on.
    return _fail(study, trial, f'{e}')
  except (KeyboardInterrupt, SystemExit):
    _retry(study, study._storage.get_trial(trial._trial_id))
    raise
  except Exception as e:  # noqa: BLE001  Any other crash fails this trial, not the study.
    logging.warning('Trial %d crashed:\n%s', trial.number, traceback.format_exc())
    return _fail(study, trial, f'{type(e).__name__}: {e}')
  if summary.get('preempted'):
    _retry(study, study._storage.get_trial(trial._trial_id))
    return None
  trial.set_user_attr(STEPS, int(summary['steps']))
  trial.set_user_attr('train_time_s', summary['train_time_s'])
  if listener.diverged:
    return _fail(study, trial, listener.diverged)
  if summary.get('halted'):
    study.tell(trial, state=TrialState.PRUNED)
    logging.info('Trial %d pruned at step %d', trial.number, summary['steps'])
    return TrialState.PRUNED
  values = [o.value(summary) for o in spec.space.objectives]
  if not all(math.isfinite(v) for v in values):
    return _fail(study, trial, f'non-finite objective {values}')
  study.tell(trial, values)
  logging.info('Trial %d finished: %s', trial.number,
               dict(zip([o.name for o in spec.space.objectives], values)))
  return TrialState.COMPLETE


def _fail(study: optuna.Study, trial: optuna.Trial, error: str) -> TrialState:
  trial.set_user_attr(ERROR, error)
  study.tell(trial, state=TrialState.FAIL)
  logging.warning('Trial %d failed: %s', trial.number, error)
  return TrialState.FAIL


def run_worker(spec: StudySpec, n_trials: int) -> optuna.Study:
  """Runs trials until the study (all workers together) holds `n_trials`."""
  study = open_study(spec)
  while (trial := _next_trial(study, spec, n_trials)) is not None:
    # An RDB's heartbeat (what Study.optimize runs around each trial; none for a journal file).
    with get_heartbeat_thread(trial._trial_id, study._storage):
      if run_trial(study, trial, spec) is None:
        break  # Stopped by a signal: the trial waits in the study for the next worker.
  return study
