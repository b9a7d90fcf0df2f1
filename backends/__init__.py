"""Everything that exists only to make a backend fast; models reach it through backends.ops.

Importing this package starts nothing (no JAX): scripts call `configure_host()` first.
"""


def configure_host() -> None:
  """Host settings that must precede JAX and TensorFlow (backends.cpu.host_memory: a bad
  KILN_HOST_MALLOC exits with one line); nothing when backends/cpu/ is absent."""
  try:
    from backends.cpu import host_memory
  except ModuleNotFoundError as error:
    if error.name != 'backends.cpu':
      raise
    return
  host_memory.configure()
