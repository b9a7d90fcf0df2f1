"""An exported artifact against the live JAX model, on the task's held-out data.

Both see the same serving inputs, batch by batch (the test split where the task has one,
else the eval split). The artifact's outputs are scored by the task's own metric code
(`Serving.score`), so its accuracy / mAP / WER / loss is computed exactly as training's
eval computes the model's.
"""

import time
from collections.abc import Callable

import jax
import numpy as np

from export.artifact import Trained


def _valid(value, mask):
  return np.asarray(value)[mask]


def compare(trained: Trained, run: Callable[[dict], dict], live: Callable[[dict], dict],
            max_examples: int = 0) -> dict:
  """max_abs_diff, label_agreement and both metrics over the held-out split (its first
  `max_examples` real examples when > 0)."""
  exp, serving = trained.exp, trained.serving
  score = jax.jit(lambda outputs, batch: serving.score(trained.model, outputs, batch))
  split, batches = 'test', exp.task.test_batches(exp.host_eval_batch)
  if batches is None:
    split, batches = 'eval', exp.task.eval_batches(exp.host_eval_batch)
  artifact_metrics = live_metrics = None
  max_diff, agree, labels, examples = 0.0, 0, 0, 0
  for batch in batches:
    if max_examples and examples >= max_examples:
      break
    mask = np.asarray(batch['mask']) > 0
    if max_examples:  # Cut the last batch at the limit (padding stays masked).
      mask &= np.cumsum(mask) <= max_examples - examples
      batch = {**batch, 'mask': mask.astype(np.asarray(batch['mask']).dtype)}
    inputs = serving.inputs_from_batch(batch)
    got, want = run(inputs), live(inputs)
    missing = set(want) - set(got)
    if missing:
      raise ValueError(f'the artifact answers {sorted(got)}, not {sorted(missing)}')
    for name, value in want.items():
      diff = np.abs(_valid(got[name], mask).astype(np.float64)
                    - _valid(value, mask).astype(np.float64))
      max_diff = max(max_diff, float(diff.max(initial=0.0)))
    same = _valid(serving.predicted_labels(got), mask) == _valid(
        serving.predicted_labels(want), mask)
    agree, labels = agree + int(same.sum()), labels + same.size
    examples += int(mask.sum())
    got_metrics = score({k: np.asarray(v) for k, v in got.items()}, batch)
    want_metrics = score({k: np.asarray(v) for k, v in want.items()}, batch)
    artifact_metrics = got_metrics if artifact_metrics is None else artifact_metrics.merge(
        got_metrics)
    live_metrics = want_metrics if live_metrics is None else live_metrics.merge(want_metrics)
  metric = serving.metric
  return {
      'split': split, 'examples': examples, 'max_abs_diff': max_diff,
      'label_agreement': agree / max(labels, 1), 'metric': metric,
      metric: float(artifact_metrics.compute()[metric]),
      f'jax_{metric}': float(live_metrics.compute()[metric]),
  }


def latency_ms(run: Callable[[dict], dict], example: dict, runs: int) -> dict:
  """Single-example latency percentiles of `run` in its own runtime (after 3 warm-up calls)."""
  for _ in range(3):
    run(example)
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(run(example))
    times.append((time.perf_counter() - start) * 1e3)
  return {'latency_ms_p50': float(np.percentile(times, 50)),
          'latency_ms_p99': float(np.percentile(times, 99))}


def first_example(trained: Trained) -> dict:
  """One held-out example's serving inputs (batch of 1), for latency."""
  batch = next(iter(trained.exp.task.eval_batches(trained.exp.host_eval_batch)))
  return {name: value[:1] for name, value in trained.serving.inputs_from_batch(batch).items()}
