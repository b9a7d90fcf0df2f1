"""Every field of every config is range- or choice-checked before a run writes anything.

For each config file in configs/ and each of its leaves: a numeric field set out of its
range, or a string choice set to 'no_such_value', must fail loop.fields.validate with a
one-line KilnError naming the field; every leaf must have a constraint (a new field
without one fails here). Two end-to-end runs of train.py check the bugs this closed.
"""

import importlib
import math
import subprocess
import sys

import pytest

from core import fields as F
from core.errors import KilnError
from loop import fields
from models import registry as model_registry
from tests.tiny import REPO

# Every config module and the function that builds it; base.py alone is no runnable config
# (its task's family adds fields), so it is covered through every file that extends it.
FAMILY_BASES = {'vision': 'get_vision_config', 'detection': 'get_detection_config',
                'language': 'get_language_config', 'speech': 'get_speech_config'}
CONFIG_FILES = sorted(p.stem for p in (REPO / 'configs').glob('*.py')
                      if p.stem not in ('__init__', 'base'))


def _load(stem):
  module = importlib.import_module(f'configs.{stem}')
  return getattr(module, FAMILY_BASES.get(stem, 'get_config'))()


def _constraint(config, path):
  if path.startswith('model.'):
    return model_registry.field_constraints(config.model).get(path[len('model.'):])
  return fields.table(config).get(path)


def _set(config, path, value):
  *parents, key = path.split('.')
  node = config
  for name in parents:
    node = node[name]
  old = node[key]
  node[key] = value
  return node, key, old


def _bad_values(config):
  """(path, bad value) for every numeric and choice leaf of `config`."""
  for path, value in F.leaves(config):
    constraint = _constraint(config, path)
    if isinstance(constraint, F.Range):
      yield path, constraint.bad_value()
    elif isinstance(constraint, F.Choices):
      yield path, 'no_such_value'


def test_every_config_file_is_covered():
  assert len(CONFIG_FILES) >= 19 and {'default', *FAMILY_BASES} <= set(CONFIG_FILES)
  missing_getter = [s for s in CONFIG_FILES
                    if not hasattr(importlib.import_module(f'configs.{s}'),
                                   FAMILY_BASES.get(s, 'get_config'))]
  assert not missing_getter


@pytest.mark.parametrize('stem', CONFIG_FILES)
def test_every_leaf_has_a_constraint_and_the_config_is_valid(stem):
  config = _load(stem)
  assert fields.unconstrained(config) == [], (
      f'configs/{stem}.py has fields without a constraint: add each to its family table in '
      'loop/fields.py (or its model class\'s CONFIG_FIELDS), as F.Free if free-form')


@pytest.mark.parametrize('stem', CONFIG_FILES)
def test_every_out_of_range_value_is_a_one_line_error_naming_the_field(stem):
  config = _load(stem)
  checked, numeric, choices = [], 0, 0
  for path, bad in list(_bad_values(config)):
    node, key, old = _set(config, path, bad)
    try:
      with pytest.raises(KilnError) as error:
        fields.validate(config)
    except pytest.fail.Exception:
      raise AssertionError(f'config.{path}={bad!r} passed validation in configs/{stem}.py')
    finally:
      node[key] = old
    message = str(error.value)
    assert '\n' not in message, message
    assert f'config.{path}' in message, (path, message)
    checked.append(path)
    numeric += not isinstance(bad, str)
    choices += isinstance(bad, str)
  fields.validate(config)  # Restored: valid again.
  # Run-wide fields alone give ~60 numeric and ~8 choice fields per config.
  assert numeric >= 50 and choices >= 6, (stem, numeric, choices)


def test_range_and_choice_messages():
  with pytest.raises(KilnError, match=r'config.a.b=1.5 is out of range: set it to a number in '
                                      r'\[0, 1\)'):
    F.RATE.check('a.b', 1.5)
  with pytest.raises(KilnError, match='set it to a whole number >= 1'):
    F.POSITIVE_INT.check('n', 2.0)
  with pytest.raises(KilnError, match='not a flag'):
    F.FLAG.check('f', 1)
  with pytest.raises(KilnError, match=r"unknown config.c='x': set it to one of 'a', 'b'"):
    F.Choices(('a', 'b')).check('c', 'x')
  F.Choices(('a',), ('tfds:',)).check('c', 'tfds:mnist')
  with pytest.raises(KilnError, match='other than 0'):
    F.Range(-1, integer=True, nonzero=True).check('mesh.data', 0)
  with pytest.raises(KilnError, match='tuple of whole numbers >= 1'):
    F.Range(1, integer=True, each=True).check('model.features', (8, 0))
  assert math.isnan(F.Range().bad_value())


def test_a_family_field_on_another_family_names_the_base_to_start_from():
  config = _load('default')
  config.task = 'speech_ctc'
  with pytest.raises(KilnError, match=r'config.audio.* is missing.*configs/speech.py'):
    fields.validate(config)


@pytest.mark.slow  # Each case starts train.py in a fresh interpreter.
@pytest.mark.parametrize('config_file, flag, expected', [
    ('configs/gpt_shakespeare_char_cpu.py', '--config.model.positions=foo',
     "unknown config.model.positions='foo'"),
    ('configs/default.py', '--config.model.dropout_rate=1.5',
     'config.model.dropout_rate=1.5 is out of range'),
])
def test_known_bad_model_fields_fail_train_py_in_one_line(tmp_path, config_file, flag, expected):
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, 'train.py', f'--config={config_file}', f'--workdir={workdir}', flag],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={'PATH': '', 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
           'JAX_PLATFORMS': 'cpu'})
  assert result.returncode != 0
  error_lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(error_lines) == 1 and expected in error_lines[0], result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == error_lines[0]
  assert 'Traceback' not in result.stderr
  assert not workdir.exists()
