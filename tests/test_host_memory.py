"""backends.cpu.host_memory: a process that keeps freed memory stops page-faulting XLA's buffers."""

import os
import platform
import subprocess
import sys

import pytest

from core.errors import KilnError
from tests.tiny import REPO

# Skips the module where backends/cpu/ is deleted (glibc's defaults, nothing to keep).
host_memory = pytest.importorskip('backends.cpu.host_memory')

# Each call returns a fresh 64 MB array (glibc maps any block over 32 MB by default): the
# pages the process faults in over 20 calls once warm, printed with whether memory is kept.
# Kept, the heap grows for a varying number of first calls (glibc coalesces freed blocks
# until one fits an aligned request), so warm-up lasts until calls stop faulting; on
# glibc's defaults every call faults, and warm-up ends at its 60-call cap.
FAULTS_OVER_20_CALLS = '''
import resource
from backends.cpu import host_memory
kept = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
double = jax.jit(lambda x: x * 2)
x = jnp.ones((16 * 2**20,), jnp.float32)
def faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
quiet = 0  # Warm until 5 calls in a row fault in less than half a result.
for _ in range(60):
  start = faults()
  double(x).block_until_ready()
  quiet = quiet + 1 if faults() - start < 8192 else 0
  if quiet == 5:
    break
before = faults()
for _ in range(20):
  double(x).block_until_ready()
print(kept, faults() - before)
'''


def faults_over_20_calls(mode: str) -> tuple[bool, int]:
  env = dict(os.environ, KILN_HOST_MALLOC=mode, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  done = subprocess.run([sys.executable, '-c', FAULTS_OVER_20_CALLS], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  kept, faults = done.stdout.split()[-2:]
  return kept == 'True', int(faults)


@pytest.mark.slow  # A fresh interpreter.
@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='tunes glibc malloc only')
def test_kept_memory_is_reused_where_system_malloc_faults_it_in_again():
  result_pages = 64 * 2**20 // 4096
  # Kept: once warm, the same memory serves nearly every call. The heap still grows now and
  # then (0 to 5 results' worth in 20 calls seen, more on a loaded machine), so the bound
  # leaves room for growths while failing if nothing were kept (20 results' worth).
  kept, kept_faults = faults_over_20_calls('keep')
  assert kept and kept_faults <= 8 * result_pages, kept_faults
  # glibc's defaults map and fault in every result afresh.
  kept, system_faults = faults_over_20_calls('system')
  assert not kept and system_faults > 15 * result_pages, system_faults
  assert kept_faults < system_faults / 2, (kept_faults, system_faults)


# Prints a line each time the program starts, then (after the script's configure call) its PID,
# its GLIBC_TUNABLES and how much of a 64 MB block it touched came in huge pages.
HUGE_PAGES_PROBE = """
import ctypes, os, sys
print('started', flush=True)
import backends
backends.configure_host(may_restart=sys.argv[1] == 'main')
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)
with open('/proc/self/smaps_rollup') as rollup:
  huge_kb = next(int(line.split()[1]) for line in rollup if line.startswith('AnonHugePages'))
print(os.getpid(), os.environ.get('GLIBC_TUNABLES', '-'), huge_kb)
"""


def huge_pages_probe(caller: str, **env) -> tuple[int, int, int, str, int]:
  """(times the program started, Popen's PID, then the PID, GLIBC_TUNABLES and huge-page KB
  it printed) for a program whose configure call comes from `caller` ('main' or 'import')."""
  env = dict(os.environ, KILN_HOST_MALLOC='keep', **env)
  for inherited in ('GLIBC_TUNABLES', host_memory._RESTARTED_ENV):
    env.pop(inherited, None)
  process = subprocess.Popen([sys.executable, '-c', HUGE_PAGES_PROBE, caller], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  out, err = process.communicate(timeout=60)
  assert process.returncode == 0, err[-2000:]
  lines = out.splitlines()
  pid, tunables, huge_kb = lines[-1].split()
  return lines.count('started'), process.pid, int(pid), tunables, int(huge_kb)


@pytest.mark.skipif(host_memory.kernel_thp_setting() != 'madvise'
                    or host_memory._glibc_version() < (2, 35),
                    reason="needs glibc 2.35+ and the kernel's huge pages on request")
def test_a_script_restarts_once_in_place_and_its_kept_memory_comes_in_huge_pages():
  starts, popen_pid, pid, tunables, huge_kb = huge_pages_probe('main')
  assert starts == 2 and pid == popen_pid  # Re-executed once, as the same process.
  assert host_memory.HUGE_PAGES_TUNABLE in tunables.split(':')
  assert huge_kb >= 32 * 1024, huge_kb  # At least half the block in 2 MB pages.
  # Opted out, or imported rather than run: one start, the kernel's 4 KB pages.
  for caller, env in (('main', {host_memory.HUGE_PAGES_ENV: 'off'}), ('import', {})):
    starts, popen_pid, pid, tunables, huge_kb = huge_pages_probe(caller, **env)
    assert (starts, pid, tunables, huge_kb) == (1, popen_pid, '-', 0), caller


def test_bad_mode_names_the_choices(monkeypatch):
  monkeypatch.setenv(host_memory.MODE_ENV, 'tcmalloc')
  with pytest.raises(KilnError, match=r"KILN_HOST_MALLOC='tcmalloc' is not one of auto, keep"):
    host_memory.keep_freed_memory()
  with pytest.raises(SystemExit, match=r'^error: KILN_HOST_MALLOC='):
    host_memory.configure()
  monkeypatch.setenv(host_memory.MODE_ENV, 'keep')
  monkeypatch.setenv(host_memory.HUGE_PAGES_ENV, 'on')
  with pytest.raises(SystemExit, match=r"^error: KILN_HUGE_PAGES='on' is not one of auto, off"):
    host_memory.configure()
