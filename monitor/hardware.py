"""What the hardware can do: peak FLOP/s per device and the memory a step uses.

Accelerator peaks come from a table of bf16 dense TFLOP/s (the MFU convention,
even for a model that trains in fp32). A CPU has no such figure, so its peak is
a measured fp32 matmul, cached on disk per CPU model, core count and JAX version as the
best of repeated probes.
"""

import json
import os
import platform
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from core.errors import KilnError
from core.host import cache_dir, cpu_model_name
from core.io import write_json_atomic

# (name, bf16 dense TFLOP/s per device, lower-case substrings of jax's device_kind).
# First match wins, so the specific TPU names come before the bare 'tpu v5' (= v5p).
PEAK_TFLOPS: tuple[tuple[str, float, tuple[str, ...]], ...] = (
    ('TPU v5e', 197.0, ('tpu v5 lite', 'tpu v5e')),
    ('TPU v6e', 918.0, ('tpu v6 lite', 'tpu v6e')),
    ('TPU v5p', 459.0, ('tpu v5p', 'tpu v5')),
    ('TPU v4', 275.0, ('tpu v4',)),
    ('TPU v3', 123.0, ('tpu v3',)),
    ('H200', 989.0, ('h200',)),
    ('H100', 989.0, ('h100',)),
    ('A100', 312.0, ('a100',)),
)

CPU_PEAK_CACHE_FILE = 'cpu_matmul_peak.json'
# A run probes the CPU peak again once the last probe is this old: often enough that a figure
# taken on a busy host is soon corrected, rarely enough that a test suite's many short runs
# (each probe costs seconds) do not pay it each time.
CPU_PEAK_REPROBE_SECONDS = 600.0


def table_peak_flops(device_kind: str) -> tuple[float, str] | None:
  """(peak FLOP/s, table entry name) for a `device.device_kind` string, or None if unknown."""
  kind = device_kind.lower()
  for name, tflops, patterns in PEAK_TFLOPS:
    if any(pattern in kind for pattern in patterns):
      return tflops * 1e12, name
  return None


def measure_cpu_matmul_flops(size: int = 2048, repeats: int = 8) -> float:
  """FLOP/s of the whole CPU on fp32 `size`^2 matmuls, best of `repeats` timed runs.

  Every local CPU device multiplies its own pair of matrices at once: with
  --xla_force_host_platform_device_count=N the cores are shared by N fake
  devices, and one device alone reaches only part of the machine.
  """
  if size <= 0 or repeats <= 0:
    raise KilnError(f'matmul size={size} and repeats={repeats} must be positive')
  devices = jax.local_devices(backend='cpu')
  sharding = NamedSharding(Mesh(np.asarray(devices), ('devices',)), P('devices'))
  matmul = jax.jit(lambda a, b: jnp.einsum('dij,djk->dik', a, b),
                   in_shardings=(sharding, sharding), out_shardings=sharding)
  a = jax.device_put(jax.random.normal(jax.random.key(0), (len(devices), size, size)), sharding)
  b = jax.device_put(jax.random.normal(jax.random.key(1), (len(devices), size, size)), sharding)
  matmul(a, b).block_until_ready()  # Compile and warm up outside the timed runs.
  best = float('inf')
  for _ in range(repeats):
    started = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - started)
  # Best, not median: a peak is what the machine can do, and other load only slows it.
  return len(devices) * 2.0 * size**3 / best


def cpu_matmul_peak(size: int = 2048, repeats: int = 8,
                    reprobe_after_s: float = CPU_PEAK_REPROBE_SECONDS) -> tuple[float, str]:
  """(whole-CPU fp32 matmul FLOP/s, what was measured and where the figure came from).

  The figure is cached in `cache_dir()`, keyed by CPU model, core count, JAX version and
  matrix size, as the best of every probe so far: other load only slows a matmul, so the
  best probe is the closest to what the machine can do, and one taken on a busy host must
  not stay the peak forever (it made every later MFU too high). A run probes again when
  the last probe is older than `reprobe_after_s` (and always for an entry written before
  probes were counted); a probe that beats the cached figure replaces it.
  """
  model, cores = cpu_model_name(), os.cpu_count() or 1
  key = f'{model} | {cores} cores | jax {jax.__version__} | {size}x{size} fp32'
  path = os.path.join(cache_dir(), CPU_PEAK_CACHE_FILE)
  try:
    with open(path) as f:
      cached = json.load(f)
  except (OSError, ValueError):  # No cache yet, or a damaged one: measure again.
    cached = {}
  if not isinstance(cached, dict):
    cached = {}
  entry = cached.get(key)
  if isinstance(entry, (int, float)):  # Written before probes were counted: when is unknown.
    entry = {'flops': float(entry), 'probes': 1, 'last_probe_unix': 0.0}
  elif not (isinstance(entry, dict) and isinstance(entry.get('flops'), (int, float))):
    entry = None
  now = time.time()
  if entry is not None and now - float(entry.get('last_probe_unix', 0.0)) < reprobe_after_s:
    age_min = (now - float(entry['last_probe_unix'])) / 60
    return float(entry['flops']), (f'{key}, from the cache: best of {entry["probes"]} '
                                   f'probe(s), the last {age_min:.0f} min ago')
  probe = measure_cpu_matmul_flops(size, repeats)
  if entry is None:
    entry, origin = {'flops': probe, 'probes': 0}, 'probed in this run'
  elif probe > entry['flops']:
    origin = (f'probed in this run, beating the cached {entry["flops"] / 1e9:.3g} GFLOP/s '
              f'(best of {entry["probes"]} earlier probe(s))')
    entry['flops'] = probe
  else:
    origin = (f'from the cache: best of {entry["probes"] + 1} probes; this run probed '
              f'{probe / 1e9:.3g} GFLOP/s (a busy host reads low)')
  entry['probes'] = int(entry['probes']) + 1
  entry['last_probe_unix'] = now
  cached[key] = entry
  os.makedirs(os.path.dirname(path), exist_ok=True)
  write_json_atomic(path, cached)
  logging.info('CPU matmul peak %.0f GFLOP/s: %s', entry['flops'] / 1e9, origin)
  return float(entry['flops']), f'{key}, {origin}'


def peak_flops_per_device(device=None,
                          cpu_matmul_size: int = 2048) -> tuple[float | None, str]:
  """(peak FLOP/s of one device, where the figure comes from) for `device` (default: the
  first local device). The peak is None for an accelerator missing from PEAK_TFLOPS.

  On CPU the measured whole-machine matmul peak is split evenly over the local CPU
  devices: with --xla_force_host_platform_device_count=8 each fake device gets 1/8.
  """
  device = device or jax.local_devices()[0]
  if device.platform == 'cpu':
    total, measured = cpu_matmul_peak(cpu_matmul_size)
    count = len(jax.local_devices(backend='cpu'))
    return total / count, (f'{total / 1e9:.0f} GFLOP/s measured fp32 matmul ({measured}) '
                           f'shared by {count} CPU device(s)')
  found = table_peak_flops(device.device_kind)
  if found is None:
    return None, (f"no peak known for device kind '{device.device_kind}': add it to "
                  'monitor.hardware.PEAK_TFLOPS')
  flops, name = found
  return flops, f'{name} bf16 dense peak from the table ({flops / 1e12:.0f} TFLOP/s)'


def memory_analysis_bytes(compiled) -> tuple[int, int] | None:
  """(resident, peak) bytes of one device for a compiled step, from XLA's memory analysis."""
  analysis = compiled.memory_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if analysis is None:
    return None
  # Donated inputs alias outputs (the train state): count those buffers once.
  resident = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
              - analysis.alias_size_in_bytes)
  return resident, resident + analysis.temp_size_in_bytes + analysis.generated_code_size_in_bytes


def device_memory(compiled=None) -> dict:
  """Device memory of the run, in bytes, as a dict:

  - `bytes_in_use`, `peak_bytes`: from the backend's `memory_stats()` (GPU, TPU), the
    largest over local devices; `source` is 'memory_stats'.
  - Else, when `compiled` (a `jax.stages.Compiled` step) is given, an estimate of one
    device's footprint for that step from XLA's `memory_analysis()`: `bytes_in_use` =
    its arguments and outputs (state and batch; donated buffers once), `peak_bytes`
    adds temporaries and generated code; `source` is 'memory_analysis'.
  - Else (CPU with no compiled step) both are None and `source` is 'unavailable'.

  For a jitted step that has already run, `train_step.lower(state, batch).compile()`
  returns its cached executable without compiling again.
  """
  stats = [device.memory_stats() for device in jax.local_devices()]
  if stats and all(s and 'bytes_in_use' in s for s in stats):
    return {'bytes_in_use': max(s['bytes_in_use'] for s in stats),
            'peak_bytes': max(s.get('peak_bytes_in_use', s['bytes_in_use']) for s in stats),
            'source': 'memory_stats'}
  if compiled is not None:
    estimate = memory_analysis_bytes(compiled)
    if estimate is not None:
      return {'bytes_in_use': estimate[0], 'peak_bytes': estimate[1], 'source': 'memory_analysis'}
  return {'bytes_in_use': None, 'peak_bytes': None, 'source': 'unavailable'}
