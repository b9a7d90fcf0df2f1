"""What the CPU benchmarks share: capping a run at AVX2, timing variants in alternating rounds
on a shared host, eager PyTorch as the same-run reference, and the line that says which
host, instruction sets and matmul peak a table was measured with.

Import this before JAX (it imports neither JAX nor torch at module level) so that `cap_isa`
can set what XLA, Kiln's kernel build and PyTorch read when they start.
"""

import os
import statistics
import time

ISAS = ('native', 'avx2')
# As an AVX2-only host would run: Kiln's kernels built with -mno-avx512f, PyTorch's own
# kernels (ATen, oneDNN, MKL) capped at AVX2; XLA's generated code gets --xla_cpu_max_isa.
_AVX2_ENV = {'KILN_CPU_ARCH_FLAGS': '-mno-avx512f', 'ATEN_CPU_CAPABILITY': 'avx2',
             'ONEDNN_MAX_CPU_ISA': 'AVX2', 'MKL_ENABLE_INSTRUCTIONS': 'AVX2'}


def cap_isa(isa: str) -> None:
  """For `isa` 'avx2', caps Kiln, XLA and PyTorch at AVX2 (before any of them has started).
  XLA's library matmuls (YNNPACK) still choose their own instruction set at run time."""
  if isa == 'avx2':
    os.environ.update(_AVX2_ENV)
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               ' --xla_cpu_max_isa=AVX2').strip()


def import_torch():
  """The torch module, or None where it is not installed (pip install '.[bench]')."""
  try:
    import torch
  except ImportError:
    return None
  return torch


def interleaved_times(variants: dict, rounds: int, warmup: int, calls_per_round: int = 1,
                      settle_calls: int = 1) -> dict:
  """{name: ([wall seconds], [CPU seconds of this process])}, one entry per timed call in
  round order: each round runs `calls_per_round` calls of every variant in turn, so load from
  the host's other tenants falls on all of them alike. Each variant's turn starts with
  `settle_calls` untimed calls: the first step after another framework's ran slow, an
  interference no training run has (GPT CPU config, Kiln after eager PyTorch: 35-36 ms, then
  29.6-31; PyTorch after Kiln: 38.5-39.6, then 38.2; no page faults either way)."""
  for run in variants.values():
    for _ in range(warmup):
      run()
  times = {name: ([], []) for name in variants}
  for _ in range(rounds):
    for name, run in variants.items():
      for _ in range(settle_calls):
        run()
      for _ in range(calls_per_round):
        started, cpu_started = time.perf_counter(), time.process_time()
        run()
        times[name][0].append(time.perf_counter() - started)
        times[name][1].append(time.process_time() - cpu_started)
  return times


def medians(times: dict) -> dict:
  """{name: (median seconds, median CPU seconds)} of interleaved_times' lists."""
  return {name: (statistics.median(wall), statistics.median(cpu))
          for name, (wall, cpu) in times.items()}


def interleaved(variants: dict, rounds: int, warmup: int, calls_per_round: int = 1,
                settle_calls: int = 1) -> dict:
  """medians() per call of interleaved_times."""
  return medians(interleaved_times(variants, rounds, warmup, calls_per_round, settle_calls))


def torch_thread_variants(make_run, label: str, threads: list[int]) -> dict:
  """{'<label>, N threads': run} per thread count: on a shared host PyTorch's OpenMP threads
  wait for each other at every barrier, so fewer threads can be faster."""
  import torch
  variants = {}
  for count in sorted(set(threads), reverse=True):
    run = make_run()

    def threaded(run=run, count=count):
      torch.set_num_threads(count)
      run()
    variants[f'{label}, {count} thread{"s" if count > 1 else ""}'] = threaded
  return variants


def host_line(isa: str, peak_flops: float | None = None) -> str:
  """Which CPU, which instruction sets Kiln's kernels, XLA and PyTorch ran, and the fp32
  matmul peak measured in this run: what a reader needs to compare figures from elsewhere."""
  import jax
  from backends import installed_cpu
  from core.host import cpu_instruction_set, cpu_model_name
  cpu = installed_cpu()
  built = cpu.kernels.instruction_set() if cpu is not None else 'absent (backends/cpu deleted)'
  torch = import_torch()
  line = (f'{cpu_model_name()}, {os.cpu_count()} cores, host instruction set '
          f"{cpu_instruction_set()}; Kiln's CPU kernels built for {built} (--isa {isa}); "
          f'JAX {jax.__version__}' +
          (f', PyTorch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})'
           if torch is not None else ', PyTorch not installed'))
  if peak_flops is not None:
    line += f'; fp32 matmul peak {peak_flops / 1e9:.0f} GFLOP/s (measured in this run)'
  return line
