"""`diagnose(config, workdir)`: every check in order, each finding logged as one line, and
`<workdir>/doctor.json` (plus TensorBoard curves and the range test's plot) as the report."""

import dataclasses
import itertools
import os
import time

import jax
import numpy as np
from absl import logging
from clu import metric_writers

from core.errors import KilnError
from core.io import write_json_atomic
from doctor import data_checks, model_checks
from doctor.findings import Finding, problems
from loop import experiment

GROUPS = ('data', 'init', 'overfit', 'lr_range', 'memory')


@dataclasses.dataclass(frozen=True)
class Options:
  """config.doctor, checked."""
  checks: tuple[str, ...] = GROUPS
  sample_examples: int = 2048
  overfit_steps: int = 300
  overfit_target: float = 0.1
  lr_range: tuple[float, float] = (1e-6, 10.0)
  lr_range_steps: int = 100
  lr_scaling: str = 'sqrt'

  @classmethod
  def from_config(cls, config) -> 'Options':
    d = config.doctor
    checks = tuple(c.strip() for c in d.checks.split(',') if c.strip())
    unknown = [c for c in checks if c not in GROUPS]
    if unknown:
      raise KilnError(f"config.doctor.checks names {', '.join(unknown)}: choose from "
                      f"{', '.join(GROUPS)} (comma-separated)")
    low, high = d.lr_range
    if not 0 < low < high:
      raise KilnError(f'config.doctor.lr_range={tuple(d.lr_range)} must be (low, high) with '
                      '0 < low < high')
    return cls(checks=checks, sample_examples=d.sample_examples, overfit_steps=d.overfit_steps,
               overfit_target=d.overfit_target, lr_range=(low, high),
               lr_range_steps=d.lr_range_steps, lr_scaling=d.lr_scaling)


def diagnose(config, workdir: str) -> dict:
  """Builds the run `config` describes (rejecting bad input first) and diagnoses it."""
  options = Options.from_config(config)
  return diagnose_experiment(experiment.build_experiment(config), workdir, options)


def _log(findings: list[Finding]) -> list[Finding]:
  for finding in findings:
    (logging.warning if finding.severity != 'info' else logging.info)('%s', finding.line())
  return findings


def diagnose_experiment(exp, workdir: str, options: Options = Options()) -> dict:
  """The doctor's report for a built experiment (tests plant bugs in one before calling)."""
  started = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() != 0)
  findings: list[Finding] = []
  report: dict = {}
  task = exp.task

  if 'data' in options.checks:
    data_findings, report['data'] = data_checks.run(task, exp.host_batch, options.sample_examples)
    findings += _log(data_findings)

  # The run's own batches: under DP-SGD, padded Poisson samples with their mask.
  first_batch = next(exp.train_batches(0))
  if {'init', 'overfit'} & set(options.checks):
    state, _ = exp.create_state()
    view = exp.strategy.checkpoint_view(state)
    key = jax.random.key(exp.config.seed)
    probed = model_checks.probe(task, exp.template, view.params, view.model_state, first_batch,
                                key)
    # No uniform figure where the loss never calls the task's prediction method (RNN-T).
    uniform = probed['uniform_loss'] if probed['root_called'] else None
    report['initial'] = {'loss': probed['loss'], 'uniform_loss': uniform,
                         'output_std': probed['output_std'], 'layers': probed['layers'],
                         'grad_norms': model_checks.layer_grad_norms(probed['grads'])}
    if 'init' in options.checks:
      findings += _log(model_checks.init_findings(probed))

  if 'overfit' in options.checks:
    overfit, trained = model_checks.overfit_one_batch(
        exp, first_batch, options.overfit_steps, options.overfit_target, probed['uniform_loss'])
    findings += _log(overfit)
    for i, loss in enumerate(trained.losses):
      writer.write_scalars(i + 1, {'doctor/overfit_loss': loss})
    report['overfit'] = {'losses': trained.losses}
    # Gradients after a few steps: a zero-initialised head leaves the rest at zero at step 0.
    view = exp.strategy.checkpoint_view(trained.state)
    after = model_checks.probe(task, exp.template, view.params, view.model_state, first_batch, key)
    norms = model_checks.layer_grad_norms(after['grads'])
    report['trained_grad_norms'] = norms
    findings += _log(model_checks.frozen_findings(norms, probed['unused']))
    eval_batches = list(itertools.islice(task.eval_batches(exp.host_batch), 2))
    if len(eval_batches) == 2:
      findings += _log(model_checks.input_sensitivity(exp, trained.state, eval_batches))

  if 'lr_range' in options.checks and exp.teacher is None:  # A teacher's state is not rebuilt.
    range_findings, report['lr_range'] = model_checks.learning_rate_range(
        exp, exp.train_batches(0), *options.lr_range, options.lr_range_steps,
        workdir, writer)
    findings += _log(range_findings)

  if 'memory' in options.checks:  # Budget and search limit: config.auto_batch.
    findings += _log(model_checks.largest_batch(exp.config, options.lr_scaling))
  writer.flush()
  report.update({
      'findings': [dataclasses.asdict(f) for f in findings],
      'problems': len(problems(findings)),
      'checks': list(options.checks),
      'wall_time_s': time.perf_counter() - started,
  })
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, 'doctor.json'), _jsonable(report))
  report['findings'] = findings
  return report


def _jsonable(tree):
  if isinstance(tree, dict):
    return {str(k): _jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_jsonable(v) for v in tree]
  if isinstance(tree, (np.floating, np.integer)):
    tree = tree.item()
  if isinstance(tree, float) and not np.isfinite(tree):
    return None
  return tree
