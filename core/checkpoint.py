"""Orbax checkpoints of the train state plus a small JSON of loop bookkeeping."""

import os

import jax
import orbax.checkpoint as ocp

from core.state import TrainState


class Checkpointer:
  def __init__(self, workdir: str, keep: int):
    self.manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, loop_state: dict) -> None:
    """Saves asynchronously; the next save or `close` waits for this one."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop_state)), force=True)

  def restore(self, step: int, abstract_state: TrainState, shardings: TrainState):
    """Restores onto the devices directly in the layout given by `shardings`."""
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), loop=ocp.args.JsonRestore()))
    return restored['state'], restored['loop']

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
