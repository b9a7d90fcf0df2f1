"""What each compression costs: pruning, N:M sparsity, low-rank factoring, LoRA and
distillation, each run through train.py with config flags, then one table and three plots.

  .venv/bin/python benchmarks/compression.py [--root runs/compression] [--only mnist,gpt,bert]
      [--runs mnist_dense,mnist_2of4] [--dry_run] [--plots docs]

Every run trains into --root/<name> with the command shown in the table; a run whose
summary.json exists is not run again, so an interrupted sweep continues where it stopped
and a run made by hand (same command) is reused. Runs that start from another run (N:M
retraining, low-rank fine-tuning, LoRA, distillation) follow it in the list.
"""

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The MNIST CNN's first conv has 3x3x1 = 9 input rows, which groups of 4 do not divide: as in
# ASP, it stays dense (so does the classifier, whose 10 outputs ASP also skips).
N_M_EXCLUDE = r'bias$|scale$|norm|embed|stages/0/0/conv|classifier'
# A CNN with 1/11 of the MNIST CNN's parameters (79,634 of 870,826), trained alone and distilled
# for the same steps. Neither run gets the teacher's shifts or dropout (Hinton et al. 2015's
# MNIST setting): with them the student alone was already as well regularised as its
# capacity allowed and soft targets closed 0-29% of the gap; without them the teacher's soft
# targets carry what that regularisation taught it.
MNIST_STUDENT = {'model.features': '(16, 32)', 'model.dense_features': 40,
                 'model.dropout_rate': 0.0, 'augment.crop': 'none'}
STUDENT_EPOCHS = 6.0  # The teacher's length; the same for alone and distilled.
GPT_STUDENT = {'model.num_layers': 2}


@dataclasses.dataclass(frozen=True)
class Run:
  name: str  # Workdir under --root, and the table's row name.
  group: str  # mnist, gpt or bert (--only).
  method: str  # Table column: dense, magnitude, n:m, low-rank, lora, distilled, alone.
  setting: str  # Table column: what was set (sparsity, rank, T).
  config: str  # Config file.
  flags: dict = dataclasses.field(default_factory=dict)  # --config.<key>=<value> overrides.
  after: tuple[str, ...] = ()  # Runs whose workdirs the flags name ({root}/<name>).
  x: float | None = None  # The plot's x value (sparsity, kept parameter fraction, T).


def sweep() -> list[Run]:
  mnist, gpt = 'configs/mnist_cnn.py', 'configs/gpt_shakespeare_char_cpu.py'
  runs = [Run('mnist_dense', 'mnist', 'dense', '-', mnist, x=0.0)]
  for sparsity in (0.5, 0.75, 0.9):
    runs.append(Run(f'mnist_magnitude_{int(sparsity * 100)}', 'mnist', 'magnitude (gradual)',
                    f'sparsity {sparsity}', mnist, {'pruning.target_sparsity': sparsity},
                    x=sparsity))
  runs.append(Run('mnist_2of4', 'mnist', 'n:m (ASP: prune once, retrain)', '2:4', mnist,
                  {'init.checkpoint_dir': '{root}/mnist_dense', 'pruning.method': 'n_m',
                   'pruning.exclude': N_M_EXCLUDE}, after=('mnist_dense',), x=0.5))
  for ratio in (0.0625, 0.125, 0.25):
    runs.append(Run(f'mnist_low_rank_{ratio}', 'mnist', 'low-rank dense layers (SVD + 1 epoch)',
                    f'rank ratio {ratio}', mnist,
                    {'init.checkpoint_dir': '{root}/mnist_dense', 'low_rank.rank_ratio': ratio,
                     'low_rank.include': 'hidden',  # The dense layers (the classifier stays).
                     'num_epochs': 1.0, 'optimizer.learning_rate': 2e-4,
                     'schedule.warmup_steps': 0}, after=('mnist_dense',), x=ratio))
  student = {**MNIST_STUDENT, 'num_epochs': STUDENT_EPOCHS}
  runs.append(Run('mnist_student_alone', 'mnist', 'student alone', '-', mnist, student))
  for temperature in (2, 4, 8):
    runs.append(Run(f'mnist_student_T{temperature}', 'mnist', 'student distilled',
                    f'T={temperature}', mnist,
                    {**student, 'distillation.teacher_workdir': '{root}/mnist_dense',
                     'distillation.temperature': float(temperature)},
                    after=('mnist_dense',), x=temperature))
  runs += [
      Run('gpt_dense', 'gpt', 'dense', '-', gpt, x=0.0),
      Run('gpt_magnitude_50', 'gpt', 'magnitude (gradual)', 'sparsity 0.5', gpt,
          {'pruning.target_sparsity': 0.5}, x=0.5),
      Run('gpt_student_alone', 'gpt', 'student alone (2 layers)', '-', gpt, GPT_STUDENT),
      Run('gpt_student_distilled', 'gpt', 'student distilled (2 layers)', 'T=2', gpt,
          {**GPT_STUDENT, 'distillation.teacher_workdir': '{root}/gpt_dense',
           'distillation.temperature': 2.0}, after=('gpt_dense',), x=2),
  ]
  classify = 'configs/bert_classify_shakespeare.py'
  runs += [
      Run('bert_mlm', 'bert', 'pre-training (masked LM)', '-', 'configs/bert_mlm_shakespeare.py'),
  ]
  for seed in (0, 1):
    base = {'init.checkpoint_dir': '{root}/bert_mlm', 'seed': seed}
    runs += [
        Run(f'bert_full_seed{seed}', 'bert', 'full fine-tuning', f'seed {seed}', classify, base,
            after=('bert_mlm',)),
        Run(f'bert_lora8_seed{seed}', 'bert', 'LoRA', f'rank 8, lr 3e-3, seed {seed}', classify,
            {**base, 'lora.rank': 8, 'optimizer.learning_rate': 3e-3}, after=('bert_mlm',)),
    ]
  return runs


def command(run: Run, root: str) -> list[str]:
  flags = [f'--config.{key}={str(value).format(root=root)}' for key, value in run.flags.items()]
  return [sys.executable, 'train.py', f'--config={run.config}',
          f'--workdir={os.path.join(root, run.name)}', *flags]


def display_command(run: Run, root: str) -> str:
  return ' '.join(shlex.quote(part) for part in ['.venv/bin/python', *command(run, root)[1:]])


def read_summary(root: str, run: Run) -> dict | None:
  path = os.path.join(root, run.name, 'summary.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  # A run stopped by SIGTERM/SIGINT wrote its summary at the step it checkpointed: run it on.
  return None if summary.get('preempted') else summary


def quality(summary: dict) -> tuple[str, float]:
  """(metric name, value): a language model's validation loss; else test accuracy where
  the run has a test split, else validation accuracy."""
  if 'bits_per_char' in summary['final_eval']:  # Language models: judged by their loss.
    return 'final_eval loss', summary['final_eval']['loss']
  for split in ('test', 'final_eval'):
    metrics = summary.get(split) or {}
    if 'accuracy' in metrics:
      return f'{split} accuracy', metrics['accuracy']
  return 'final_eval loss', summary['final_eval']['loss']


def table(runs: list[Run], root: str) -> list[str]:
  lines = ['| run | method | setting | metric | value | params | nonzero | bytes dense | '
           'bytes sparse | wall s | command |',
           '|' + ' --- |' * 11]
  for run in runs:
    summary = read_summary(root, run)
    if summary is None:
      lines.append(f'| {run.name} | {run.method} | {run.setting} | (not run) |||||||'
                   f' `{display_command(run, root)}` |')
      continue
    metric, value = quality(summary)
    stats = summary.get('model_stats', {})
    lines.append(
        f"| {run.name} | {run.method} | {run.setting} | {metric} | {value:.4f} | "
        f"{stats.get('params', '?'):,} | {stats.get('nonzero_params', '?'):,} | "
        f"{stats.get('bytes_dense', '?'):,} | {stats.get('bytes_sparse', '?'):,} | "
        f"{summary['wall_time_s']:.0f} | `{display_command(run, root)}` |")
  return lines


def plot(runs: list[Run], root: str, folder: str) -> list[str]:
  """Accuracy vs sparsity, accuracy vs rank, distilled vs alone: PNGs in `folder`."""
  import matplotlib
  matplotlib.use('Agg')  # Files only: no display on servers and CI.
  import matplotlib.pyplot as plt

  done = {run.name: (run, read_summary(root, run)) for run in runs}
  done = {name: (run, s) for name, (run, s) in done.items() if s is not None}

  def value(name):
    return quality(done[name][1])[1] * 100

  written = []

  def save(fig, name):
    path = os.path.join(folder, name)
    fig.tight_layout()
    fig.savefig(path + '.tmp.png', dpi=110)
    os.replace(path + '.tmp.png', path)  # Never a half-written picture.
    plt.close(fig)
    written.append(path)

  magnitude = sorted((run.x, value(name)) for name, (run, _) in done.items()
                     if run.group == 'mnist' and run.method.startswith(('dense', 'magnitude')))
  if len(magnitude) > 1:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(*zip(*magnitude), 'o-', label='gradual magnitude (Zhu & Gupta)')
    if 'mnist_2of4' in done:
      ax.plot([0.5], [value('mnist_2of4')], 's', label='2:4 (ASP)')
    ax.set(xlabel='sparsity of prunable weights', ylabel='MNIST test accuracy (%)',
           title='MNIST CNN: accuracy vs sparsity')
    ax.legend()
    save(fig, 'compression_sparsity.png')

  ranks = sorted((run.x, value(name)) for name, (run, _) in done.items()
                 if run.method.startswith('low-rank'))
  if ranks:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(*zip(*ranks), 'o-', label='SVD-factored, 1 epoch fine-tune')
    if 'mnist_dense' in done:
      ax.axhline(value('mnist_dense'), color='gray', linestyle='--', label='dense')
    ax.set(xscale='log', xlabel='rank / min(rows, cols)', ylabel='MNIST test accuracy (%)',
           title='MNIST CNN: accuracy vs rank')
    ax.legend()
    save(fig, 'compression_rank.png')

  distilled = sorted((run.x, value(name)) for name, (run, _) in done.items()
                     if run.group == 'mnist' and run.method == 'student distilled')
  if distilled and 'mnist_student_alone' in done:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(*zip(*distilled), 'o-', label='student distilled')
    ax.axhline(value('mnist_student_alone'), color='C1', linestyle='--', label='student alone')
    if 'mnist_dense' in done:
      ax.axhline(value('mnist_dense'), color='gray', linestyle=':', label='teacher')
    ax.set(xscale='log', xticks=[2, 4, 8], xticklabels=['2', '4', '8'], xlabel='temperature T',
           ylabel='MNIST test accuracy (%)', title='Distillation: same student, same steps')
    ax.minorticks_off()  # Log-axis minor labels (3x10^0) would clutter the three temperatures.
    ax.legend()
    save(fig, 'compression_distillation.png')
  return written


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default='runs/compression', help='folder of the run workdirs')
  parser.add_argument('--only', default='mnist,gpt,bert', help='comma-separated groups to run')
  parser.add_argument('--runs', default='',
                      help='comma-separated run names to run (default: all in --only)')
  parser.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  parser.add_argument('--plots', default='docs', help="folder for the PNGs ('' for none)")
  args = parser.parse_args(argv)
  groups = set(args.only.split(','))
  runs = [run for run in sweep() if run.group in groups]
  names = set(filter(None, args.runs.split(',')))
  unknown = names - {run.name for run in runs}
  if unknown:
    parser.error(f'--runs names unknown runs {sorted(unknown)}; --dry_run lists the names')
  for run in runs:
    if read_summary(args.root, run) is not None or (names and run.name not in names):
      continue
    print('$', display_command(run, args.root), flush=True)
    if not args.dry_run:
      subprocess.run(command(run, args.root), cwd=REPO_ROOT, check=True)
  print('\n'.join(table(runs, args.root)))
  if args.plots and not args.dry_run:
    for path in plot(runs, args.root, args.plots):
      print('wrote', path)


if __name__ == '__main__':
  main()
