"""Declarative constraints on config fields, checked before a run writes anything.

A constraint is a numeric range, a set of choices, a flag, or an explicit "free-form"
marker (paths, split names, rules tables); tables of them are keyed by dotted field path
('optimizer.adam.b1'). Every failure is a one-line KilnError that names the field
(`config.<path>=<value>`) and how to fix it.
"""

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping

from core.errors import KilnError


def _is_number(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _flat(value):
  """The numbers of a (nested) tuple/list, in order."""
  if isinstance(value, (tuple, list)):
    for item in value:
      yield from _flat(item)
  else:
    yield value


@dataclasses.dataclass(frozen=True)
class Range:
  """A finite number within [low, high] (either end open or absent); `integer` asks for a
  whole number, `nonzero` rejects 0 (e.g. -1 = "derive it", 0 meaningless), `each` asks the
  field for a (nested) tuple whose every number lies in the range."""
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  integer: bool = False
  nonzero: bool = False
  each: bool = False

  def interval(self) -> str:
    lo = '' if self.low is None else f"{'(' if self.low_open else '['}{self.low}"
    hi = '' if self.high is None else f"{self.high}{')' if self.high_open else ']'}"
    if self.low is not None and self.high is not None:
      text = f'in {lo}, {hi}'
    elif self.low is not None:
      text = f"{'>' if self.low_open else '>='} {self.low}"
    elif self.high is not None:
      text = f"{'<' if self.high_open else '<='} {self.high}"
    else:
      text = 'that is finite'
    return text + (' other than 0' if self.nonzero else '')

  def contains(self, value) -> bool:
    if not _is_number(value) or (self.integer and not isinstance(value, numbers.Integral)):
      return False
    if self.nonzero and value == 0:
      return False
    if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
      return False
    return self.high is None or (value < self.high if self.high_open else value <= self.high)

  def check(self, path: str, value, config=None):
    if self.each:
      if not isinstance(value, (tuple, list)) or not all(self.contains(v) for v in _flat(value)):
        kind = 'whole numbers' if self.integer else 'numbers'
        raise KilnError(f'config.{path}={value!r} is out of range: set it to a tuple of {kind} '
                        f'{self.interval()}')
      return value
    if not self.contains(value):
      kind = 'a whole number' if self.integer else 'a number'
      right_type = _is_number(value) and (not self.integer or isinstance(value, numbers.Integral))
      problem = 'is out of range' if right_type else f'is not {kind}'
      raise KilnError(f'config.{path}={value!r} {problem}: set it to {kind} {self.interval()}')
    return value

  def bad_value(self):
    """A value of the field's type outside the range (what the field test sets)."""
    if self.low is not None:
      bad = self.low if self.low_open else self.low - 1
    elif self.high is not None:
      bad = self.high if self.high_open else self.high + 1
    else:
      bad = math.nan
    if self.integer and not self.each:
      bad = math.floor(bad)
    return (bad,) if self.each else bad


@dataclasses.dataclass(frozen=True)
class Choices:
  """One of a fixed set of strings. `values` may be a function of the whole config (names
  resolved from a registry, e.g. the task's eval metrics); `prefixes` (a tuple or such a
  function) also accept '<prefix><anything>' (e.g. 'tfds:' for any TFDS dataset name);
  `vet(value)`, if given, is the registry's own check, run first so that its message (which
  names the field too) is the one users already know."""
  values: tuple[str, ...] | Callable[..., Iterable[str]]
  prefixes: tuple[str, ...] | Callable[..., Iterable[str]] = ()
  vet: Callable[[str], None] | None = None

  def names(self, config=None) -> tuple[str, ...]:
    return tuple(self.values(config) if callable(self.values) else self.values)

  def check(self, path: str, value, config=None):
    if self.vet is not None and isinstance(value, str):
      self.vet(value)
    names = self.names(config)
    prefixes = tuple(self.prefixes(config) if callable(self.prefixes) else self.prefixes)
    ok = isinstance(value, str) and (
        value in names or any(value.startswith(p) and len(value) > len(p) for p in prefixes))
    if not ok:
      listed = ', '.join(repr(n) for n in names)
      listed += ''.join(f" or '{p}<name>'" for p in prefixes)
      raise KilnError(f'unknown config.{path}={value!r}: set it to one of {listed}')
    return value


@dataclasses.dataclass(frozen=True)
class Flag:
  """True or False."""

  def check(self, path: str, value, config=None):
    if not isinstance(value, bool):
      raise KilnError(f'config.{path}={value!r} is not a flag: set it to True or False')
    return value


@dataclasses.dataclass(frozen=True)
class Free:
  """Deliberately unconstrained here (a path, a split name, a rules table): `why` says what
  checks it later; `check_fn(path, value)`, if given, still vets its form."""
  why: str
  check_fn: Callable[[str, object], None] | None = None

  def check(self, path: str, value, config=None):
    if self.check_fn is not None:
      self.check_fn(path, value)
    return value


def regex(path: str, value) -> None:
  """A Free check: `value` must compile as a regular expression."""
  try:
    re.compile(value)
  except (re.error, TypeError) as e:
    raise KilnError(f'config.{path}={value!r} is not a regular expression ({e}): fix the '
                    'pattern') from e


Constraint = Range | Choices | Flag | Free

# The common ones, named once.
FLAG = Flag()
POSITIVE_INT = Range(1, integer=True)
NON_NEGATIVE_INT = Range(0, integer=True)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)  # [0, 1]
RATE = Range(0, 1, high_open=True)  # [0, 1): dropout rates, decays that must forget.
OPEN_FRACTION = Range(0, 1, low_open=True, high_open=True)  # (0, 1)
SEED = Range(0, 2**32 - 1, integer=True)


def leaves(config, prefix: str = '') -> Iterable[tuple[str, object]]:
  """(dotted path, value) of every non-dict leaf of a ConfigDict (or plain mapping)."""
  for key in config.keys():
    value = config[key]
    path = f'{prefix}{key}'
    if isinstance(value, Mapping) or hasattr(value, 'keys') and hasattr(value, 'items'):
      yield from leaves(value, path + '.')
    else:
      yield path, value


def check_fields(config, table: Mapping[str, Constraint], prefix: str = '',
                 context=None) -> list[str]:
  """Checks every leaf of `config` that `table` constrains (paths relative to `config`,
  reported as config.<prefix><path>); returns the paths of leaves the table lacks."""
  missing = []
  for path, value in leaves(config):
    constraint = table.get(path)
    if constraint is None:
      missing.append(prefix + path)
    else:
      constraint.check(prefix + path, value, context)
  return missing
