"""GPT training-step throughput on this machine, against the nanoGPT (eager PyTorch) figures.

  .venv/bin/python benchmarks/gpt_throughput.py [--steps 10] [--warmup 2]
      [--shape baby] [--shape cpu] [--positions learned|rotary] [--dropout RATE]
      [--kernels auto|xla|cpu]

Shapes are the project's configs: 'baby' is configs/gpt_shakespeare_char.py (6 layers,
6 heads, width 384, context 256) at batch 16; 'cpu' is configs/gpt_shakespeare_char_cpu.py
(4 layers, 4 heads, width 128, context 64, batch 12, no dropout). Vocabulary 65
(Shakespeare characters). The step is the real one: loop.steps.train_step_fn with the
config's update rule (clipping + AdamW with decoupled decay, schedule) and the causal LM
task's loss, jitted with the state donated. Only the data is a stand-in: a fixed batch of
random tokens, already on the device, so input time is excluded.

Each shape runs twice, one after the other: as one batch, and as the same batch in
micro-batches whose gradients are summed before the one optimizer update
(config.gradient.accumulation_steps; the same update, up to float summation order and
dropout draws). On a CPU the micro-batches are faster because each one's activations stay
in the caches between the matmuls that produce and consume them: baby GPT's [4096, 1536]
MLP activation is 25 MB, a micro-batch of 2 sequences' 3 MB. `--accumulation` sets
other counts.

`--kernels xla` (config.backend.cpu_kernels) times the step without Kiln's compiled CPU
kernels (backends/cpu/kernels.py: causal attention and dropout bits), the 'before' figure;
the configs' 'auto' uses them.

The CPU matmul peak is measured in this run (monitor.hardware.measure_cpu_matmul_flops,
not the cached figure) before every timed step; every row of a shape divides by the best
probe of all its rows. MFU = analytic model FLOPs (GPT.forward_flops: each matmul, causal attention
counted half) per second / that peak; 'MFU, PaLM count' uses 6N + 12*L*H*Q*T per token
instead (full attention), the count of the PaLM paper and of nanoGPT's estimate_mfu.
"""

import argparse
import os
import statistics
import sys
import time
import types

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import backends  # noqa: E402  (first: before JAX or TF start threads)

backends.configure_host()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from configs import gpt_shakespeare_char, gpt_shakespeare_char_cpu  # noqa: E402
from loop import steps  # noqa: E402
from loop.state import ModelTemplate, init_state  # noqa: E402
from backends import ops  # noqa: E402
from models.registry import create_model  # noqa: E402
from monitor import flops, hardware  # noqa: E402
from optim.chain import build_transform  # noqa: E402
from optim.factory import build_schedule  # noqa: E402
from tasks.language import CausalLanguageModeling  # noqa: E402

VOCAB_SIZE = 65  # Characters of tiny Shakespeare.
# Eager PyTorch nanoGPT on this 2-core CPU, fp32 (tokens/s), for the ratio column.
PYTORCH_TOKENS_PER_S = {'baby': 1_280, 'cpu': 13_000}
# (config, batch, micro-batches timed beside one batch): the fastest counts measured here
# with the CPU kernels, baby 8 (975-1,004 ms/step; 4: 1,043-1,049, 2: 1,069, 16: 1,174) and
# cpu 2 (24.5 vs 32.9 ms; 3 gave 27.2).
SHAPES = {
    'baby': (gpt_shakespeare_char.get_config, 16, 8),
    'cpu': (gpt_shakespeare_char_cpu.get_config, None, 2),  # The config's own batch (12).
}


def _config(shape: str, positions: str | None, dropout: float | None, accumulation: int,
            kernels: str | None = None):
  get_config, batch_size, _ = SHAPES[shape]
  config = get_config()
  if batch_size is not None:
    config.batch_size = batch_size
  if positions is not None:
    config.model.positions = positions
  if dropout is not None:
    config.model.dropout_rate = dropout
  if kernels is not None:
    config.backend.cpu_kernels = kernels
  config.gradient.accumulation_steps = accumulation
  return config


def _task(config) -> CausalLanguageModeling:
  """The causal LM task with a stand-in source: only what its loss reads."""
  task = CausalLanguageModeling(config)
  task.source = types.SimpleNamespace(seq_len=config.dataset.seq_len, eval_chars_per_token=1.0)
  return task


def _compiled_step(shape: str, accumulation: int, args):
  """(config, jitted train step, initial state, batch, model FLOPs per step, the same
  by the PaLM/nanoGPT count)."""
  config = _config(shape, args.positions, args.dropout, accumulation, args.kernels)
  ops.configure(config.backend)  # As a run does, before the step is traced.
  length, batch_size = config.dataset.seq_len, config.batch_size
  if batch_size % accumulation:
    sys.exit(f'error: --accumulation={accumulation} must divide the {shape} batch '
             f'({batch_size})')
  task = _task(config)
  template = ModelTemplate(lambda rngs: create_model(
      config.model, rngs, vocab_size=VOCAB_SIZE, max_len=length))
  schedule = build_schedule(config.schedule, config.optimizer.learning_rate,
                            config.num_train_steps, 1000)
  tx = build_transform(config, schedule)
  options = steps.StepOptions.from_config(config)
  train_step = jax.jit(steps.train_step_fn(task, template, tx, options), donate_argnums=0)
  state = init_state(template, tx, config.seed, guard=options.guard)
  tokens = jax.random.randint(jax.random.key(0), (batch_size, length + 1), 0, VOCAB_SIZE)
  batch = {'tokens': tokens, 'token_mask': jnp.ones((batch_size, length), jnp.float32)}
  model = nnx.eval_shape(lambda: template.build_model(nnx.Rngs(0)))
  return (config, train_step, state, batch, flops.train_step_flops(model, (length,), batch_size),
          flops.palm_train_step_flops(model, length, batch_size))


def benchmark(shape: str, args) -> list[dict]:
  """One row per micro-batch count. Each count's steps run back to back, as in training,
  with a peak probe before every step: interleaving the one-batch step slowed the next
  8-micro-batch step from 944 to 1,146 ms (same run), an interference train.py never has
  (its own log gave 966-1,021 ms/step for that step, input wait < 0.2%)."""
  rows, peaks = [], []
  for count in args.accumulation or sorted({1, SHAPES[shape][2]}):
    config, train_step, state, batch, flops_per_step, palm = _compiled_step(shape, count, args)

    def run(state):
      state, *outputs = train_step(state, batch)
      jax.block_until_ready((state, outputs))
      return state

    for _ in range(1 + args.warmup):  # Compile, then warm up.
      state = run(state)
    seconds = []
    for _ in range(args.steps):
      peaks.append(hardware.measure_cpu_matmul_flops(repeats=2))
      started = time.perf_counter()
      state = run(state)
      seconds.append(time.perf_counter() - started)
    del state  # Free this count's buffers before the next count compiles.
    median = statistics.median(seconds)
    tokens_per_s = config.batch_size * config.dataset.seq_len / median
    rows.append({'shape': shape, 'config': config, 'batch': config.batch_size,
                 'micro_batches': config.gradient.accumulation_steps, 'ms': 1e3 * median,
                 'tokens_per_s': tokens_per_s, 'gflops': flops_per_step / median / 1e9,
                 'flops': flops_per_step / median, 'palm_flops': palm / median,
                 'vs_pytorch': tokens_per_s / PYTORCH_TOKENS_PER_S[shape]})
  peak = max(peaks)  # The best probe of the whole shape: a slow spell lowers no row's bar.
  for row in rows:
    row.update(peak_gflops=peak / 1e9, mfu=row.pop('flops') / peak,
               palm_mfu=row.pop('palm_flops') / peak)
  return rows


def markdown_table(rows: list[dict]) -> str:
  header = ('shape', 'batch', 'micro-batches', 'ms/step (median)', 'tokens/s', 'GFLOP/s',
            'matmul peak GFLOP/s', 'MFU', 'MFU, PaLM count', 'vs PyTorch')
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  for row in rows:
    m = row['config'].model
    shape = (f"{row['shape']}: {m.num_layers}L {m.num_heads}H {m.embed_dim}E "
             f"T{row['config'].dataset.seq_len} {m.positions}, dropout {m.dropout_rate}, "
             f"kernels {row['config'].backend.cpu_kernels}")
    cells = (shape, row['batch'], row['micro_batches'], f"{row['ms']:.1f}",
             f"{row['tokens_per_s']:,.0f}", f"{row['gflops']:.1f}", f"{row['peak_gflops']:.0f}",
             f"{100 * row['mfu']:.1f}%", f"{100 * row['palm_mfu']:.1f}%",
             f"{row['vs_pytorch']:.2f}x ({PYTORCH_TOKENS_PER_S[row['shape']]:,})")
    lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
  return '\n'.join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shape', action='append', choices=sorted(SHAPES),
                      help='shapes to time (default: all)')
  parser.add_argument('--steps', type=int, default=10, help='timed steps per shape')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  parser.add_argument('--positions', choices=('learned', 'rotary'),
                      help="override the configs' position encoding")
  parser.add_argument('--dropout', type=float, help="override the configs' dropout rate")
  parser.add_argument('--kernels', choices=ops.MODES,
                      help="override config.backend.cpu_kernels (xla: without Kiln's kernels)")
  parser.add_argument('--accumulation', type=int, action='append',
                      help='micro-batches per step to time (repeatable; default: 1 and the '
                           "shape's fastest measured count)")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0 or any(a < 1 for a in args.accumulation or ()):
    sys.exit(f'error: --steps={args.steps} and --accumulation must be >= 1, '
             f'--warmup={args.warmup} >= 0')
  rows = [row for shape in args.shape or sorted(SHAPES) for row in benchmark(shape, args)]
  print(f'{jax.device_count()} {jax.devices()[0].device_kind} device(s), '
        f'{os.cpu_count()} cores; JAX {jax.__version__}; fp32; {args.warmup} warm-up + '
        f'{args.steps} timed steps; peak = best 2048^3 fp32 matmul measured between steps\n')
  print(markdown_table(rows))


if __name__ == '__main__':
  main()
