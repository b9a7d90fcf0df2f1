"""Reads what a run left in its workdir."""

from loop.checkpoint import Checkpointer


def latest_state(workdir: str) -> dict:
  """The whole train state of the newest checkpoint in `workdir`, as NumPy arrays (whatever
  the mesh or number of processes that wrote it)."""
  reader = Checkpointer(workdir, reading=True)
  try:
    return reader.read_host(reader.latest_step())
  finally:
    reader.close()


def latest_params(workdir: str) -> dict:
  """The parameters of the newest checkpoint in `workdir`, as NumPy arrays."""
  return latest_state(workdir)['params']
