"""GPT training-step throughput on this machine, against eager PyTorch of the same shape
measured in the same run.

  .venv/bin/python benchmarks/gpt_throughput.py [--rounds 5] [--steps-per-round 2]
      [--warmup 2] [--shape baby] [--shape cpu] [--positions learned|rotary]
      [--dropout RATE] [--kernels auto|xla|cpu] [--isa native|avx2] [--torch-threads N ...]

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

PyTorch (when `import torch` works; pip install '.[bench]'): nanoGPT's model written out
in eager mode with the same shape (layers, heads, width, context, batch, vocabulary, bias,
tied embeddings, dropout; learned positions, nanoGPT having no rotary ones), exact GELU,
`scaled_dot_product_attention`, cross-entropy, `clip_grad_norm_` and AdamW with nanoGPT's
decay groups, as one batch and in the same micro-batches as Kiln, with as many threads as
cores and with one (on a shared host its OpenMP threads wait at every barrier; one thread
can be faster). 'vs PyTorch' divides by the fastest of those, never by a figure from another
machine; without torch the column says so, and the header line still names the host's
instruction sets and matmul peak.

The host is shared, so a shape's variants (Kiln and PyTorch, each micro-batch count) run in
alternating rounds, `--steps-per-round` steps of each in turn (back to back within a
variant, as in training: interleaving single steps slowed the 8-micro-batch step from 944
to 1,146 ms, an interference train.py never has), each turn after one untimed step (the
first step after the other framework's runs slow, cpu_host.interleaved), and rates are
medians over all rounds.
The CPU matmul peak (monitor.hardware.measure_cpu_matmul_flops, not the cached figure) is
probed in every round; MFU divides by the best probe. MFU = analytic model FLOPs
(GPT.forward_flops: each matmul, causal attention counted half) per second / that peak;
'MFU, PaLM count' uses 6N + 12*L*H*Q*T per token instead (full attention), the count of the
PaLM paper and of nanoGPT's estimate_mfu. `--isa avx2` caps Kiln's kernels, XLA and PyTorch
at AVX2 (benchmarks/cpu_host.py), as an AVX2-only host runs.
"""

import argparse
import os
import sys
import types

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import cpu_host  # noqa: E402  (imports neither JAX nor torch)

SHAPE_NAMES = ('baby', 'cpu')


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shape', action='append', choices=SHAPE_NAMES,
                      help='shapes to time (default: all)')
  parser.add_argument('--rounds', type=int, default=5, help='alternating rounds per shape')
  parser.add_argument('--steps-per-round', type=int, default=2,
                      help='timed steps of each variant per round')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  parser.add_argument('--positions', choices=('learned', 'rotary'),
                      help="override the configs' position encoding (Kiln only)")
  parser.add_argument('--dropout', type=float, help="override the configs' dropout rate")
  parser.add_argument('--kernels', help="override config.backend.cpu_kernels (auto, xla: "
                                         "without Kiln's kernels, cpu)")
  parser.add_argument('--accumulation', type=int, action='append',
                      help='micro-batches per step to time (repeatable; default: 1 and the '
                           "shape's fastest measured count)")
  parser.add_argument('--isa', choices=cpu_host.ISAS, default='native',
                      help='avx2: cap Kiln, XLA and PyTorch at AVX2 (an AVX2-only host)')
  parser.add_argument('--torch-threads', type=int, action='append',
                      help="PyTorch thread counts to time (repeatable; default: the host's cores "
                           'and 1)')
  args = parser.parse_args(argv)
  if (min(args.rounds, args.steps_per_round) < 1 or args.warmup < 0 or
      any(a < 1 for a in tuple(args.accumulation or ()) + tuple(args.torch_threads or ()))):
    sys.exit(f'error: --rounds={args.rounds}, --steps-per-round={args.steps_per_round}, '
             f'--accumulation and --torch-threads must be >= 1, --warmup={args.warmup} >= 0')
  return args


ARGS = _parse(sys.argv[1:] if __name__ == '__main__' else [])
cpu_host.cap_isa(ARGS.isa)  # Before JAX, XLA, Kiln's kernel build or torch read them.

import backends  # noqa: E402  (before JAX or TF start threads)

backends.configure_host(may_restart=__name__ == '__main__')

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

torch = cpu_host.import_torch()

VOCAB_SIZE = 65  # Characters of tiny Shakespeare.
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


def torch_gpt_step(config, accumulation: int):
  """One eager PyTorch training step (nanoGPT's model and update) of `config`'s shape, as a
  no-argument function; dropout and the fixed random batch as in Kiln's step."""
  nn, F = torch.nn, torch.nn.functional
  m, length, batch = config.model, config.dataset.seq_len, config.batch_size
  width, heads, bias, rate = m.embed_dim, m.num_heads, m.use_bias, m.dropout_rate
  mlp = m.get('mlp_ratio', 4) * width  # GPT's default ratio where the config leaves it out.

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln1, self.ln2 = nn.LayerNorm(width, bias=bias), nn.LayerNorm(width, bias=bias)
      self.qkv = nn.Linear(width, 3 * width, bias=bias)
      self.proj = nn.Linear(width, width, bias=bias)
      self.fc1 = nn.Linear(width, mlp, bias=bias)
      self.fc2 = nn.Linear(mlp, width, bias=bias)
      self.drop = nn.Dropout(rate)

    def forward(self, x):
      rows = x.shape[0]
      q, k, v = self.qkv(self.ln1(x)).view(rows, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
      attended = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                dropout_p=rate if self.training else 0.0)
      x = x + self.drop(self.proj(attended.transpose(1, 2).reshape(rows, length, width)))
      return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.tokens, self.positions = nn.Embedding(VOCAB_SIZE, width), nn.Embedding(length, width)
      self.blocks = nn.ModuleList(Block() for _ in range(m.num_layers))
      self.ln, self.drop = nn.LayerNorm(width, bias=bias), nn.Dropout(rate)
      self.head = None if m.tie_embeddings else nn.Linear(width, VOCAB_SIZE, bias=False)

    def forward(self, tokens):
      x = self.drop(self.tokens(tokens) + self.positions(torch.arange(length)))
      for block in self.blocks:
        x = block(x)
      x = self.ln(x)
      return x @ self.tokens.weight.T if self.head is None else self.head(x)

  torch.manual_seed(0)
  model = GPT().train()
  decayed = [p for p in model.parameters() if p.dim() >= 2]  # nanoGPT's groups.
  kept = [p for p in model.parameters() if p.dim() < 2]
  adam = config.optimizer.adam
  optimizer = torch.optim.AdamW(
      [{'params': decayed, 'weight_decay': config.regularization.weight_decay},
       {'params': kept, 'weight_decay': 0.0}],
      lr=config.optimizer.learning_rate, betas=(adam.b1, adam.b2))
  tokens = torch.randint(0, VOCAB_SIZE, (batch, length + 1))
  micro = batch // accumulation

  def run():
    optimizer.zero_grad(set_to_none=True)
    for start in range(0, batch, micro):
      chunk = tokens[start:start + micro]
      logits = model(chunk[:, :-1])
      loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), chunk[:, 1:].reshape(-1))
      (loss / accumulation).backward()
    if config.gradient.clip_global_norm:
      nn.utils.clip_grad_norm_(model.parameters(), config.gradient.clip_global_norm)
    optimizer.step()
  return run


def _kiln_step(shape: str, count: int):
  """(config, no-argument step function, FLOPs per step, PaLM-count FLOPs per step)."""
  config, train_step, state, batch, flops_per_step, palm = _compiled_step(shape, count, ARGS)
  holder = {'state': state}

  def run():
    holder['state'], *outputs = train_step(holder['state'], batch)
    jax.block_until_ready((holder['state'], outputs))
  return config, run, flops_per_step, palm


def benchmark(shape: str) -> list[dict]:
  """One row per variant: Kiln at each micro-batch count, then PyTorch at 1 and at the
  shape's count, all timed in the same alternating rounds."""
  counts = ARGS.accumulation or sorted({1, SHAPES[shape][2]})
  variants, kiln = {}, {}
  for count in counts:
    config, run, flops_per_step, palm = _kiln_step(shape, count)
    name = f'Kiln, {count} micro-batch{"es" if count > 1 else ""}'
    variants[name], kiln[name] = run, (config, flops_per_step, palm)
  if torch is not None:
    learned = '' if kiln[name][0].model.positions == 'learned' else ' (learned positions)'
    for count in sorted({1, max(counts)}):
      config = _config(shape, ARGS.positions, ARGS.dropout, count, ARGS.kernels)
      variants.update(cpu_host.torch_thread_variants(
          lambda config=config, count=count: torch_gpt_step(config, count),
          f'PyTorch eager{learned}, {count} micro-batch{"es" if count > 1 else ""}',
          ARGS.torch_threads or [os.cpu_count() or 1, 1]))
  peaks = []
  probe = 'matmul peak probe'  # Timed like a variant so that every round probes once.
  variants[probe] = lambda: peaks.append(hardware.measure_cpu_matmul_flops(repeats=2))
  medians = cpu_host.interleaved(variants, ARGS.rounds, ARGS.warmup, ARGS.steps_per_round)
  del medians[probe]
  peak = max(peaks)  # The best probe of the whole shape: a slow spell lowers no row's bar.
  reference = min((seconds for name, (seconds, _) in medians.items()
                   if name.startswith('PyTorch')), default=None)
  base = next(iter(kiln.values()))[0]
  tokens_per_step = base.batch_size * base.dataset.seq_len
  rows = []
  for name, (seconds, cpu_seconds) in medians.items():
    config, flops_per_step, palm = kiln.get(name, (base, None, None))
    rows.append({'shape': shape, 'config': config, 'variant': name, 'ms': 1e3 * seconds,
                 'cpu_ms': 1e3 * cpu_seconds, 'tokens_per_s': tokens_per_step / seconds,
                 'gflops': flops_per_step / seconds / 1e9 if flops_per_step else None,
                 'mfu': flops_per_step / seconds / peak if flops_per_step else None,
                 'palm_mfu': palm / seconds / peak if palm else None,
                 'vs_pytorch': reference / seconds if reference else None, 'peak': peak})
  return rows


def markdown_table(rows: list[dict]) -> str:
  header = ('shape', 'variant', 'ms/step (median)', 'tokens/s', 'CPU ms/step', 'GFLOP/s',
            'MFU', 'MFU, PaLM count', 'vs PyTorch (best, this run)')
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  for row in rows:
    m = row['config'].model
    shape = (f"{row['shape']}: {m.num_layers}L {m.num_heads}H {m.embed_dim}E "
             f"T{row['config'].dataset.seq_len} B{row['config'].batch_size} {m.positions}, "
             f"dropout {m.dropout_rate}, kernels {row['config'].backend.cpu_kernels}")
    percent = lambda x: f'{100 * x:.1f}%' if x is not None else '-'
    cells = (shape, row['variant'], f"{row['ms']:.1f}", f"{row['tokens_per_s']:,.0f}",
             f"{row['cpu_ms']:.0f}", f"{row['gflops']:.1f}" if row['gflops'] else '-',
             percent(row['mfu']), percent(row['palm_mfu']),
             f"{row['vs_pytorch']:.2f}x" if row['vs_pytorch'] else 'not measured (no torch)')
    lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
  return '\n'.join(lines)


def main() -> None:
  if ARGS.kernels not in (None, *ops.MODES):
    sys.exit(f"error: --kernels={ARGS.kernels} must be one of {', '.join(ops.MODES)}")
  rows = [row for shape in ARGS.shape or SHAPE_NAMES for row in benchmark(shape)]
  print(cpu_host.host_line(ARGS.isa, max(row['peak'] for row in rows)) +
        ' (best probe, one per round)')
  print(f'{jax.device_count()} {jax.devices()[0].device_kind} device(s); fp32; '
        f'{ARGS.warmup} warm-up steps, then {ARGS.rounds} alternating rounds of '
        f'{ARGS.steps_per_round} steps per variant, medians\n')
  print(markdown_table(rows))


if __name__ == '__main__':
  main()
