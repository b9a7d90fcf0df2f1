"""The numerics guard's price and its rescue, measured in one run.

  .venv/bin/python benchmarks/guard.py overhead [CONFIG.py ...] [--rounds 6] [--steps 10]
  .venv/bin/python benchmarks/guard.py rescue [--config configs/default.py] [--nan_step 300]

overhead: per config, the train step with config.guard.policy='off' and 'skip' (the default),
compiled side by side and timed step by step in alternating order (so that load from other
processes falls on both alike); prints median step times, the median ratio of neighbouring
steps (the overhead) and the ratio of the fastest steps (what a quiet host would see).
rescue: the config trained clean, then with NaN pixels injected into one batch under 'skip'
and 'rollback'; prints final accuracy of each and its distance from the clean run.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import backends  # noqa: E402  (first: before JAX or TF start threads)

backends.configure_host(may_restart=__name__ == '__main__')

import jax  # noqa: E402

from benchmarks.throughput import load_config  # noqa: E402
from loop import experiment  # noqa: E402

OVERHEAD_CONFIGS = ('configs/default.py', 'configs/gpt_shakespeare_char_cpu.py')


def _compiled(config_path: str, policy: str):
  config = load_config(config_path)
  config.guard.policy = policy
  exp = experiment.build_experiment(config)
  state, shardings = exp.create_state()
  return exp, state, exp.train_step(shardings)


def overhead(config_path: str, rounds: int, steps: int) -> dict:
  runs = {policy: list(_compiled(config_path, policy)) for policy in ('off', 'skip')}
  exp = runs['off'][0]
  host_batches = exp.task.train_batches(exp.host_batch, 0)
  batches = [exp.strategy.place(next(host_batches)) for _ in range(steps)]
  times = {policy: [] for policy in runs}
  ratios = []  # skip / off of two neighbouring steps: load that drifts falls on both alike.
  for round_index in range(rounds + 1):  # Round 0 compiles and warms up, untimed.
    for step_index, batch in enumerate(batches):
      order = ('off', 'skip') if (round_index + step_index) % 2 else ('skip', 'off')
      pair = {}
      for policy in order:  # Neither always first.
        run = runs[policy]
        _, state, train_step = run
        started = time.perf_counter()
        state, *outputs = train_step(state, batch)
        jax.block_until_ready((state, outputs))
        pair[policy] = time.perf_counter() - started
        run[1] = state
      if round_index:
        for policy, seconds in pair.items():
          times[policy].append(seconds)
        ratios.append(pair['skip'] / pair['off'])
  off, skip = (statistics.median(times[p]) for p in ('off', 'skip'))
  return {'config': config_path, 'off_ms': 1e3 * off, 'skip_ms': 1e3 * skip,
          'overhead': statistics.median(ratios) - 1,
          'fastest_overhead': min(times['skip']) / min(times['off']) - 1,
          'steps': len(times['off'])}


def rescue(config_path: str, nan_step: int) -> list[dict]:
  import train  # Heavy: only this mode trains.
  rows = []
  for policy in ('clean', 'skip', 'rollback'):
    config = load_config(config_path)
    if policy != 'clean':
      config.guard.policy = policy
      config.guard.inject_nan_at_step = nan_step
    with tempfile.TemporaryDirectory() as workdir:
      summary = train.train_and_evaluate(config, workdir)
    rows.append({'run': policy, 'accuracy': summary['final_eval']['accuracy'],
                 'events': summary['guard_events']})
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('mode', choices=('overhead', 'rescue'))
  parser.add_argument('configs', nargs='*', default=list(OVERHEAD_CONFIGS))
  parser.add_argument('--rounds', type=int, default=6, help='alternating timed blocks')
  parser.add_argument('--steps', type=int, default=10, help='steps per block')
  parser.add_argument('--config', default='configs/default.py', help='rescue: the config')
  parser.add_argument('--nan_step', type=int, default=300, help='rescue: the poisoned batch')
  args = parser.parse_args(argv)
  if args.mode == 'overhead':
    print('| config | step, guard off (ms) | step, guard skip (ms) | overhead (median of pairs) '
          '| overhead (fastest steps) | timed steps each |')
    print('| --- | --- | --- | --- | --- | --- |')
    for path in args.configs:
      row = overhead(path, args.rounds, args.steps)
      print(f"| {row['config']} | {row['off_ms']:.2f} | {row['skip_ms']:.2f} | "
            f"{100 * row['overhead']:+.1f}% | {100 * row['fastest_overhead']:+.1f}% | {row['steps']} |",
            flush=True)
  else:
    rows = rescue(args.config, args.nan_step)
    clean = rows[0]['accuracy']
    print('| run | final accuracy | vs clean (points) | guard events |')
    print('| --- | --- | --- | --- |')
    for row in rows:
      events = '; '.join(f"step {e['step']} {e['kind']} at {e['layer']}" for e in row['events'])
      print(f"| {row['run']} | {100 * row['accuracy']:.2f}% | "
            f"{100 * (row['accuracy'] - clean):+.2f} | {events or '-'} |")


if __name__ == '__main__':
  main()
