"""CPU convolution speed: per ResNet-18 conv shape, native vs the chosen lowering, and the
whole ResNet-18 training step with native convs vs the chosen lowerings.

  .venv/bin/python benchmarks/conv_throughput.py [--batch 128] [--image 32]
      [--reps 7] [--rounds 3] [--step-rounds 5] [--steps-per-round 4] [--warmup 3]
      [--isa native|avx2] [--skip-step | --skip-shapes]

Per shape: GFLOP/s of one forward + backward (input and kernel gradients; the first
conv's input gradient, which training never takes, left out), each pass the best of
`--reps` runs in each of `--rounds` rounds over all shapes (as the matmul peak it is
compared with is a best run), counting the model's analytic FLOPs
(models.cost.conv_flops: taps on real input, not padding; one pass = 1x forward), and
that rate as a share of the fp32 matmul peak measured in every round of this same run
(so that a busy machine lowers both), best of the rounds. The plan
shown is the one the model uses; 'measure' plans come from their first (cached) timing,
so on a busy machine they may lose to native in this run's timings.
Whole step: ResNet-18 with the ImageNet stem on `--image`-square RGB images (CIFAR-10's
shape, served by tfds.testing.mock_data) built through loop.experiment like any run, each
row's step compiled first, then all rows timed in `--step-rounds` alternating rounds of
`--steps-per-round` steps each on device-resident batches after `--warmup`, medians; the
shared host's load falls on every row alike.
The 'native' row is every conv on lax.conv_general_dilated (KILN_CONV_LOWERING=native);
the 'chosen' row is what a user gets (by default the rule table where it was measured on
the convs' instruction set, else each shape timed: the header says which; or
KILN_CONV_LOWERING's mode); the 'rule table' and 'timed per pass' rows (rules, measure)
whichever of the two the chosen row is not. The header names the host's instruction sets
and this run's matmul peak. `--isa avx2` caps Kiln's kernels and XLA at AVX2
(benchmarks/cpu_host.py), as an AVX2-only host runs.
"""

import argparse
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import cpu_host  # noqa: E402  (imports neither JAX nor torch)


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=128, help='images per step / per conv call')
  parser.add_argument('--image', type=int, default=32, help='square RGB image side (32: CIFAR)')
  parser.add_argument('--reps', type=int, default=7, help='timed runs per conv and lowering')
  parser.add_argument('--rounds', type=int, default=3,
                      help='rounds over all shapes and the matmul peak; the best is kept')
  parser.add_argument('--step-rounds', type=int, default=5,
                      help='alternating rounds over the whole-step rows')
  parser.add_argument('--steps-per-round', type=int, default=4,
                      help='timed train steps of each row per round')
  parser.add_argument('--warmup', type=int, default=3, help='untimed steps after compiling')
  parser.add_argument('--isa', choices=cpu_host.ISAS, default='native',
                      help='avx2: cap Kiln and XLA at AVX2 (an AVX2-only host)')
  parser.add_argument('--skip-step', action='store_true', help='only the per-shape table')
  parser.add_argument('--skip-shapes', action='store_true', help='only the training step')
  return parser.parse_args(argv)


ARGS = _parse(sys.argv[1:] if __name__ == '__main__' else [])
cpu_host.cap_isa(ARGS.isa)  # Before JAX, XLA or Kiln's kernel build read them.

from backends.cpu import host_memory  # noqa: E402  (first: before JAX or TF start threads)

host_memory.configure(may_restart=__name__ == '__main__')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from flax import nnx  # noqa: E402

from configs import vision  # noqa: E402
from loop import experiment  # noqa: E402
from core.errors import KilnError  # noqa: E402
from backends.cpu import conv_lowering  # noqa: E402
from models import cost  # noqa: E402
from models.resnet import ResNet18  # noqa: E402
from monitor import hardware  # noqa: E402


def resnet_convs(model, image_shape):
  """(conv, input spatial shape) for every conv of `model` in forward order; mirrors
  models.resnet.ResNet.features_flops."""
  convs = [(model.stem_conv, tuple(image_shape[:2]))]
  spatial = cost.conv_flops(model.stem_conv, image_shape[:2])[1]
  if model.stem == 'imagenet':  # 3x3/2 max-pool padded by 1.
    spatial = tuple((size + 2 - 3) // 2 + 1 for size in spatial)
  for block in model.blocks:
    block_input = spatial
    for conv in block.convs:
      convs.append((conv, spatial))
      spatial = cost.conv_flops(conv, spatial)[1]
    if block.projection is not None:
      convs.append((block.projection, block_input))
  return convs


def conv_spec(conv, spatial, batch: int) -> conv_lowering.ConvSpec:
  x = jax.ShapeDtypeStruct((batch,) + tuple(spatial) + (conv.in_features,), jnp.float32)
  k = jax.ShapeDtypeStruct(tuple(conv.kernel_shape), jnp.float32)
  rank = len(spatial)
  padding = nnx.nn.linear.canonicalize_padding(conv.padding, rank)
  return conv_lowering.channels_last_spec(
      x, k, cost.per_dim(conv.strides, rank), padding,
      rhs_dilation=cost.per_dim(conv.kernel_dilation, rank),
      dimension_numbers=nnx.nn.linear._conv_dimension_numbers(x.shape),
      feature_group_count=conv.feature_group_count)


def shape_table(batch: int, image: int, reps: int, rounds: int) -> tuple[list[str], float]:
  """(table lines, matmul peak): each pass of each shape and the peak are timed in every
  one of `rounds` rounds over all shapes, and the best of all rounds kept, so a burst of
  load from the host's other tenants (seconds long) cannot sink one shape or the peak."""
  model = nnx.eval_shape(lambda: ResNet18(num_classes=10, input_shape=(image, image, 3),
                                          rngs=nnx.Rngs(0)))
  shapes, seen = [], {}
  for index, (conv, spatial) in enumerate(resnet_convs(model, (image, image, 3))):
    spec = conv_spec(conv, spatial, batch)
    if spec in seen:
      seen[spec] += 1
      continue
    seen[spec] = 1
    # Training never takes the image's gradient, so the first conv's input grad is not
    # timed (XLA drops it from the step); every other conv runs all three passes.
    passes = conv_lowering.PASSES if index else ('forward', 'kernel_grad')
    shapes.append((spec, passes, len(passes) * batch * cost.conv_flops(conv, spatial)[0]))
  peak, best = 0.0, {}
  for _ in range(rounds):
    peak = max(peak, hardware.measure_cpu_matmul_flops())
    for spec, _, _ in shapes:
      for pass_name, lowerings in conv_lowering.measure(spec, repeats=reps).items():
        for name, seconds in lowerings.items():
          key = (spec, pass_name, name)
          best[key] = min(best.get(key, seconds), seconds)
  rows = []
  for spec, passes, train_flops in shapes:
    plan = conv_lowering.choose(spec, 'cpu')
    native = sum(best[spec, p, 'native'] for p in passes)
    chosen = sum(best[spec, p, getattr(plan, p)] for p in passes)
    rows.append((spec, passes, train_flops, plan, native, chosen))
  header = ('input (H, W, C)', 'kernel/stride', 'C out', 'in model', 'passes', 'MFLOP',
            'native GFLOP/s', 'chosen (fwd/dx/dk)', 'chosen GFLOP/s', 'chosen % of peak',
            'speed-up')
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  for spec, passes, train_flops, plan, native, chosen in rows:
    cells = (spec.input_shape[1:], f'{spec.kernel_shape[0]}x{spec.kernel_shape[1]}/'
             f'{spec.strides[0]}', spec.kernel_shape[-1], seen[spec],
             'fwd+dx+dk' if len(passes) == 3 else 'fwd+dk', f'{train_flops / 1e6:.0f}',
             f'{train_flops / native / 1e9:.0f}', plan, f'{train_flops / chosen / 1e9:.0f}',
             f'{100 * train_flops / chosen / peak:.0f}%', f'{native / chosen:.1f}x')
    lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
  return lines, peak


def step_config(batch: int):
  c = vision.get_vision_config()
  c.dataset.name = 'tfds:cifar10'
  c.model.name = 'resnet18'
  c.model.stem = 'imagenet'
  c.batch_size = batch
  c.eval_batch_size = batch
  c.num_train_steps = 100
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 0.1
  return c


def prepared_step(batch: int, image: int, lowering_mode: str):
  """(no-argument train step, compile s) of the ResNet-18 step built like any Kiln run with
  KILN_CONV_LOWERING=`lowering_mode` (read while the step is traced: its first call)."""
  os.environ[conv_lowering.MODE_ENV] = lowering_mode
  config = step_config(batch)
  with tfds.testing.mock_data(num_examples=4 * batch):
    exp = experiment.build_experiment(config)
    if exp.task.model_input_shape != (image, image, 3):
      raise KilnError(f'mock CIFAR-10 gave images {exp.task.model_input_shape}, not '
                      f'{(image, image, 3)}: pass --image 32')
    state, shardings = exp.create_state()
    train_step = exp.train_step(shardings)
    host_batches = exp.task.train_batches(exp.host_batch, 0)
    batches = [exp.strategy.place(next(host_batches)) for _ in range(2)]
  holder = {'state': state, 'calls': 0}

  def run():
    holder['state'], *outputs = train_step(holder['state'], batches[holder['calls'] % 2])
    holder['calls'] += 1
    jax.block_until_ready((holder['state'], outputs))
  started = time.perf_counter()
  run()
  return run, time.perf_counter() - started


def main() -> None:
  args = ARGS
  if jax.default_backend() != 'cpu':
    print(f'note: backend is {jax.default_backend()}: every conv takes the native lowering')
  try:
    if min(args.batch, args.image, args.reps, args.rounds, args.step_rounds,
           args.steps_per_round) < 1 or args.warmup < 0:
      raise KilnError('--batch, --image, --reps, --rounds, --step-rounds and --steps-per-round '
                      'must be >= 1, --warmup >= 0')
    mode = conv_lowering.mode()
    source = conv_lowering.auto_source() if mode == 'auto' else f'{mode} (forced)'
    peak = hardware.measure_cpu_matmul_flops()
    print(f'{cpu_host.host_line(args.isa, peak)}\n{jax.device_count()} '
          f'{jax.devices()[0].device_kind} device(s); {conv_lowering.MODE_ENV}={mode}: '
          f'{source}\n')
    if not args.skip_shapes:
      lines, peak = shape_table(args.batch, args.image, args.reps, args.rounds)
      # Measured now, under this run's load (not the cache), in the same rounds.
      print(f'ResNet-18 conv shapes, batch {args.batch}, forward + backward, fp32; fp32 '
            f'matmul peak {peak / 1e9:.0f} GFLOP/s (best of {args.rounds} rounds, as is '
            f'each pass):\n')
      print('\n'.join(lines))
    if args.skip_step:
      return
    rows = [('native', 'native'), (f'chosen ({mode}: {source.split(" (")[0]})', mode)]
    resolved = conv_lowering.auto_mode('cpu', len(jax.devices('cpu'))) if mode == 'auto' else mode
    for label, other in (('rule table (rules)', 'rules'), ('timed per pass (measure)', 'measure')):
      if other != resolved:  # The default's alternatives, to compare it with.
        rows.append((label, other))
    steps, compile_seconds = {}, {}
    for label, forced in rows:
      steps[label], compile_seconds[label] = prepared_step(args.batch, args.image, forced)
    medians = cpu_host.interleaved(steps, args.step_rounds, args.warmup, args.steps_per_round)
    best = min(seconds for seconds, _ in medians.values())
    print(f'\nResNet-18 training step, {args.image}x{args.image}x3, batch {args.batch}, '
          f'{args.warmup} warm-up steps, then {args.step_rounds} alternating rounds of '
          f'{args.steps_per_round} steps per row (medians):\n')
    print('| convs | images/s | vs the fastest row | CPU ms/step | compile s (+ timing) |\n'
          '| --- | --- | --- | --- | --- |')
    for label, (seconds, cpu_seconds) in medians.items():
      print(f'| {label} | {args.batch / seconds:.0f} | {best / seconds:.2f} | '
            f'{1e3 * cpu_seconds:.0f} | {compile_seconds[label]:.1f} |')
  except KilnError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()
