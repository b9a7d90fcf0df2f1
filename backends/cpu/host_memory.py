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

Kept memory is also asked for in transparent huge pages (2 MB) where the kernel gives them
only on request (THP 'madvise', the common default): glibc's malloc does that when started
with the tunable glibc.malloc.hugetlb=1 (glibc 2.35+), which it reads only at process
start, so a script's `configure(may_restart=True)` re-executes the process once, in place
(same PID, arguments and interpreter flags), with it set. XLA's and Kiln's CPU kernels stride across
buffers of tens of MB (the LSTM's gate rows 4 KB apart, a ResNet's activations), and 4 KB
pages made them miss the TLB: baby GPT's step 1,863 -> 1,670 ms, the LSTM step 1-9%
faster, the small configs level (benchmarks/README.md, "transparent huge pages").
KILN_HUGE_PAGES=off opts out.
"""

import ctypes
import importlib.util
import os
import platform
import sys

from core.errors import KilnError

MODE_ENV = 'KILN_HOST_MALLOC'
MODES = ('auto', 'keep', 'system')
# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER_TRIM = 2**31 - 1  # The largest value mallopt takes (an int): free never trims.
# Packages that give JAX a GPU or TPU backend (the CUDA and ROCm plugins live under
# jax_plugins; TPU VMs install libtpu).
_ACCELERATOR_PACKAGES = ('jax_plugins', 'libtpu')
HUGE_PAGES_ENV = 'KILN_HUGE_PAGES'
HUGE_PAGES_MODES = ('auto', 'off')
# glibc's malloc then asks for transparent huge pages (madvise) on all memory it gets.
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
_THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'
# Set by the restart, so that a process whose C library drops GLIBC_TUNABLES (a secure-mode
# start) restarts once, not forever.
_RESTARTED_ENV = 'KILN_HUGE_PAGES_RESTARTED'


def _choice(variable: str, choices: tuple[str, ...]) -> str:
  """$variable, one of `choices` (the first when unset); KilnError naming them otherwise."""
  chosen = os.environ.get(variable, choices[0])
  if chosen not in choices:
    raise KilnError(f'{variable}={chosen!r} is not one of {", ".join(choices)}: unset it or '
                    f'pick one ({choices[0]} is the default)')
  return chosen


def mode() -> str:
  """KILN_HOST_MALLOC: 'auto' (default: keep on hosts without an accelerator plugin),
  'keep' (always), 'system' (leave glibc's defaults)."""
  return _choice(MODE_ENV, MODES)


def _keeps() -> bool:
  """Whether `mode()` asks to keep freed memory here, on a glibc system."""
  chosen = mode()
  if chosen == 'system':
    return False
  if chosen == 'auto' and any(importlib.util.find_spec(name) is not None
                              for name in _ACCELERATOR_PACKAGES):
    return False
  return platform.system() == 'Linux' and bool(_glibc_version())


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse (no mmap'd blocks, no trimming, one
  arena) when `mode()` says so; True if it did. A no-op on other C libraries."""
  if not _keeps():
    return False
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # Every setting is needed: without mmap'd blocks a thread's own arena still maps blocks
  # over 64 MB, and the one arena left would still return its top to the system on free.
  settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM), (_M_ARENA_MAX, 1))
  return all(mallopt(parameter, value) == 1 for parameter, value in settings)


def huge_pages_mode() -> str:
  """KILN_HUGE_PAGES: 'auto' (default: huge pages wherever freed memory is kept) or 'off'."""
  return _choice(HUGE_PAGES_ENV, HUGE_PAGES_MODES)


def _glibc_version() -> tuple[int, ...]:
  """The running C library's glibc version, () for another C library."""
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
  except (AttributeError, ValueError, OSError):
    return ()
  return tuple(int(part) for part in version.split('.')[:2]) if name == 'glibc' else ()


def kernel_thp_setting() -> str:
  """The kernel's transparent-huge-page policy ('always', 'madvise', 'never'), or '' where it
  has none to read."""
  try:
    with open(_THP_SETTING) as setting:
      text = setting.read()
  except OSError:
    return ''
  return text[text.find('[') + 1:text.find(']')] if '[' in text else ''


def huge_pages_need_restart() -> bool:
  """True where kept memory would get huge pages only from glibc's tunable, and this process
  started without it: memory is kept, KILN_HUGE_PAGES is 'auto', glibc is 2.35 or later and
  the kernel gives huge pages on request only ('always' gives them anyway, 'never' not at
  all). The environment is read first: the restarted process (and any started with the
  tunable) answers without the accelerator lookup and the file read again."""
  return (_RESTARTED_ENV not in os.environ
          and HUGE_PAGES_TUNABLE not in os.environ.get('GLIBC_TUNABLES', '').split(':')
          and huge_pages_mode() == 'auto' and _glibc_version() >= (2, 35)
          and kernel_thp_setting() == 'madvise' and _keeps())


def _restart_with_huge_pages() -> None:
  """Re-executes this process in place with HUGE_PAGES_TUNABLE added to GLIBC_TUNABLES:
  the same PID, interpreter, flags and arguments, from the script's first line."""
  if not sys.orig_argv or sys.argv[0] in ('', '-'):  # An interactive or piped-in program
    return  # cannot be read again.
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  env = dict(os.environ, GLIBC_TUNABLES=':'.join(filter(None, (tunables, HUGE_PAGES_TUNABLE))),
             **{_RESTARTED_ENV: '1'})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def configure(may_restart: bool = False) -> None:
  """`keep_freed_memory()` for a script's first lines: a bad KILN_HOST_MALLOC or
  KILN_HUGE_PAGES exits with one line instead of a traceback. With `may_restart` (a script's
  `__main__` only, before anything starts threads), the process first re-executes itself
  where `huge_pages_need_restart()`."""
  try:
    huge_pages_mode()  # Checked wherever it is read, so a bad value never passes silently.
    if may_restart and huge_pages_need_restart():
      _restart_with_huge_pages()
    keep_freed_memory()
  except KilnError as e:
    raise SystemExit(f'error: {e}') from None
