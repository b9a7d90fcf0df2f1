"""Everything that exists only to make a backend fast; models reach it through backends.ops.

Importing this package starts nothing (no JAX): scripts call `configure_host()` first.
"""

import importlib


def installed_cpu():
  """The backends.cpu package, or None where that folder is deleted (plain XLA then)."""
  # importlib, not `from backends import cpu`: that form reports a missing folder as a bare
  # ImportError, indistinguishable from a broken import inside the package.
  try:
    return importlib.import_module('backends.cpu')
  except ModuleNotFoundError as error:
    if error.name != 'backends.cpu':
      raise
    return None


def configure_host(may_restart: bool = False) -> None:
  """Host settings that must precede JAX and TensorFlow (backends.cpu.host_memory: a bad
  KILN_HOST_MALLOC exits with one line); nothing when backends/cpu/ is absent. Scripts pass
  `may_restart=__name__ == '__main__'`: run as a program, the process may re-execute itself
  once, at this call, to get glibc's huge pages (host_memory.configure); imported, never."""
  if installed_cpu() is not None:
    from backends.cpu import host_memory
    host_memory.configure(may_restart)
