"""Every run's config, saved in its workdir as config.json, so that a later run (a
distillation student, an export or a server) can rebuild its model without the command line
that trained it."""

import json
import os

import ml_collections

from core.io import write_json_atomic

CONFIG_FILE = 'config.json'  # Inside a run's workdir.


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `config` to workdir/config.json (tuples become JSON lists)."""
  write_json_atomic(os.path.join(workdir, CONFIG_FILE), config.to_dict())


def _tuples(value):
  """JSON lists back to the tuples Kiln configs hold (model.features, parallel.rules, ...)."""
  if isinstance(value, dict):
    return {key: _tuples(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(item) for item in value)
  return value


def path(workdir: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), CONFIG_FILE)


def load(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in `workdir`; FileNotFoundError if it saved none."""
  with open(path(workdir)) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))
