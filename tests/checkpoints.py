"""Reads what a run left in its workdir."""

import os

import orbax.checkpoint as ocp


def latest_params(workdir: str) -> dict:
  """The parameters of the newest checkpoint in `workdir`, as NumPy arrays."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = manager.latest_step()
  restored = ocp.PyTreeCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', str(step), 'state'))
  manager.close()
  return restored['params']
