"""Orbax checkpoints of the train state plus a small JSON of loop bookkeeping."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from core.errors import KilnError
from loop.state import TrainState
from core.paths import path_string

CHECKPOINTS_FOLDER = 'checkpoints'  # Inside a run's workdir.


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
    # Not Orbax's read_only option: it logs a warning on every open.
    options = (ocp.CheckpointManagerOptions(create=False) if reading else
               ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    # Handlers named up front so that a checkpoint's metadata can be read before restoring.
    self.manager = ocp.CheckpointManager(folder, options=options, item_handlers={
        'state': ocp.StandardCheckpointHandler(), 'loop': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, loop_state: dict) -> None:
    """Saves asynchronously; the next save or `close` waits for this one."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop_state)), force=True)

  def restore(self, step: int, abstract_state: TrainState, shardings: TrainState):
    """Restores onto the devices directly in the layout given by `shardings`; a checkpoint
    written by another model or optimizer raises a KilnError naming the first difference."""
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
    # Checked before restoring: a failed Orbax restore also floods stderr from its I/O threads.
    difference = self._difference(step, target)
    if difference is None:
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), loop=ocp.args.JsonRestore()))
        return restored['state'], restored['loop']
      except (ValueError, KeyError, TypeError) as error:
        difference = ' '.join(str(error).split())[:300]
    raise KilnError(f"checkpoint {step} in '{self.manager.directory}' was not written by this "
                    f'model and optimizer ({difference}): resume with the config that wrote it, '
                    'or pass a new --workdir')

  def _difference(self, step: int, target) -> str | None:
    """The first leaf whose shape or presence differs between the checkpoint and `target`."""
    try:
      stored = _shapes_by_path(self.manager.item_metadata(step)['state'])
    except Exception:  # Metadata unreadable here: let the restore itself judge.
      return None
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

  def read_host(self, step: int) -> dict:
    """The train state of checkpoint `step` as a nested dict of host NumPy arrays, whatever
    mesh, strategy or number of processes wrote it; list indices (e.g. of layer blocks) come
    back as string keys. The whole state is read: StandardRestore restores whole trees only."""
    stored = self.manager.item_metadata(step)['state'].tree
    # NumPy targets, not ShapeDtypeStructs: those take the writer's sharding from the
    # metadata, which names devices this process may not have.
    target = jax.tree.map(lambda leaf: np.empty(leaf.shape, leaf.dtype), stored)
    return self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))['state']

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
  """'params/blocks/0/kernel'-style path -> shape of every array leaf."""
  return {path_string(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(leaf, 'shape')}
