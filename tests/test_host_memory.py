"""core.host_memory: a process that keeps freed memory stops page-faulting XLA's buffers."""

import os
import platform
import subprocess
import sys

import pytest

from core import host_memory
from core.errors import KilnError
from tests.tiny import REPO

# Each call returns a fresh 64 MB array (glibc maps any block over 32 MB by default): how
# many pages the process faults in per call once warm, printed with whether memory is kept.
FAULTS_PER_CALL = '''
import resource, sys
from core import host_memory
kept = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
double = jax.jit(lambda x: x * 2)
x = jnp.ones((16 * 2**20,), jnp.float32)
for _ in range(12):  # glibc coalesces freed blocks over the first few calls.
  double(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  double(x).block_until_ready()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
'''


def faults_per_call(mode: str) -> tuple[bool, float]:
  env = dict(os.environ, KILN_HOST_MALLOC=mode, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  done = subprocess.run([sys.executable, '-c', FAULTS_PER_CALL], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  kept, faults = done.stdout.split()[-2:]
  return kept == 'True', float(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='tunes glibc malloc only')
def test_kept_memory_is_reused_where_system_malloc_faults_it_in_again():
  pages = 64 * 2**20 // 4096
  kept, faults = faults_per_call('keep')
  assert kept and faults < 0.05 * pages, faults
  # The same program on glibc's defaults maps and faults in every result afresh.
  kept, faults = faults_per_call('system')
  assert not kept and faults > 0.5 * pages, faults


def test_bad_mode_names_the_choices(monkeypatch):
  monkeypatch.setenv(host_memory.MODE_ENV, 'tcmalloc')
  with pytest.raises(KilnError, match=r"KILN_HOST_MALLOC='tcmalloc' is not one of auto, keep"):
    host_memory.keep_freed_memory()
  with pytest.raises(SystemExit, match=r'^error: KILN_HOST_MALLOC='):
    host_memory.configure()
