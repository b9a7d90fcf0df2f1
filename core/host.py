"""Where Kiln caches per-host figures, and which CPU this host has."""

import os
import platform


def cache_dir() -> str:
  """$KILN_CACHE_DIR, else ~/.cache/kiln."""
  return os.environ.get('KILN_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache',
                                                          'kiln')


def cpu_model_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.lower().startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or 'unknown cpu'


def cpu_instruction_set() -> str:
  """The widest of 'AVX-512' / 'AVX2' this CPU reports in /proc/cpuinfo, else 'other'."""
  try:
    with open('/proc/cpuinfo') as f:
      flags = next((line.split(':', 1)[1].split() for line in f
                    if line.lower().startswith('flags')), [])
  except OSError:
    flags = []
  return 'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'other'
