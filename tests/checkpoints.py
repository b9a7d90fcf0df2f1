"""Reads what a run left in its workdir."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def latest_params(workdir: str) -> dict:
  """The parameters of the newest checkpoint in `workdir`, as NumPy arrays (whatever the
  mesh or number of processes that wrote it)."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  path = os.path.join(workdir, 'checkpoints', str(manager.latest_step()), 'state')
  manager.close()
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))['params']
