"""Keep freed host memory in the process, so that XLA's CPU runtime stops page-faulting.

XLA's CPU runtime allocates each execution's temporary and output buffers afresh, and
glibc's malloc hands blocks that large straight to mmap and back to the kernel on free
(by default every block over 32 MB; a thread's own arena maps blocks over 64 MB even with
mmap switched off). So every training step faulted its temporaries in again, page by
page: the ResNet-18 32x32 batch-128 step maps and frees one 111 MB block per step, 88,000
page faults and ~200 ms of kernel time per step, more than its ~160 ms of compute
(resource.getrusage around 10 steps; strace shows the mmap/munmap pair). With freed
memory kept in one heap the same step faults no pages after warm-up: 540-680 -> 1,300-1,575
images/s on 2 cores, peak RSS 1.34 -> 1.40 GB.

The price: the process keeps its peak heap until it exits (memory freed late in a run is
not returned to the system), and all threads share one malloc arena, so threads that
allocate at once wait on its lock. Measured with benchmarks/throughput.py and
gpt_throughput.py, glibc's defaults vs kept, same hour: MNIST CNN 1,301 -> 1,643-1,769
images/s, detector 648 -> 881-895, RNN-T Conformer 104 -> 152-153 utterances/s, BiLSTM CTC
228 -> 260-268; the digits CNN within noise; the GPT CPU config (23-30 ms steps of many
small allocations, 4x the context switches: threads waiting on the arena's lock, with or
without Kiln's kernels) 25,000-32,000 -> 23,000-28,000 tokens/s; XLA's multi-threaded
compiles wait too (two speech tests 36 -> 47 s, so tests/conftest.py keeps glibc's
defaults for the compile-bound suite). Per-thread arenas kept the GPT config's speed but
map blocks over 64 MB anyway (the ResNet step: 29,000 faults per step, ~1,150 images/s). On GPU and TPU hosts the big buffers live on the device, so
'auto' keeps memory only where no accelerator plugin for JAX is installed.

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
