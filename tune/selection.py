"""Model selection by successive halving: every candidate config trains on the same data with
the same budget, the better half goes on with twice the budget, until one remains at the full
budget; then a leaderboard of every candidate at the furthest round it reached.

Budgets are in epochs (examples seen), so candidates with different batch sizes still see the
same data. Every run is an ordinary `train_and_evaluate` in <root>/round<i>/<candidate>.
"""

import dataclasses
import math
import os
import statistics
import time

import jax
import ml_collections
import numpy as np

from core.errors import KilnError
from core.io import write_json_atomic, write_text_atomic
from loop import trained as trained_lib
from loop.training import train_and_evaluate
from tune.space import apply_overrides, load_config_module

LEADERBOARD_JSON = 'leaderboard.json'
LEADERBOARD_MD = 'leaderboard.md'
LATENCY_RUNS = 30  # Single-example calls timed for each candidate's median latency.


@dataclasses.dataclass(frozen=True)
class Candidate:
  name: str  # The config file's name, unique among the candidates.
  config_path: str
  config: ml_collections.ConfigDict


def load_candidates(paths: list[str], overrides: dict | None = None) -> list[Candidate]:
  """The candidates' configs, each with `overrides`; all must train one task on one dataset."""
  if len(paths) < 2:
    raise KilnError(f'--candidates lists {len(paths)} config: give two or more, comma-separated')
  candidates = []
  for path in paths:
    config = load_config_module(path).get_config()
    candidates.append(Candidate(os.path.splitext(os.path.basename(path))[0], path,
                                apply_overrides(config, overrides or {})))
  names = [c.name for c in candidates]
  if len(set(names)) != len(names):
    raise KilnError(f'--candidates repeats a config name ({names}): give each file once')
  data = {(c.config.task, c.config.dataset.name) for c in candidates}
  if len(data) != 1:
    raise KilnError(f'candidates train different tasks or data {sorted(data)}: compare models on '
                    'the same task and dataset')
  return candidates


def round_budgets(num_candidates: int, budget_epochs: float) -> list[float]:
  """Epochs of each round: the last is the full budget, each earlier one half the next."""
  if budget_epochs <= 0:
    raise KilnError(f'--budget_epochs={budget_epochs} must be positive')
  rounds = math.ceil(math.log2(num_candidates))
  return [budget_epochs / 2 ** (rounds - i) for i in range(rounds + 1)]


def _run(candidate: Candidate, epochs: float, seed: int, workdir: str) -> dict:
  config = apply_overrides(candidate.config, {'num_epochs': float(epochs), 'num_train_steps': -1,
                                              'seed': seed})
  return train_and_evaluate(config, workdir)


def inference_latency_s(workdir: str) -> float:
  """Median seconds of one held-out example through the trained model (compiled, batch 1)."""
  model = trained_lib.load(workdir)
  predict = jax.jit(trained_lib.predict_fn(model.model, model.serving))
  batch = next(iter(model.exp.task.eval_batches(model.exp.host_eval_batch)))
  inputs = {k: np.asarray(v)[:1] for k, v in model.serving.inputs_from_batch(batch).items()}
  jax.block_until_ready(predict(inputs))  # Compiles.
  times = []
  for _ in range(LATENCY_RUNS):
    started = time.perf_counter()
    jax.block_until_ready(predict(inputs))
    times.append(time.perf_counter() - started)
  return statistics.median(times)


def _row(candidate: Candidate, round_index: int, epochs: float, summary: dict, metric: str,
         seed: int, workdir: str) -> dict:
  test = summary.get('test') or {}
  return {'candidate': candidate.name, 'config': candidate.config_path, 'round': round_index,
          'epochs': epochs, 'steps': summary['steps'],
          f'val_{metric}': summary['final_eval'][metric],
          f'test_{metric}': test.get(metric), 'params': summary['model_stats']['params'],
          'train_time_s': summary['train_time_s'], 'examples_per_sec': summary['examples_per_sec'],
          'latency_ms_per_example': 1e3 * inference_latency_s(workdir), 'seed': seed,
          'workdir': workdir}


def successive_halving(candidates: list[Candidate], budget_epochs: float, root: str,
                       metric: str = 'accuracy', mode: str = 'max', seed: int = 0) -> list[dict]:
  """The leaderboard: one row per candidate at its furthest round, best first."""
  if mode not in ('max', 'min'):
    raise KilnError(f"--mode='{mode}' must be 'max' or 'min'")
  sign = -1.0 if mode == 'max' else 1.0
  alive, rows = list(candidates), {}
  for index, epochs in enumerate(round_budgets(len(candidates), budget_epochs)):
    scored = []
    for candidate in alive:
      workdir = os.path.join(root, f'round{index}', candidate.name)
      summary = _run(candidate, epochs, seed, workdir)
      if metric not in summary['final_eval']:
        raise KilnError(f"--metric='{metric}' is not an eval metric of {candidate.name}: choose "
                        f"one of {', '.join(summary['final_eval'])}")
      rows[candidate.name] = _row(candidate, index, epochs, summary, metric, seed, workdir)
      scored.append((sign * summary['final_eval'][metric], alive.index(candidate), candidate))
    scored.sort(key=lambda s: s[:2])  # Ties keep the candidates' order: repeatable.
    alive = [c for _, _, c in scored[:math.ceil(len(scored) / 2)]] if len(scored) > 1 else alive
  board = sorted(rows.values(), key=lambda r: (-r['round'], sign * r[f'val_{metric}']))
  return board


def full_budget_best(candidates: list[Candidate], budget_epochs: float, root: str,
                     metric: str = 'accuracy', mode: str = 'max', seed: int = 0,
                     board: list[dict] = ()) -> list[dict]:
  """Every candidate trained at the full budget (the check successive halving should pass).
  A `board` row already trained at the full budget (the halving's last round) is that run:
  same config, seed and epochs, so it is reused rather than trained again."""
  sign = -1.0 if mode == 'max' else 1.0
  done = {r['candidate']: r for r in board if r['epochs'] == budget_epochs}
  out = []
  for candidate in candidates:
    if candidate.name in done:
      row = done[candidate.name]
      out.append({'candidate': candidate.name, f'val_{metric}': row[f'val_{metric}'],
                  'steps': row['steps'], 'workdir': row['workdir']})
      continue
    workdir = os.path.join(root, 'full', candidate.name)
    summary = _run(candidate, budget_epochs, seed, workdir)
    out.append({'candidate': candidate.name, f'val_{metric}': summary['final_eval'][metric],
                'steps': summary['steps'], 'workdir': workdir})
  return sorted(out, key=lambda r: sign * r[f'val_{metric}'])


def markdown(board: list[dict], metric: str) -> str:
  columns = ['candidate', 'round', 'epochs', f'val_{metric}', f'test_{metric}', 'params',
             'train_time_s', 'examples_per_sec', 'latency_ms_per_example', 'seed']

  def cell(value):
    if value is None:
      return '-'
    if isinstance(value, float):
      return f'{value:.4g}'
    return f'{value:,}' if isinstance(value, int) and not isinstance(value, bool) else str(value)
  lines = ['| rank | ' + ' | '.join(columns) + ' |', '|' + ' --- |' * (len(columns) + 1)]
  for rank, row in enumerate(board, 1):
    lines.append(f'| {rank} | ' + ' | '.join(cell(row[c]) for c in columns) + ' |')
  return '\n'.join(lines) + '\n'


def write_leaderboard(board: list[dict], root: str, metric: str, extra: dict | None = None) -> str:
  text = markdown(board, metric)
  write_json_atomic(os.path.join(root, LEADERBOARD_JSON), {'leaderboard': board, **(extra or {})})
  write_text_atomic(os.path.join(root, LEADERBOARD_MD), text)
  return text
