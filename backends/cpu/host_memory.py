"""Keep freed host memory in the process, so that XLA's CPU runtime stops page-faulting.

XLA's CPU runtime allocates each execution's temporary and output buffers afresh, and
glibc's malloc hands blocks that large straight to mmap and back to the kernel on free
(by default every block over 32 MB; a thread's own arena maps blocks over 64 MB even with
mmap switched off). So every training step faulted its temporaries in again, page by
page, and a large step spent more time in the kernel's page-fault handler than in its
own arithmetic (resource.getrusage around a few steps; strace shows the mmap/munmap
pair). With freed memory kept in one heap the same step faults no pages after warm-up.

The price: the process keeps its peak heap until it exits (memory freed late in a run is
not returned to the system), and all threads share one malloc arena, so threads that
allocate at once wait on its lock: steps made of many small allocations (the GPT CPU
config) and XLA's multi-threaded compiles get slower, which is why tests/conftest.py keeps
glibc's defaults for the compile-bound suite. Per-thread arenas would avoid the lock but
map the largest blocks anyway. The figures of both sides are in benchmarks/README.md
("host memory"). On GPU and TPU hosts the big buffers live on the device, so 'auto' keeps
memory only where no accelerator plugin for JAX is installed.

Scripts call `configure()` before anything starts threads (before importing JAX,
TensorFlow or CLU; importing JAX starts one): a thread keeps the arena it first
allocated from, so arenas made before the call stay in use.
"""

import ctypes
import importlib.util
import os
import platform

from core.errors import KilnError

MODE_ENV = 'KILN_HOST_MALLOC'
MODES = ('auto', 'keep', 'system')
# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER_TRIM = 2**31 - 1  # The largest value mallopt takes (an int): free never trims.
# Packages that give JAX a GPU or TPU backend (the CUDA and ROCm plugins live under
# jax_plugins; TPU VMs install libtpu).
_ACCELERATOR_PACKAGES = ('jax_plugins', 'libtpu')


def mode() -> str:
  """KILN_HOST_MALLOC: 'auto' (default: keep on hosts without an accelerator plugin),
  'keep' (always), 'system' (leave glibc's defaults)."""
  chosen = os.environ.get(MODE_ENV, 'auto')
  if chosen not in MODES:
    raise KilnError(f'{MODE_ENV}={chosen!r} is not one of {", ".join(MODES)}: unset it or '
                    f'pick one ({MODES[0]} is the default)')
  return chosen


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse (no mmap'd blocks, no trimming, one
  arena) when `mode()` says so; True if it did. A no-op on other C libraries."""
  chosen = mode()
  if chosen == 'system':
    return False
  if chosen == 'auto' and any(importlib.util.find_spec(name) is not None
                              for name in _ACCELERATOR_PACKAGES):
    return False
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # Every setting is needed: without mmap'd blocks a thread's own arena still maps blocks
  # over 64 MB, and the one arena left would still return its top to the system on free.
  settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM), (_M_ARENA_MAX, 1))
  return all(mallopt(parameter, value) == 1 for parameter, value in settings)


def configure() -> None:
  """`keep_freed_memory()` for a script's first lines: a bad KILN_HOST_MALLOC exits with one
  line instead of a traceback."""
  try:
    keep_freed_memory()
  except KilnError as e:
    raise SystemExit(f'error: {e}') from None
