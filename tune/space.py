"""A search space declared next to the config it tunes, read and checked before any trial runs.

A config file may define `get_search_space()` beside `get_config()`, returning a dict:

  {'params': {'optimizer.learning_rate': {'type': 'float', 'low': 1e-4, 'high': 3e-2,
                                          'log': True},
              'model.dense_features': {'type': 'categorical', 'choices': (32, 64, 128)}},
   'objectives': (('accuracy', 'max'),)}

Each param names a config key (dotted path); 'float' and 'int' take `low`, `high`, optional
`log` and `step` (and `grid`, the values the grid sampler tries); 'categorical' takes
`choices` (any config values, tuples included). Each objective is an eval metric of the task
or a `model_stats.<key>` of the run's summary, with 'max' or 'min'.
"""

import ast
import dataclasses
import importlib.util
import math
import os
from typing import Any

import ml_collections
import optuna

from core.errors import KilnError
from tasks import create_task

_TYPES = ('float', 'int', 'categorical')
_KEYS = {'float': {'type', 'low', 'high', 'log', 'step', 'grid'},
         'int': {'type', 'low', 'high', 'log', 'step', 'grid'},
         'categorical': {'type', 'choices'}}
_MODEL_STATS = ('params', 'nonzero_params', 'sparsity', 'bytes_dense', 'bytes_sparse')
_OPTUNA_CHOICE_TYPES = (type(None), bool, int, float, str)  # What optuna stores as it is.


@dataclasses.dataclass(frozen=True)
class Param:
  key: str  # Dotted config path.
  kind: str  # 'float', 'int' or 'categorical'.
  low: float | None = None
  high: float | None = None
  log: bool = False
  step: float | None = None
  choices: tuple = ()
  grid: tuple = ()  # Values the grid sampler tries (categorical: its choices).

  def _encoded(self) -> bool:  # Optuna stores only plain scalars: tuples go in by index.
    return any(not isinstance(c, _OPTUNA_CHOICE_TYPES) for c in self.choices)

  def suggest(self, trial: optuna.Trial):
    """A value sampled for `trial`, as the config holds it."""
    if self.kind == 'float':
      return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
    if self.kind == 'int':
      return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log,
                               step=int(self.step or 1))
    return self.decode(trial.suggest_categorical(self.key, self.optuna_choices()))

  def optuna_choices(self) -> tuple:
    return tuple(str(c) for c in self.choices) if self._encoded() else self.choices

  def decode(self, value):
    """The config value of an optuna parameter value."""
    if self.kind == 'categorical' and self._encoded():
      return self.choices[self.optuna_choices().index(value)]
    return value

  def grid_values(self) -> tuple:
    if self.kind == 'categorical':
      return self.optuna_choices()
    if not self.grid:
      raise KilnError(f"search space param '{self.key}': the grid sampler needs its values: add "
                      "'grid': (v1, v2, ...) to it, or pick another --sampler")
    return self.grid


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str  # An eval metric, or 'model_stats.<key>'.
  direction: str  # 'max' or 'min'.

  @property
  def optuna_direction(self) -> str:
    return 'maximize' if self.direction == 'max' else 'minimize'

  @property
  def is_eval_metric(self) -> bool:
    return not self.name.startswith('model_stats.')

  def value(self, summary: dict) -> float:
    """This objective's value in a run's summary.json."""
    if self.is_eval_metric:
      return float(summary['final_eval'][self.name])
    return float(summary['model_stats'][self.name.split('.', 1)[1]])


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  params: tuple[Param, ...]
  objectives: tuple[Objective, ...]

  def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
    """The trial's config overrides: one sampled value per param."""
    return {p.key: p.suggest(trial) for p in self.params}

  def grid(self) -> dict[str, tuple]:
    return {p.key: p.grid_values() for p in self.params}


def load_config_module(path: str):
  """The config file at `path` as a module (the way ml_collections' config_flags loads it)."""
  if not os.path.isfile(path):
    raise KilnError(f"config file '{path}' does not exist: pass an existing file to --config")
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'kiln_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def read_search_space(config_path: str, config: ml_collections.ConfigDict,
                      objectives: tuple | None = None) -> SearchSpace:
  """The config file's get_search_space(), checked against `config` (the file's config with
  any command-line overrides), its objectives replaced by `objectives` when given; a one-line
  KilnError names any problem."""
  module = load_config_module(config_path)
  if not hasattr(module, 'get_search_space'):
    raise KilnError(f"'{config_path}' defines no get_search_space(): add one beside get_config() "
                    '(see tune/space.py for its form)')
  raw = dict(module.get_search_space())
  if objectives is not None:
    raw['objectives'] = objectives
  return parse_search_space(raw, config)


def parse_search_space(raw: dict, config: ml_collections.ConfigDict) -> SearchSpace:
  if not isinstance(raw, dict) or set(raw) - {'params', 'objectives'} or 'params' not in raw:
    raise KilnError("get_search_space() must return {'params': {...}, 'objectives': ((metric, "
                    "'max' or 'min'), ...)}")
  if not raw['params']:
    raise KilnError("get_search_space()['params'] is empty: name at least one config key to tune")
  params = tuple(_param(key, spec, config) for key, spec in raw['params'].items())
  objectives = tuple(_objective(o, config) for o in raw.get('objectives', (('accuracy', 'max'),)))
  if not objectives:
    raise KilnError("get_search_space()['objectives'] is empty: name an eval metric and 'max' "
                    "or 'min'")
  return SearchSpace(params, objectives)


def config_value(config: ml_collections.ConfigDict, key: str):
  """config['a.b.c'], or a one-line error naming the unknown part."""
  node = config
  for i, part in enumerate(key.split('.')):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = '.'.join(key.split('.')[:i]) or 'the config'
      raise KilnError(f"search space key '{key}': {where} has no field '{part}': name an "
                      'existing config field')
    node = node[part]
  return node


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
  """`KEY=VALUE` flags as a dict: values are Python literals (1e-3, (8, 16), True), else strings."""
  out = {}
  for pair in pairs:
    key, sep, value = pair.partition('=')
    if not sep:
      raise KilnError(f"--set='{pair}': give KEY=VALUE")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value  # A bare string.
  return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]
                    ) -> ml_collections.ConfigDict:
  """A copy of `config` with each dotted key set (keys must exist; types as the field's)."""
  config = ml_collections.ConfigDict(config.to_dict())  # Deep copy, tuples kept.
  for key, value in overrides.items():
    config_value(config, key)
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    try:
      node[leaf] = value
    except TypeError as e:
      raise KilnError(f"search space key '{key}': {e}: give values of the field's type") from None
  return config


def _param(key: str, spec: dict, config) -> Param:
  current = config_value(config, key)
  where = f"search space param '{key}'"
  if not isinstance(spec, dict) or spec.get('type') not in _TYPES:
    raise KilnError(f"{where}: give a dict with 'type' one of {', '.join(_TYPES)}")
  kind = spec['type']
  unknown = set(spec) - _KEYS[kind]
  if unknown:
    raise KilnError(f"{where}: unknown keys {sorted(unknown)} for a {kind} param: use "
                    f"{', '.join(sorted(_KEYS[kind]))}")
  if kind == 'categorical':
    choices = tuple(spec.get('choices', ()))
    if not choices:
      raise KilnError(f"{where}: 'choices' is empty: list the values to try")
    if len({str(c) for c in choices}) != len(choices):
      raise KilnError(f"{where}: 'choices' repeats a value: list each value once")
    return Param(key, kind, choices=choices)
  if 'low' not in spec or 'high' not in spec:
    raise KilnError(f"{where}: a {kind} param needs 'low' and 'high'")
  low, high, log, step = spec['low'], spec['high'], bool(spec.get('log', False)), spec.get('step')
  if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
    raise KilnError(f"{where}: empty range [{low}, {high}]: 'low' must be below 'high'")
  if log and low <= 0:
    raise KilnError(f"{where}: log scale needs a positive range, got low={low}: raise 'low' above "
                    'zero or drop log')
  if log and step is not None:
    raise KilnError(f"{where}: 'step' and 'log' exclude each other: drop one")
  if kind == 'int' and not all(float(v).is_integer() for v in (low, high, step or 1)):
    raise KilnError(f"{where}: an int param needs integer 'low', 'high' and 'step'")
  if kind == 'int' and isinstance(current, float):
    raise KilnError(f"{where}: config field is a float: use type 'float'")
  if kind == 'float' and isinstance(current, int) and not isinstance(current, bool):
    raise KilnError(f"{where}: config field is an int: use type 'int'")
  grid = tuple(spec.get('grid', ()))
  outside = [v for v in grid if not low <= v <= high]
  if outside:
    raise KilnError(f"{where}: grid values {outside} lie outside [{low}, {high}]")
  return Param(key, kind, low=low, high=high, log=log, step=step, grid=grid)


def _objective(raw, config) -> Objective:
  if not (isinstance(raw, (tuple, list)) and len(raw) == 2 and raw[1] in ('max', 'min')):
    raise KilnError(f"search space objective {raw!r}: give (metric, 'max' or 'min')")
  name = raw[0]
  if name.startswith('model_stats.'):
    if name.split('.', 1)[1] not in _MODEL_STATS:
      raise KilnError(f"search space objective '{name}': model_stats has "
                      f"{', '.join(_MODEL_STATS)}")
  else:
    metrics = create_task(config).eval_metric_names
    if name not in metrics:
      raise KilnError(f"search space objective '{name}' is not an eval metric of this task: "
                      f"choose one of {', '.join(metrics)} or model_stats.<key>")
  return Objective(name, raw[1])
