"""Training throughput and hardware utilisation per config, printed as a markdown table.

  .venv/bin/python benchmarks/throughput.py [CONFIG.py ...] [--steps 30] [--warmup 5]

With no config files it benchmarks DEFAULT_CONFIGS (the configs that run offline).
Each config's first train step is timed as its compile time (the persistent
compilation cache is left off so that it is honest), then `--warmup` untimed
steps run, then `--steps` timed ones, each blocked on so that it is timed
alone. Rates are medians over the timed steps; MFU counts the model's analytic
FLOPs against the peak of monitor.hardware (a measured matmul peak on CPU).
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import backends  # noqa: E402  (first: before JAX or TF start threads)

backends.configure_host(may_restart=__name__ == '__main__')

import jax  # noqa: E402

from loop import experiment  # noqa: E402
from core.errors import KilnError  # noqa: E402
from monitor import flops, hardware  # noqa: E402
from parallel.placement import DevicePrefetcher  # noqa: E402

DEFAULT_CONFIGS = ('configs/default.py', 'configs/mnist_cnn.py',
                   # Vision configs that run on the shared data (the TFDS ones need downloads).
                   'configs/resnet18_mnist.py', 'configs/yolo_mnist_canvas.py')


def load_config(path: str):
  """`get_config()` of a config file, as `--config=PATH` would load it in train.py."""
  if not os.path.isfile(path):
    raise KilnError(f'config file {path} does not exist: pass a path like configs/default.py')
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise KilnError(f'config file {path} has no get_config(): define one that returns the config')
  return module.get_config()


def benchmark(config_path: str, steps: int, warmup: int, peak_per_device: float | None) -> dict:
  """One config's row: medians over `steps` timed train steps after `warmup` untimed ones."""
  config = load_config(config_path)
  exp = experiment.build_experiment(config)
  state, shardings = exp.create_state()
  train_step = exp.train_step(shardings)
  host_batches = exp.task.train_batches(exp.host_batch, 0)
  batches = DevicePrefetcher(host_batches, exp.strategy.place,
                             config.dataset.prefetch_batches)
  try:
    batch = next(batches)
    # The first call compiles (and runs one step); the strategy may be jit or pmap.
    compile_started = time.perf_counter()
    state, *outputs = train_step(state, batch)
    jax.block_until_ready((state, outputs))
    compile_seconds = time.perf_counter() - compile_started
    # Already compiled, so lowering again only fetches the cached executable.
    compiled = train_step.lower(state, batch).compile() if hasattr(train_step, 'lower') else None

    for _ in range(warmup):
      batch = next(batches)
      state, *_ = train_step(state, batch)
    jax.block_until_ready(state)

    step_seconds = []
    wait_before = batches.wait_seconds
    for _ in range(steps):
      started = time.perf_counter()
      batch = next(batches)  # Waiting for input is part of the step's time.
      state, *outputs = train_step(state, batch)
      jax.block_until_ready((state, outputs))
      step_seconds.append(time.perf_counter() - started)
    input_wait = batches.wait_seconds - wait_before
  finally:
    batches.close()

  step_flops = exp.train_step_flops()
  median = statistics.median(step_seconds)
  num_devices = jax.device_count()
  return {
      'config': config_path,
      'devices': num_devices,
      'batch': config.batch_size,
      'steps_per_s': 1.0 / median,
      'examples_per_s': config.batch_size / median,
      'tflops_per_device': flops.tflops_per_device(step_flops, median, num_devices),
      'mfu': flops.mfu(step_flops, median, num_devices, peak_per_device),
      'input_wait_fraction': input_wait / sum(step_seconds),
      'peak_memory': hardware.device_memory(compiled),
      'compile_time_s': compile_seconds,
  }


def _bytes(count: int | None) -> str:
  if count is None:
    return 'n/a'
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if count < 1024 or unit == 'GiB':
      return f'{count:.0f} {unit}' if unit == 'B' else f'{count:.1f} {unit}'
    count /= 1024


def markdown_table(rows: list[dict]) -> str:
  header = ('config', 'devices', 'batch', 'steps/s (median)', 'examples/s', 'TFLOP/s per device',
            'MFU', 'input wait', 'peak memory', 'compile s')
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  for row in rows:
    memory = row['peak_memory']
    estimate = ' (est.)' if memory['source'] == 'memory_analysis' else ''
    mfu = 'n/a' if row['mfu'] is None else f"{100 * row['mfu']:.1f}%"
    cells = (row['config'], row['devices'], row['batch'], f"{row['steps_per_s']:.1f}",
             f"{row['examples_per_s']:.0f}", f"{row['tflops_per_device']:.3g}", mfu,
             f"{100 * row['input_wait_fraction']:.1f}%", _bytes(memory['peak_bytes']) + estimate,
             f"{row['compile_time_s']:.2f}")
    lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
  return '\n'.join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('configs', nargs='*', default=list(DEFAULT_CONFIGS),
                      help='config files (default: %(default)s)')
  parser.add_argument('--steps', type=int, default=30, help='timed train steps per config')
  parser.add_argument('--warmup', type=int, default=5, help='untimed steps after compiling')
  args = parser.parse_args(argv)
  try:
    if args.steps < 1 or args.warmup < 0:
      raise KilnError(f'--steps={args.steps} must be >= 1 and --warmup={args.warmup} >= 0')
    # Measured before any input pipeline thread competes for the cores.
    peak, source = hardware.peak_flops_per_device()
    rows = [benchmark(path, args.steps, args.warmup, peak) for path in args.configs]
  except KilnError as e:
    sys.exit(f'error: {e}')
  print(f"Peak per device: {'unknown' if peak is None else f'{peak / 1e12:.4f} TFLOP/s'} "
        f'({source})')
  print(f'{jax.device_count()} {jax.devices()[0].device_kind} device(s); JAX {jax.__version__}; '
        f'{args.warmup} warm-up + {args.steps} timed steps per config\n')
  print(markdown_table(rows))


if __name__ == '__main__':
  main()
