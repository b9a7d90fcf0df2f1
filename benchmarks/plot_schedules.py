"""Draws every learning-rate schedule that config.schedule.name can pick into one PNG.

  .venv/bin/python benchmarks/plot_schedules.py [--output docs/schedules.png]

Each panel is built by optim.build_schedule from the base config, so the
picture is what a run gets, not a re-drawing of the formulas.
"""

import argparse
import os

import matplotlib

matplotlib.use('Agg')  # Files only; no display on servers and CI.

import matplotlib.pyplot as plt
import numpy as np

from configs import base
from optim import build_schedule

# (panel title, legend placement, config.schedule fields of each curve).
PANELS = [
    ('constant', {'loc': 'lower right'}, [{'name': 'constant'}]),
    ('cosine (= warmup_cosine)', {'loc': 'upper right'},
     [{'name': 'cosine'}, {'name': 'cosine', 'end_learning_rate_fraction': 0.1}]),
    ('linear', {'loc': 'upper right'},
     [{'name': 'linear'}, {'name': 'linear', 'end_learning_rate_fraction': 0.1}]),
    ('exponential', {'loc': 'upper right'},
     [{'name': 'exponential', 'end_learning_rate_fraction': 0.01},
      {'name': 'exponential', 'end_learning_rate_fraction': 0.1}]),
    ('step', {'loc': 'upper right', 'bbox_to_anchor': (1.0, 0.85)},
     [{'name': 'step', 'boundary_epochs': (6, 12), 'decay_factor': 0.1},
      {'name': 'step', 'boundary_steps': (400, 600, 800), 'decay_factor': 0.5}]),
    ('rsqrt', {'loc': 'upper right'},
     [{'name': 'rsqrt'}, {'name': 'rsqrt', 'rsqrt_timescale_steps': 400}]),
    ('wsd', {'loc': 'lower center'},
     [{'name': 'wsd', 'wsd_decay_shape': shape} for shape in ('linear', 'cosine', '1-sqrt')]),
]


# Short legend names, so a legend does not cover the curves it explains.
SHORT = {'end_learning_rate_fraction': 'end fraction', 'boundary_epochs': 'epochs',
         'boundary_steps': 'steps', 'decay_factor': 'x',
         'rsqrt_timescale_steps': 'timescale', 'wsd_decay_shape': 'shape'}


def _label(fields: dict) -> str:
  extra = {k: v for k, v in fields.items() if k != 'name'}
  return ', '.join(f'{SHORT.get(k, k)} {v}' for k, v in extra.items()) or 'defaults'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--output', default='docs/schedules.png', help='PNG file to write.')
  parser.add_argument('--total_steps', type=int, default=1000, help='Training length in steps.')
  parser.add_argument('--steps_per_epoch', type=int, default=50, help='Steps in one epoch.')
  parser.add_argument('--warmup_steps', type=int, default=100, help='Warmup of every schedule.')
  parser.add_argument('--learning_rate', type=float, default=1.0, help='Peak learning rate.')
  args = parser.parse_args()

  steps = np.arange(args.total_steps + 1)
  fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharex=True)
  for ax, (title, legend, curves) in zip(axes.flat, PANELS, strict=False):
    for fields in curves:
      config = base.get_base_config().schedule
      config.warmup_steps = args.warmup_steps
      config.update(fields)
      schedule = build_schedule(config, args.learning_rate, args.total_steps,
                                args.steps_per_epoch)
      rates = np.broadcast_to(np.asarray(schedule(steps)), steps.shape)
      ax.plot(steps, rates, label=_label(fields))
    ax.set_title(title)
    ax.legend(fontsize=7, **legend)
    ax.grid(alpha=0.3)
  # The spare panel holds the settings every curve shares.
  spare = axes.flat[len(PANELS)]
  spare.axis('off')
  spare.text(0.0, 0.5, f'peak learning rate {args.learning_rate:g}\n'
             f'{args.total_steps} steps, {args.steps_per_epoch} steps per epoch\n'
             f'warmup {args.warmup_steps} steps (linear from 0)\n'
             'end_learning_rate_fraction 0 unless shown\n'
             'wsd: last 20% of the run decays', va='center', fontsize=10)
  for ax in axes[-1]:
    ax.set_xlabel('step')
  for ax in axes[:, 0]:
    ax.set_ylabel('learning rate')
  fig.tight_layout()
  os.makedirs(os.path.dirname(args.output) or '.', exist_ok=True)
  fig.savefig(args.output, dpi=110)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
