"""LSTM training-step throughput on this CPU: Kiln's LSTM (the compiled recurrence kernel and
the plain `lax.scan`) against eager PyTorch `nn.LSTM` of the same shape, in one run.

  nice -n 5 .venv/bin/python benchmarks/lstm_throughput.py [--rounds 15] [--warmup 3]
      [--isa native|avx2] [--skip-ctc] [--torch-threads N ...]

Steps (forward + backward + update, float32):
- 'issue 28': a unidirectional 2-layer x 256 `LSTMEncoder` (frame_stack 1, no dropout) over
  100 frames of 80 features, batch 32, a linear head (10 classes) on the last frame,
  softmax cross-entropy, Adam; one jitted step with the state donated.
- 'BiLSTM CTC': configs/speech_ctc_lstm.py's step built through loop.experiment (its
  clipping + Adam and schedule, CTC loss, dropout), on one FSDD batch already on the device.
PyTorch (when `import torch` works; pip install '.[bench]'): the same models in eager mode:
`nn.LSTM` (its fused CPU cell), `nn.Linear`, cross-entropy or `F.ctc_loss`, `torch.optim.Adam`
(after `clip_grad_norm_` for CTC), with as many threads as cores and with one thread.

The host is shared, so the variants of a step are timed interleaved: each round times one
step of each variant in turn, after one untimed step of it (the first step after another
framework's runs slow, cpu_host.interleaved_times), and rates are medians over the rounds;
'vs PyTorch (best)' is utterances/s over the faster PyTorch setting's in the same rounds, and
'same round' the median over rounds of that ratio within each round (the steps compared are
seconds apart, so a swing of the host's speed that lasts minutes falls on both). 'CPU
ms/step' is the process's CPU time per step (all its threads; PyTorch's spin-waiting threads
count). The fp32 matmul peak (monitor.hardware.measure_cpu_matmul_flops) is measured before
and after; the best is shown.

`--isa avx2` measures as an AVX2-only host would run: Kiln's kernels built with
-mno-avx512f (KILN_CPU_ARCH_FLAGS), XLA's generated code capped at AVX2
(--xla_cpu_max_isa=AVX2) and PyTorch's kernels too (ATEN_CPU_CAPABILITY=avx2,
ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2); these are set before anything reads
them. XLA's library matmuls (YNNPACK) choose their own instruction set at run time.
"""

import argparse
import functools
import os
import statistics
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import cpu_host  # noqa: E402  (imports neither JAX nor torch)


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=15, help='timed rounds (one step per variant)')
  parser.add_argument('--warmup', type=int, default=3, help='untimed steps per variant')
  parser.add_argument('--isa', choices=cpu_host.ISAS, default='native',
                      help='avx2: cap Kiln, XLA and PyTorch at AVX2 (an AVX2-only host)')
  parser.add_argument('--skip-ctc', action='store_true', help='time the issue 28 step only')
  parser.add_argument('--torch-threads', type=int, action='append',
                      help="PyTorch thread counts to time (repeatable; default: the host's cores "
                           'and 1)')
  args = parser.parse_args(argv)
  if args.rounds < 1 or args.warmup < 0 or any(t < 1 for t in args.torch_threads or ()):
    sys.exit(f'error: --rounds={args.rounds} and --torch-threads must be >= 1, '
             f'--warmup={args.warmup} >= 0')
  return args


# Imported (a script reusing the steps), no flags are read: --isa is native unless the importer
# called cpu_host.cap_isa('avx2') first.
ARGS = _parse(sys.argv[1:] if __name__ == '__main__' else [])
cpu_host.cap_isa(ARGS.isa)  # Before JAX, XLA, Kiln's kernel build or torch read them.

import backends  # noqa: E402  (before JAX or TF start threads)

backends.configure_host(may_restart=__name__ == '__main__')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from backends import ops  # noqa: E402
from configs import speech_ctc_lstm  # noqa: E402
from loop import experiment  # noqa: E402
from models.recurrent import LSTMEncoder  # noqa: E402
from monitor import hardware  # noqa: E402

torch = cpu_host.import_torch()

# The issue 28 step's shape.
BATCH, FRAMES, FEATURES, HIDDEN, LAYERS, CLASSES = 32, 100, 80, 256, 2, 10


class _LastFrameClassifier(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.encoder = LSTMEncoder(input_dim=FEATURES, hidden_dim=HIDDEN, num_layers=LAYERS,
                               bidirectional=False, frame_stack=1, dropout_rate=0.0, rngs=rngs)
    self.head = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

  def __call__(self, features, frames):
    hidden, _ = self.encoder(features, frames)
    return self.head(hidden[:, -1])


def kiln_issue_step(kernels: str):
  """-> run(): one jitted Adam step of the issue's classifier, traced with
  config.backend.cpu_kernels = `kernels`."""
  graphdef, params = nnx.split(_LastFrameClassifier(nnx.Rngs(0)), nnx.Param)
  tx = optax.adam(1e-3)
  features = jax.random.normal(jax.random.key(1), (BATCH, FRAMES, FEATURES))
  frames = jnp.full((BATCH,), FRAMES, jnp.int32)
  labels = jax.random.randint(jax.random.key(2), (BATCH,), 0, CLASSES)

  def loss_fn(params, features, frames, labels):
    logits = nnx.merge(graphdef, params)(features, frames)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, *batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  state = [(params, tx.init(params))]

  def run():
    state[0], loss = step(state[0], features, frames, labels)
    jax.block_until_ready(loss)
  with ops.use(kernels):  # The choice is made when the step is traced (its first call).
    run()
  return run


def kiln_ctc_step(kernels: str):
  """-> run(): configs/speech_ctc_lstm.py's train step on one device-resident batch."""
  config = speech_ctc_lstm.get_config()
  config.backend.cpu_kernels = kernels
  exp = experiment.build_experiment(config)
  state, shardings = exp.create_state()
  train_step = exp.train_step(shardings)
  batch = exp.strategy.place(next(iter(exp.task.train_batches(exp.host_batch, 0))))
  holder = [state]

  def run():
    holder[0], *outputs = train_step(holder[0], batch)
    jax.block_until_ready((holder[0], outputs))
  run()  # Compile.
  return run, config


def torch_issue_step():
  lstm = torch.nn.LSTM(FEATURES, HIDDEN, num_layers=LAYERS, batch_first=True)
  head = torch.nn.Linear(HIDDEN, CLASSES)
  params = [*lstm.parameters(), *head.parameters()]
  optimizer = torch.optim.Adam(params, lr=1e-3)
  features = torch.randn(BATCH, FRAMES, FEATURES)
  labels = torch.randint(0, CLASSES, (BATCH,))

  def run():
    optimizer.zero_grad(set_to_none=True)
    hidden, _ = lstm(features)
    torch.nn.functional.cross_entropy(head(hidden[:, -1]), labels).backward()
    optimizer.step()
  return run


def torch_ctc_step(config, vocab_size: int):
  m, audio = config.model, config.audio
  frames = -(-audio.max_frames // m.frame_stack)
  lstm = torch.nn.LSTM(audio.num_mels * m.frame_stack, m.hidden_dim, num_layers=m.num_layers,
                       batch_first=True, bidirectional=True, dropout=m.dropout_rate)
  dropout = torch.nn.Dropout(m.dropout_rate)
  head = torch.nn.Linear(2 * m.hidden_dim, vocab_size)
  params = [*lstm.parameters(), *head.parameters()]
  optimizer = torch.optim.Adam(params, lr=config.optimizer.learning_rate)
  batch = config.batch_size
  features = torch.randn(batch, frames, audio.num_mels * m.frame_stack)
  label_lengths = torch.randint(audio.max_label_len // 2, audio.max_label_len + 1, (batch,))
  labels = torch.randint(1, vocab_size, (batch, audio.max_label_len))
  input_lengths = torch.full((batch,), frames)

  def run():
    optimizer.zero_grad(set_to_none=True)
    hidden, _ = lstm(features)
    log_probs = head(dropout(hidden)).log_softmax(-1).transpose(0, 1)
    torch.nn.functional.ctc_loss(log_probs, labels, input_lengths, label_lengths,
                                 zero_infinity=True).backward()
    torch.nn.utils.clip_grad_norm_(params, config.gradient.clip_global_norm)
    optimizer.step()
  return run


def table(title: str, batch: int, times: dict) -> str:
  """Rows per variant of cpu_host.interleaved_times: 'vs PyTorch' divides by the PyTorch
  thread setting with the lowest median, as medians and as the median over rounds of the
  ratio within each round (steps seconds apart, so the minute-long swings of a shared
  host's speed fall on both alike)."""
  medians = cpu_host.medians(times)
  torch_rows = [name for name in medians if name.startswith('PyTorch')]
  reference = min(torch_rows, key=lambda name: medians[name][0]) if torch_rows else None
  lines = [f'\n{title}\n',
           '| variant | ms/step (median) | utterances/s | CPU ms/step | vs PyTorch (best) | '
           'same round |',
           '| --- | --- | --- | --- | --- | --- |']
  for name, (seconds, cpu) in medians.items():
    ratio = paired = 'not measured (no torch)'
    if reference:
      ratio = f'{medians[reference][0] / seconds:.2f}x'
      within_rounds = zip(times[reference][0], times[name][0])
      paired = f'{statistics.median(r / s for r, s in within_rounds):.2f}x'
    lines.append(f'| {name} | {1e3 * seconds:.1f} | {batch / seconds:.0f} | {1e3 * cpu:.0f} '
                 f'| {ratio} | {paired} |')
  return '\n'.join(lines)


def torch_variants(make_run) -> dict:
  """PyTorch's step with all cores' threads and with one (or --torch-threads)."""
  return cpu_host.torch_thread_variants(make_run, 'PyTorch nn.LSTM (eager)',
                                        ARGS.torch_threads or [os.cpu_count() or 1, 1])


def main() -> None:
  peaks = [hardware.measure_cpu_matmul_flops(repeats=4)]
  issue = {'Kiln LSTMEncoder, compiled recurrence': kiln_issue_step('auto'),
           'Kiln LSTMEncoder, plain lax.scan': kiln_issue_step('xla')}
  if torch is not None:
    issue.update(torch_variants(torch_issue_step))
  reports = [table(f'issue 28 step: {LAYERS} x {HIDDEN} LSTM, {FRAMES} frames x {FEATURES}, '
                   f'batch {BATCH}, head on the last frame, Adam',
                   BATCH, cpu_host.interleaved_times(issue, ARGS.rounds, ARGS.warmup))]
  del issue
  if not ARGS.skip_ctc:
    fast, config = kiln_ctc_step('auto')
    ctc = {'Kiln BiLSTM CTC, compiled recurrence': fast,
           'Kiln BiLSTM CTC, plain lax.scan': kiln_ctc_step('xla')[0]}
    if torch is not None:
      from input_pipeline.audio import VOCAB_SIZE
      ctc.update(torch_variants(lambda: torch_ctc_step(config, VOCAB_SIZE)))
    m = config.model
    reports.append(table(
        f'BiLSTM CTC step (configs/speech_ctc_lstm.py): {m.num_layers} x {m.hidden_dim} per '
        f'direction, {config.audio.max_frames} frames / stack {m.frame_stack}, batch '
        f'{config.batch_size}, dropout {m.dropout_rate}', config.batch_size,
        cpu_host.interleaved_times(ctc, ARGS.rounds, ARGS.warmup)))
  peaks.append(hardware.measure_cpu_matmul_flops(repeats=4))
  print(cpu_host.host_line(ARGS.isa, max(peaks)) + ' (best of before and after)')
  print(f'{ARGS.warmup} warm-up + {ARGS.rounds} interleaved rounds, medians')
  print('\n'.join(reports))


if __name__ == '__main__':
  main()
