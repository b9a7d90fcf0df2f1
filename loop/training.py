"""One training run from a config: build, train, evaluate, checkpoint, summarise.

`train_and_evaluate(config, workdir)` is what train.py runs and what notebooks, tests and
the coming search and debugging entry points call.
"""

import json
import os
import tempfile
import time
from collections.abc import Callable

import jax
from absl import logging
from clu import metric_writers, periodic_actions

from core.errors import KilnError
from core.io import write_json_atomic
from loop import auto_batch, experiment, pretrained, run_config
from loop import guard as guard_lib
from loop.checkpoint import Checkpointer
from loop.preemption import Preemption
from loop.early_stopping import EarlyStopping
from monitor import hardware
from monitor.utilization import UtilizationMeter
from parallel.placement import DevicePrefetcher


def _evaluate(eval_step, state, exp, split: str = 'eval') -> dict[str, float] | None:
  total = exp.evaluate(eval_step, state, split)
  return None if total is None else {k: float(v) for k, v in total.compute().items()}


def write_train_log(writer, schedule, step: int, train_metrics, optimizer_scalars) -> None:
  """Train metrics averaged since the last log, plus the optimizer's view of step `step`."""
  scalars = {f'train_{k}': v for k, v in train_metrics.compute().items()}
  scalars.update({k: float(v) for k, v in optimizer_scalars.items()})
  scalars['learning_rate'] = float(schedule(step - 1))  # The rate step `step` applied.
  writer.write_scalars(step, scalars)


def _write_utilization(writer, meter, step: int, input_wait_seconds: float) -> None:
  scalars = meter.record(step, input_wait_seconds)
  if scalars:  # Empty when an eval took the interval: a bare "[step]" line says nothing.
    writer.write_scalars(step, scalars)


def _start_from_pretrained(exp, state, shardings, checkpoint_dir: str):
  """The fresh state with every parameter another run's checkpoint has (e.g. a pre-trained
  encoder) copied in; the rest (e.g. a new head) keeps its initialization."""
  host = exp.strategy.checkpoint_view(state)

  def load(params):
    if exp.low_rank is None:
      return pretrained.load_pretrained(params, checkpoint_dir)
    # --- low-rank: the factored layers start from the SVD factors of the kernels they
    # replace (U sqrt(S), sqrt(S) V^T), every other leaf from the checkpoint as it is ---
    step, source = pretrained.read_params(checkpoint_dir)
    merged, loaded, kept = pretrained.merge_params(params, exp.low_rank.factored_params(source))
    logging.info('Loaded %d parameter arrays (%d layers as SVD factors) from step %d of %s; '
                 'kept %d as initialized: %s', len(loaded), len(exp.low_rank.ranks), step,
                 checkpoint_dir, len(kept), ', '.join(kept) or 'none')
    return merged
    # --- end low-rank ---

  # Only replaced leaves are read from disk; kept ones stay as they are (on every host).
  # The EMA gets its own copy so that no two state leaves share a donated buffer.
  host = host.replace(
      params=load(host.params),
      ema_params=None if host.ema_params is None else load(host.ema_params))
  if exp.strategy.name == 'pmap':
    return exp.strategy.distribute(host, shardings)
  return pretrained.place(host, shardings)


def _check_writable(workdir: str) -> None:
  """A workdir that cannot hold files fails here, in one line, before any training."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix='.tmp-writable-'):
      pass
  except OSError as error:
    raise KilnError(f'--workdir {workdir} cannot be written ({error.strerror or error}): pass a '
                    'writable folder, or free disk space') from error


def train_and_evaluate(config, workdir: str, stop_at_step: int | None = None,
                       on_eval: Callable[[int, dict[str, float]], bool] | None = None) -> dict:
  """Trains `config` in `workdir`, resuming from its newest readable checkpoint if any.

  SIGTERM or SIGINT (a preemption) checkpoints the step in progress and returns (summary
  'preempted'); the numerics guard (config.guard, loop/guard.py) answers NaN/Inf and loss
  spikes, and its 'stop' policy ends the run with a KilnError after writing summary.json.

  `stop_at_step` ends this call early (with a checkpoint) as a preemption would;
  calling again continues exactly where it stopped. `on_eval(step, eval_metrics)` hears
  every eval and ends the run (checkpointed, no test split; summary 'halted': True) by
  returning True: a search's pruner. Returns the run summary.
  """
  with Preemption() as preemption:
    return _train_and_evaluate(config, workdir, stop_at_step, on_eval, preemption)


def _train_and_evaluate(config, workdir, stop_at_step, on_eval, preemption) -> dict:
  started = time.perf_counter()
  config = auto_batch.resolve(config)  # batch_size='auto' and lr_scaling, before anything else.
  exp = experiment.build_experiment(config)  # Rejects bad input before anything is written.
  if config.init.checkpoint_dir:
    pretrained.newest_step(config.init.checkpoint_dir)  # A bad path fails before any write.
  task, schedule, num_steps = exp.task, exp.schedule, exp.num_steps
  early_stopping = EarlyStopping(config.early_stopping.metric, config.early_stopping.mode,
                                 config.early_stopping.patience)

  _check_writable(workdir)
  if config.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.compilation_cache_dir))
  is_chief = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  writer.write_hparams(config.to_dict())
  if is_chief:  # So that a later run (a distillation student, an export) can rebuild the model.
    run_config.save(config, workdir)

  state, shardings = exp.create_state()
  checkpointer = Checkpointer(workdir, config.keep_checkpoints)
  start_step, stopped_early, halted = 0, False, False
  guard = guard_lib.Guard(exp.step_options.guard)
  data_offset = 0  # Batches skipped by rollbacks: step s trains on batch s + data_offset.

  def restore_newest():
    try:
      return checkpointer.restore_newest(exp.strategy.checkpoint_view(state),
                                         exp.strategy.restore_shardings(shardings))
    except KilnError:
      checkpointer.close()  # An open manager's background threads would outlive the exit.
      raise

  if checkpointer.latest_step() is not None:
    restored, loop_state = restore_newest()
    state = exp.strategy.distribute(restored, shardings)
    early_stopping.load_json(loop_state['early_stopping'])
    stopped_early = loop_state['stopped_early']
    data_offset = loop_state.get('data_offset', 0)
    guard = guard_lib.Guard(exp.step_options.guard, loop_state.get('guard_events'))
    start_step = exp.strategy.step_of(state)
    logging.info('Resumed from step %d in %s', start_step, workdir)
  elif config.init.checkpoint_dir:
    state = _start_from_pretrained(exp, state, shardings, config.init.checkpoint_dir)

  train_step, eval_step = exp.train_step(shardings), exp.eval_step(shardings)
  report_progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
  peak_flops, peak_source = hardware.peak_flops_per_device()
  logging.info('Peak FLOP/s per device: %s (%s)', peak_flops, peak_source)
  meter = UtilizationMeter(exp.train_step_flops(), config.batch_size, jax.device_count(),
                           peak_flops)
  profiler = periodic_actions.Profile(
      logdir=workdir, first_profile=config.profile.first_step,
      num_profile_steps=config.profile.num_steps, profile_duration_ms=None, every_steps=None,
      every_secs=None) if config.profile.num_steps and is_chief else None

  last_step = min(num_steps, stop_at_step) if stop_at_step is not None else num_steps

  def batches_from(first_batch: int) -> DevicePrefetcher:
    return DevicePrefetcher(
        guard_lib.inject(guard.options, exp.train_batches(first_batch), first_batch),
        exp.strategy.place, config.dataset.prefetch_batches)

  train_batches = batches_from(start_step + data_offset)
  guard_stop = None  # The guard event that ended the run (policy 'stop').
  eval_metrics: dict[str, float] = {}
  train_metrics, pending_log = None, None
  eval_seconds, steps_run, compile_seconds = 0.0, 0, None
  loop_started = time.perf_counter()
  step = start_step
  preempted = False
  while step < last_step and not stopped_early and not halted and not preempted and not guard_stop:
    batch = next(train_batches)
    step_started = time.perf_counter()
    state, batch_metrics, optimizer_scalars = train_step(state, batch)
    optimizer_scalars, guard_scalars = guard.split_scalars(optimizer_scalars)
    step += 1
    steps_run += 1
    # --- guard: the step before this one judged now (this one too at the last step) ---
    rollback = None
    for event, bad_batch in guard.review(step, step - 1 + data_offset, guard_scalars, batch,
                                         last=step == last_step):
      if event.kind == 'nonfinite':
        event.layer = guard_lib.locate_in_run(exp, state, bad_batch)
      guard.record(event)
      logging.warning('%s', event.line())
      writer.write_scalars(event.step, {f'guard_{event.kind}': 1.0,
                                        'guard_events': float(len(guard.events))})
      if event.action == 'stop':
        guard_stop = event
      elif event.action == 'rollback' and rollback is None:
        rollback = event
    if guard_stop:
      break
    if rollback is not None:
      checkpointer.wait_until_finished()
      if checkpointer.latest_step() is None:  # Nothing saved yet: back to the initial state.
        fresh, _ = exp.create_state()
        if config.init.checkpoint_dir:
          fresh = _start_from_pretrained(exp, fresh, shardings, config.init.checkpoint_dir)
        restored, loop_state = exp.strategy.checkpoint_view(fresh), {
            'early_stopping': EarlyStopping(config.early_stopping.metric,
                                            config.early_stopping.mode,
                                            config.early_stopping.patience).to_json()}
      else:
        restored, loop_state = restore_newest()
      lr_scale = restored.guard['lr_scale'] * guard.options.rollback_lr_factor
      restored = restored.replace(guard={**restored.guard, 'lr_scale': jax.device_put(
          lr_scale, exp.strategy.restore_shardings(shardings).guard['lr_scale'])})
      state = exp.strategy.distribute(restored, shardings)
      early_stopping.load_json(loop_state['early_stopping'])
      step = exp.strategy.step_of(state)
      # PaLM: past the offending batch, plus the configured number more.
      data_offset = rollback.batch + 1 + guard.options.rollback_skip_batches - step
      train_batches.close()
      train_batches = batches_from(step + data_offset)
      guard.forget_pending()
      train_metrics, pending_log = None, None
      logging.warning('guard: rolled back to step %d; training resumes at batch %d with the '
                      'learning rate scaled by %.3g', step, step + data_offset, float(lr_scale))
      continue
    # --- end guard ---
    if steps_run == 1:  # Compiles; timed alone so that it stays out of the throughput.
      jax.block_until_ready(state)
      compile_seconds = time.perf_counter() - step_started
      meter.start(step, train_batches.wait_seconds)
    train_metrics = batch_metrics if train_metrics is None else train_metrics.merge(batch_metrics)
    # Written one step late, so fetching them never stalls the step just dispatched.
    if pending_log is not None:
      write_train_log(writer, schedule, *pending_log)
      _write_utilization(writer, meter, pending_log[0], train_batches.wait_seconds)
      pending_log = None
    if step % config.log_every_steps == 0:
      pending_log, train_metrics = (step, train_metrics, optimizer_scalars), None
    report_progress(step)
    if profiler is not None:
      profiler(step)

    final = step == num_steps
    if step % config.eval_every_steps == 0 or final:
      eval_started = time.perf_counter()
      eval_metrics = _evaluate(eval_step, state, exp)
      eval_seconds += time.perf_counter() - eval_started
      meter.start(step, train_batches.wait_seconds)  # Eval time is not step time.
      writer.write_scalars(step, {f'eval_{k}': v for k, v in eval_metrics.items()})
      if exp.privacy is not None:  # The budget spent so far, beside what it bought.
        writer.write_scalars(step, {'privacy_epsilon': exp.privacy.epsilon(step),
                                    'privacy_delta': exp.privacy.delta})
      stopped_early = early_stopping.update(eval_metrics)
      if stopped_early:
        logging.info('Early stopping at step %d: %s has not improved for %d evals',
                     step, config.early_stopping.metric, config.early_stopping.patience)
      halted = on_eval is not None and bool(on_eval(step, eval_metrics))
    preempted = preemption.requested_at(step)  # Once: a signal now still gets its checkpoint.
    if (step % config.checkpoint_every_steps == 0 or final or stopped_early or halted
        or step == last_step or preempted):
      checkpointer.save(step, exp.strategy.checkpoint_view(state),
                        {'early_stopping': early_stopping.to_json(), 'stopped_early': stopped_early,
                         'data_offset': data_offset, 'guard_events': guard.to_json()})
  train_seconds = time.perf_counter() - loop_started - eval_seconds
  train_batches.close()
  if pending_log is not None:
    write_train_log(writer, schedule, *pending_log)
    _write_utilization(writer, meter, pending_log[0], train_batches.wait_seconds)
  # The executable is cached: lowering again only looks it up (pmap has no lower()).
  compiled = (train_step.lower(state, batch).compile()
              if steps_run and hasattr(train_step, 'lower') else None)
  memory = hardware.device_memory(compiled)

  if not eval_metrics:  # Resumed a finished run, or stopped before any eval.
    eval_metrics = _evaluate(eval_step, state, exp)
  # The test split, once, with the weights eval uses, when the run is over (not when a call
  # stops at stop_at_step before the end); nothing during training ever reads it.
  test_metrics = None
  run_over = stopped_early or exp.strategy.step_of(state) >= num_steps
  if run_over and not halted and not guard_stop:
    test_metrics = _evaluate(eval_step, state, exp, 'test')
  if test_metrics is not None:
    writer.write_scalars(exp.strategy.step_of(state),
                         {f'test_{k}': v for k, v in test_metrics.items()})
  checkpointer.close()
  writer.flush()
  summary = {
      'final_eval': eval_metrics,
      'steps': exp.strategy.step_of(state),
      'num_train_steps': num_steps,
      'stopped_early': bool(stopped_early),
      'halted': halted,
      'preempted': preempted,  # SIGTERM/SIGINT: checkpointed at 'steps'; run again to go on.
      'guard_events': guard.to_json(),  # Steps whose update the numerics guard dropped.
      'best_eval': {config.early_stopping.metric: early_stopping.best},
      'wall_time_s': time.perf_counter() - started,
      'train_time_s': train_seconds,
      'num_devices': jax.device_count(),
      'num_processes': jax.process_count(),
      'compile_time_s': compile_seconds,
      'peak_memory_bytes': memory['peak_bytes'],
      'peak_memory_source': memory['source'],
      'peak_flops_per_device': peak_flops,
      'train_step_flops': meter.flops_per_step,
      **meter.medians(),  # step_time_s, examples_per_sec, tflops_per_device, mfu, input wait.
  }
  if summary['examples_per_sec'] is None and steps_run:  # Too short for a timed interval.
    summary['examples_per_sec'] = steps_run * config.batch_size / train_seconds
  summary['model_stats'] = exp.model_stats(state)  # Of the final params (compress/stats.py).
  if exp.privacy is not None:  # DP-SGD: the (epsilon, delta) of the steps actually taken.
    summary['privacy'] = exp.privacy.report(summary['steps'])
    logging.info('Privacy: epsilon %.3f at delta %g (%s) after %d steps, noise multiplier %.4f, '
                 'sampling rate %.6f', summary['privacy']['epsilon'], exp.privacy.delta,
                 exp.privacy.accountant, summary['steps'], exp.privacy.noise_multiplier,
                 exp.privacy.sampling_rate)
  fairness = exp.fairness_report(state)  # Groups, their sizes, Group DRO's final weights.
  if fairness is not None:
    summary['fairness'] = fairness
  if exp.lora is not None:  # LoRA: adapters and trainable base leaves against the frozen base.
    view = exp.strategy.checkpoint_view(state)
    summary['lora'] = exp.lora.count(view.params, view.lora)
    logging.info('LoRA: %d of %d parameters trained (%.2f%%)',
                 summary['lora']['adapter_params'] + summary['lora']['trainable_base_params'],
                 summary['lora']['base_params'] + summary['lora']['adapter_params'],
                 100 * summary['lora']['trainable_fraction'])
  if test_metrics is not None:
    summary['test'] = test_metrics
  summary_path = os.path.join(workdir, 'summary.json')
  if is_chief:
    if not steps_run and os.path.exists(summary_path):  # Nothing trained: keep its figures.
      with open(summary_path) as f:
        summary = {**json.load(f), 'final_eval': eval_metrics, 'steps': summary['steps'],
                   'model_stats': summary['model_stats'],
                   **({'test': test_metrics} if test_metrics is not None else {})}
    write_json_atomic(summary_path, summary)
  logging.info('Final eval at step %d: %s', summary['steps'], eval_metrics)
  if test_metrics is not None:
    logging.info('Test at step %d: %s', summary['steps'], test_metrics)
  if guard_stop:
    raise KilnError(f'{guard_stop.line()}: training stopped (config.guard.policy=stop); '
                    f"summary.json and the checkpoints in {workdir} are from before it. Look for "
                    "the cause with doctor.py, or set config.guard.policy='skip' or 'rollback'")
  return summary
