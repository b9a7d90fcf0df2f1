"""Reads what a run left in its workdir."""

from loop.checkpoint import Checkpointer


def latest_params(workdir: str) -> dict:
  """The parameters of the newest checkpoint in `workdir`, as NumPy arrays (whatever the
  mesh or number of processes that wrote it)."""
  reader = Checkpointer(workdir, reading=True)
  try:
    return reader.read_host(reader.latest_step())['params']
  finally:
    reader.close()
