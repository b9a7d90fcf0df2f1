"""Orbax checkpoints of the train state plus a small JSON of loop bookkeeping.

Each finished checkpoint folder gets a SHA-256 manifest (core/integrity.py), written once
Orbax has renamed the folder into place: at the next save, `wait_until_finished` or `close`.
Every read checks it first. A process killed between a save and the next one leaves that
newest checkpoint without a manifest; it loads unverified (logged), as older runs' do.
"""

import contextlib
import dataclasses
import functools
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
# Private, but where Orbax's default jax.Array handler takes its metadata store from.
from orbax.checkpoint._src.metadata import array_metadata_store

from absl import logging

from core import integrity
from core.errors import KilnError
from loop.state import TrainState
from core.paths import path_string

CHECKPOINTS_FOLDER = 'checkpoints'  # Inside a run's workdir.
# TrainState fields that are bookkeeping, not learned: a checkpoint without them resumes with
# them fresh (the numerics guard's loss window, which runs with the guard off never store).
FRESH_WHEN_MISSING = ('guard',)


@functools.cache  # Once per process: a handler the user registers later stays in place.
def _save_each_array_whole_on_cpu() -> None:
  """On the CPU backend, Orbax saves an array from one replica instead of slicing it across all
  of them ("replica-parallel", its default off GPU): a process's CPU devices share one host
  memory, so the slices bought no bandwidth and cost a dispatch each. The tiny test run's
  state on 8 devices: 434 slices per save; its 30 steps with 15 saves 10.2 -> 7.6 s. Orbax
  keeps this choice in its global registry of type handlers; the handler is otherwise its
  default one (the same per-array metadata store, so checkpoints hold the same files)."""
  if jax.default_backend() == 'cpu':
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()),
        override=True)


class CorruptCheckpoint(KilnError):
  """A checkpoint whose layout matches but whose files cannot be read, or differ from its
  manifest."""


class Checkpointer:
  """The one way Kiln touches Orbax: a CheckpointManager with the same two item handlers for
  saving, resuming and reading another run's checkpoints (pre-trained weights, tests)."""

  def __init__(self, workdir: str, keep: int | None = None, *, reading: bool = False):
    """Checkpoints of the run in `workdir`, kept `keep` at a time. With `reading`, `workdir`
    may also be the checkpoints folder itself, and nothing is created or saved there (so
    another run's folder is left as it was)."""
    folder = os.path.abspath(os.path.expanduser(workdir))
    if not reading or os.path.isdir(os.path.join(folder, CHECKPOINTS_FOLDER)):
      folder = os.path.join(folder, CHECKPOINTS_FOLDER)
    _save_each_array_whole_on_cpu()
    # Not Orbax's read_only option: it logs a warning on every open.
    options = (ocp.CheckpointManagerOptions(create=False) if reading else
               ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    # Handlers named up front so that a checkpoint's metadata can be read before restoring.
    self.manager = ocp.CheckpointManager(folder, options=options, item_handlers={
        'state': ocp.StandardCheckpointHandler(), 'loop': ocp.JsonCheckpointHandler()})
    self._unsigned: list[int] = []  # Saved steps whose manifest waits for Orbax to finish.

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, loop_state: dict) -> None:
    """Saves asynchronously; the next save or `close` waits for this one. A write that fails
    (a full disk, a folder gone read-only) raises a one-line KilnError; Orbax writes into a
    temporary folder and renames it, so earlier checkpoints stay as they were."""
    self.wait_until_finished()  # Orbax waits for the previous save here anyway.
    with self._write_errors(step):
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop_state)), force=True)
    self._unsigned.append(step)

  def wait_until_finished(self) -> None:
    """Waits for pending saves, then writes the manifest of each (process 0 only: every
    process sees the same folder)."""
    with self._write_errors(self._unsigned[-1] if self._unsigned else self.latest_step()):
      self.manager.wait_until_finished()
      unsigned, self._unsigned = self._unsigned, []
      for step in unsigned:
        folder = self._step_folder(step)
        if jax.process_index() == 0 and os.path.isdir(folder):  # Not yet deleted by `keep`.
          integrity.write_manifest(folder)

  def _step_folder(self, step: int) -> str:
    return os.path.join(str(self.manager.directory), str(step))

  def _verify(self, step: int) -> None:
    """Checks checkpoint `step` against its manifest: a changed, missing or added file raises
    CorruptCheckpoint naming it."""
    self.wait_until_finished()  # A save of this very step may still be pending.
    try:
      integrity.verify(self._step_folder(step), f"checkpoint {step} in '{self.manager.directory}'",
                       'delete the step (resuming then continues from the one before)')
    except integrity.TamperedArtifact as error:
      raise CorruptCheckpoint(str(error)) from None

  @contextlib.contextmanager
  def _write_errors(self, step):
    try:
      yield
    except Exception as error:  # noqa: BLE001  Orbax wraps the OSError in its own types.
      cause = error
      while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
      if cause is None:
        raise
      raise KilnError(f"a checkpoint (step {step}) could not be written in "
                      f"'{self.manager.directory}' ({cause.strerror or cause}): free disk space or "
                      'pass a writable --workdir (earlier checkpoints are intact)') from error

  def restore(self, step: int, abstract_state: TrainState, shardings: TrainState):
    """Restores onto the devices directly in the layout given by `shardings`; a checkpoint
    written by another model or optimizer raises a KilnError naming the first difference."""
    self._verify(step)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
    try:
      stored = self.manager.item_metadata(step)['state']
    except Exception as error:  # noqa: BLE001  Metadata unreadable: the files are bad.
      raise CorruptCheckpoint(f"checkpoint {step} in '{self.manager.directory}' has unreadable "
                              f"metadata ({' '.join(str(error).split())[:200]})") from error
    stored_shapes = _shapes_by_path(stored)
    held = {path.split('/')[0] for path in stored_shapes}
    # A checkpoint that holds no leaves for a field in FRESH_WHEN_MISSING (written before the
    # field existed, or with its feature off) starts that field afresh: `abstract_state`'s.
    fresh = {name: getattr(abstract_state, name) for name in FRESH_WHEN_MISSING
             if getattr(target, name) is not None and name not in held}
    target = target.replace(**{name: None for name in fresh})
    # Checked before restoring: a failed Orbax restore also floods stderr from its I/O threads.
    difference = _difference(stored_shapes, target)
    if difference is None:
      try:
        # Restored as a dict of the fields the checkpoint stores: a run from before a
        # TrainState field existed (Group DRO's 'fairness') stored no key for it at all, which
        # a TrainState target always has. The others keep the target's value (None: checked).
        item = {field.name: getattr(target, field.name) for field in dataclasses.fields(target)
                if field.name in stored}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(item), loop=ocp.args.JsonRestore()))
      except Exception as error:  # noqa: BLE001  The layout matched: the files are bad.
        raise CorruptCheckpoint(
            f"checkpoint {step} in '{self.manager.directory}' cannot be read "
            f"({' '.join(str(error).split())[:200]})") from error
      return target.replace(**{**restored['state'], **fresh}), restored['loop']
    raise KilnError(f"checkpoint {step} in '{self.manager.directory}' was not written by this "
                    f'model and optimizer ({difference}): resume with the config that wrote it, '
                    'or pass a new --workdir')

  def restore_newest(self, abstract_state: TrainState, shardings: TrainState):
    """(state, loop state) of the newest readable checkpoint. One that cannot be read (a
    truncated or corrupted write) or whose files differ from its manifest is moved aside to
    `<workdir>/corrupt_checkpoints/`, with a warning naming its step and the file, and the
    one before it is tried."""
    while True:
      step = self.latest_step()
      try:
        return self.restore(step, abstract_state, shardings)
      except CorruptCheckpoint as error:
        if jax.process_index() == 0:
          aside = os.path.join(os.path.dirname(str(self.manager.directory)),
                               'corrupt_checkpoints', str(step))
          os.makedirs(os.path.dirname(aside), exist_ok=True)
          shutil.rmtree(aside, ignore_errors=True)
          shutil.move(os.path.join(str(self.manager.directory), str(step)), aside)
        self.manager.reload()
        older = self.latest_step()
        if older is None:
          raise KilnError(f'{error}, and no earlier checkpoint is left: delete '
                          f"'{self.manager.directory}' to start again") from error
        logging.warning('%s: moved aside; resuming from checkpoint %d instead', error, older)

  def read_host(self, step: int) -> dict:
    """The train state of checkpoint `step` as a nested dict of host NumPy arrays, whatever
    mesh, strategy or number of processes wrote it; list indices (e.g. of layer blocks) come
    back as string keys. The whole state is read: StandardRestore restores whole trees only.
    A checkpoint whose files differ from its manifest raises CorruptCheckpoint."""
    self._verify(step)
    stored = self.manager.item_metadata(step)['state'].tree
    # NumPy targets, not ShapeDtypeStructs: those take the writer's sharding from the
    # metadata, which names devices this process may not have.
    target = jax.tree.map(lambda leaf: np.empty(leaf.shape, leaf.dtype), stored)
    return self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))['state']

  def close(self) -> None:
    try:
      self.wait_until_finished()
    finally:
      self.manager.close()


def _shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
  """'params/blocks/0/kernel'-style path -> shape of every array leaf."""
  return {path_string(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(leaf, 'shape')}


def _difference(stored: dict, target) -> str | None:
  """The first leaf whose shape or presence differs between a checkpoint (`stored`: shapes by
  path) and `target`."""
  wanted = _shapes_by_path(target)
  for path, shape in wanted.items():
    if path in stored and stored[path] != shape:
      return f'{path} is {stored[path]} there, {shape} here'
  for path in wanted:
    if path not in stored:
      return f'it has no {path}'
  for path in stored:
    if path not in wanted:
      return f'it has {path}, which this model lacks'
  return None
