"""Starting a run from another run's parameters, e.g. a classifier from a masked-LM encoder.

The other run's newest checkpoint is read as host NumPy, whatever mesh, strategy or
number of processes wrote it; leaves are matched by path and shape. Nothing here knows
devices: `place` puts the result back in any layout the caller names.
"""

import os

import jax
import numpy as np
from absl import logging

from core.errors import KilnError
from core.paths import path_string
from loop.checkpoint import Checkpointer


def _open(checkpoint_dir: str) -> Checkpointer:
  """The checkpoints of the run in `checkpoint_dir` (its workdir, or the workdir's
  checkpoints folder), opened for reading, or a KilnError if it has none."""
  if os.path.isdir(os.path.abspath(os.path.expanduser(checkpoint_dir))):
    reader = Checkpointer(checkpoint_dir, reading=True)
    if reader.latest_step() is not None:
      return reader
    reader.close()
  raise KilnError(f"no checkpoint found in '{checkpoint_dir}': set config.init.checkpoint_dir "
                  'to the workdir of a finished run (or empty to start from scratch)')


def newest_step(checkpoint_dir: str) -> int:
  """The step of the newest checkpoint in `checkpoint_dir`; a cheap check before a run
  writes anything."""
  reader = _open(checkpoint_dir)
  try:
    return reader.latest_step()
  finally:
    reader.close()


def read_params(checkpoint_dir: str) -> tuple[int, dict]:
  """(step, params as a nested dict of NumPy arrays) of the newest checkpoint in
  `checkpoint_dir`, whatever wrote it. List indices (e.g. of layer blocks) come back as
  string keys."""
  reader = _open(checkpoint_dir)
  try:
    step = reader.latest_step()
    state = reader.read_host(step)
  finally:
    reader.close()
  if 'params' not in state:
    raise KilnError(f"checkpoint {step} in '{checkpoint_dir}' holds no 'params': point "
                    'config.init.checkpoint_dir at a Kiln run')
  return step, state['params']


def _joined(prefix: tuple) -> str:
  return '/'.join(str(key) for key in prefix)


def merge_params(params: dict, source: dict, source_prefix: tuple = (), target_prefix: tuple = ()
                 ) -> tuple[dict, tuple[str, ...], tuple[str, ...]]:
  """(params with leaves taken from `source`, loaded paths, kept paths).

  The target leaf at target_prefix/rest takes the source leaf at source_prefix/rest (cast
  to the target's dtype); target leaves outside target_prefix, or without a source leaf,
  are returned as they were (the same objects). Target leaves need only .shape and .dtype
  where they will be replaced.
  """
  source_leaves = {path_string(path): leaf
                   for path, leaf in jax.tree_util.tree_flatten_with_path(source)[0]}
  source_root, target_root = _joined(source_prefix), _joined(target_prefix)
  loaded, kept = [], []

  def take(path, leaf):
    target = path_string(path)
    if target_root and not (target + '/').startswith(target_root + '/'):
      kept.append(target)
      return leaf
    rest = target[len(target_root):].lstrip('/')
    name = '/'.join(part for part in (source_root, rest) if part)
    if name not in source_leaves:
      kept.append(target)
      return leaf
    value = source_leaves[name]
    if tuple(value.shape) != tuple(leaf.shape):
      raise KilnError(f"pretrained '{name}' has shape {tuple(value.shape)} but '{target}' has "
                      f'{tuple(leaf.shape)}: use the model size, tokenizer and seq_len of the '
                      'run in config.init.checkpoint_dir')
    loaded.append(target)
    return np.asarray(value, dtype=leaf.dtype)

  merged = jax.tree_util.tree_map_with_path(take, params)
  if not loaded:
    where = f" under '{source_root}'" if source_root else ''
    raise KilnError(f'no parameter of this model matches the checkpoint{where} by path: point '
                    'config.init.checkpoint_dir at a run of the same model family')
  return merged, tuple(loaded), tuple(kept)


def load_pretrained(params: dict, checkpoint_dir: str, source_prefix: tuple = (),
                    target_prefix: tuple = ()) -> dict:
  """`params` with every leaf that the newest checkpoint in `checkpoint_dir` has (same path
  relative to the prefixes, same shape) replaced by a NumPy copy of it; leaves it lacks
  (e.g. a new classification head) are kept as they were. Logs which were loaded and kept."""
  step, source = read_params(checkpoint_dir)
  merged, loaded, kept = merge_params(params, source, source_prefix, target_prefix)
  logging.info('Loaded %d parameter arrays from step %d of %s; kept %d as initialized: %s',
               len(loaded), step, checkpoint_dir, len(kept), ', '.join(kept) or 'none')
  return merged


def place(params: dict, shardings) -> dict:
  """NumPy leaves put on the devices in the layout of the matching `shardings` leaf (every
  process holds the whole array, so this works across hosts); device arrays pass through."""
  def put(leaf, sharding):
    if isinstance(leaf, jax.Array):
      return leaf
    return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])
  return jax.tree.map(put, params, shardings)
