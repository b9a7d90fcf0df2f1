"""The numerics guard (config.guard): a bad step's update is dropped inside the jitted step,
and the loop then skips on, rolls back to the last good checkpoint, or stops.

Inside the step (`check`, then loop/steps.py's `lax.cond` around the update): the loss and
the global gradient norm must be finite, and the loss must not exceed the mean of the last
`window` accepted losses by more than `spike_zscore` standard deviations. A step that fails
either keeps the state it started from (only the step counter moves on), so nothing
non-finite ever reaches the params or the optimizer moments, whatever the policy. On the
host (`Guard`), read one step late so that the check never stalls the step just dispatched:
each event is logged, named (the first layer whose output went non-finite, from
`loop.layer_probe`), kept for summary.json (`guard_events`) and answered by the policy:
'skip' carries on; 'rollback' restores the last checkpoint, jumps the data past the
offending batch plus `rollback_skip_batches` more (PaLM restarted ~100 steps before each
spike and skipped 200-500 batches) and optionally cuts the learning rate; 'stop' ends the
run with one line.
"""

import dataclasses
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core.errors import KilnError
from core.paths import path_string
from loop import layer_probe

POLICIES = ('off', 'skip', 'rollback', 'stop')
SCALAR_PREFIX = 'guard_'  # Train-step scalars the loop reads every step (not at log steps).


@dataclasses.dataclass(frozen=True)
class GuardOptions:
  """What the step and the loop need of config.guard."""
  policy: str = 'off'
  spike_zscore: float = 0.0  # 0: non-finite values only.
  window: int = 50
  min_history: int = 20
  rollback_skip_batches: int = 0
  rollback_lr_factor: float = 1.0
  max_rollbacks: int = 5
  inject_nan_at_step: int = -1  # Tests: the batch of this step (0-based) gets NaN inputs.

  @classmethod
  def from_config(cls, config) -> 'GuardOptions':
    g = config.get('guard')
    if g is None:  # A fork's config from before the guard: off.
      return cls()
    if g.min_history > g.window:
      raise KilnError(f'config.guard.min_history={g.min_history} exceeds config.guard.window='
                      f'{g.window}: the z-score needs that many losses in the window')
    return cls(policy=g.policy, spike_zscore=g.spike_zscore, window=g.window,
               min_history=g.min_history, rollback_skip_batches=g.rollback_skip_batches,
               rollback_lr_factor=g.rollback_lr_factor, max_rollbacks=g.max_rollbacks,
               inject_nan_at_step=g.inject_nan_at_step)

  @property
  def on(self) -> bool:
    return self.policy != 'off'


def init_state(options: GuardOptions) -> dict | None:
  """The guard's part of the train state: recent accepted losses and the learning-rate
  scale rollbacks cut (None with the guard off, so that state and checkpoints are as before)."""
  if not options.on:
    return None
  return {'losses': jnp.zeros((options.window,), jnp.float32),
          'count': jnp.zeros((), jnp.int32),  # Accepted losses seen (the window fills first).
          'lr_scale': jnp.ones((), jnp.float32)}


def check(options: GuardOptions, guard_state: dict, loss, grad_norm):
  """In the step: (ok, new guard state, scalars). The scalars are this step's loss, z-score
  and whether it was non-finite or a spike, as float32 (read by the loop one step late)."""
  loss = jnp.asarray(loss, jnp.float32)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  losses, count = guard_state['losses'], guard_state['count']
  filled = jnp.minimum(count, options.window)
  valid = jnp.arange(options.window) < filled
  mean = jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(filled, 1)
  var = jnp.sum(jnp.where(valid, (losses - mean) ** 2, 0.0)) / jnp.maximum(filled - 1, 1)
  zscore = jnp.where(filled >= 2, (loss - mean) / (jnp.sqrt(var) + 1e-6 * jnp.abs(mean) + 1e-12),
                     0.0)
  spike = finite & (options.spike_zscore > 0) & (filled >= options.min_history) & (
      zscore > options.spike_zscore)
  ok = finite & ~spike
  slot = count % options.window
  new_state = dict(guard_state,
                   losses=jnp.where(ok, losses.at[slot].set(loss), losses),
                   count=count + ok.astype(jnp.int32))
  scalars = {'guard_loss': loss, 'guard_zscore': jnp.where(finite, zscore, jnp.nan),
             'guard_nonfinite': (~finite).astype(jnp.float32),
             'guard_spike': spike.astype(jnp.float32)}
  return ok, new_state, scalars


def poison(batch: dict) -> dict:
  """`batch` with NaN in its floating-point inputs (masks too when nothing else is a float):
  what config.guard.inject_nan_at_step feeds the step, as a corrupt record would."""
  floats = [k for k, v in batch.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
  targets = [k for k in floats if 'mask' not in k] or floats
  if not targets:
    raise KilnError('config.guard.inject_nan_at_step needs a batch with floating-point arrays '
                    'and this task has none: leave it at -1')
  out = dict(batch)
  for key in targets:
    values = np.array(batch[key], copy=True)
    values.reshape(-1)[::7] = np.nan  # Every 7th value: every example, most channels.
    out[key] = values
  return out


def inject(options: GuardOptions, host_batches: Iterator[dict], first_batch: int):
  """`host_batches` (whose first is batch `first_batch`) with the batch that
  config.guard.inject_nan_at_step names poisoned; the stream itself when it names none."""
  target = options.inject_nan_at_step
  if target < first_batch:
    return host_batches

  def poisoned():
    for index, batch in enumerate(host_batches, first_batch):
      yield poison(batch) if index == target else batch
  return poisoned()


def _all_finite(tree) -> jax.Array:
  leaves = layer_probe.array_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def locate(task, template, params: dict, model_state: dict, batch: dict, key) -> str:
  """Where a step's first non-finite value appears: the inputs, a parameter, the first
  layer (in call order) whose output is not finite, or past the forward pass. Re-runs the
  step's training forward with every layer's output checked (loop/layer_probe.py); every
  check runs inside one jitted call, so that its answers are replicated scalars that any
  process can read."""
  names = {}

  def checked(params, model_state, batch):
    model = template.merge(params, model_state)
    with layer_probe.recording(model) as records:
      loss, _ = task.loss(model, batch, nnx.Rngs(dropout=key))
    names['layers'] = [path for path, _ in records]
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    names['params'] = [path_string(p) for p, _ in flat_params]
    names['inputs'] = sorted(k for k, v in batch.items() if jnp.issubdtype(v.dtype, jnp.inexact))
    return (jnp.isfinite(loss), [_all_finite(out) for _, out in records],
            [_all_finite(v) for _, v in flat_params],
            [_all_finite(batch[k]) for k in names['inputs']])

  loss_ok, layers_ok, params_ok, inputs_ok = jax.device_get(
      jax.jit(checked)(params, model_state, batch))
  found = []
  bad_inputs = [k for k, ok in zip(names['inputs'], inputs_ok) if not ok]
  if bad_inputs:
    found.append('inputs ' + ', '.join(f"batch['{k}']" for k in bad_inputs) + ' hold NaN/Inf')
  bad_params = [p for p, ok in zip(names['params'], params_ok) if not ok]
  if bad_params:
    found.append(f'parameter {bad_params[0]} holds NaN/Inf')
  layer = next((path for path, ok in zip(names['layers'], layers_ok) if not ok), None)
  if layer is not None:
    where = f'layer {layer}'
  elif not loss_ok:
    where = 'the loss (every layer output finite)'
  else:
    where = 'the backward pass (forward finite)'
  return '; '.join([where, *found])


@dataclasses.dataclass
class Event:
  step: int  # The optimizer step (1-based, as logged) whose update was dropped.
  batch: int  # The batch index it trained on (0-based; rollbacks move batches past steps).
  kind: str  # 'nonfinite' or 'spike'.
  loss: float | None  # None when not finite (JSON has no NaN).
  zscore: float | None
  action: str  # What the policy did: 'skip', 'rollback', 'stop'.
  layer: str = ''  # Where the first non-finite value appeared (non-finite events only).

  def line(self) -> str:
    if self.kind == 'spike':
      what = f'loss {self.loss:.4g} is a spike (z-score {self.zscore:.1f})'
    else:
      what = 'loss or gradient norm not finite' + (
          f' (loss {self.loss:.4g})' if self.loss is not None else '')
    where = f'; first non-finite output: {self.layer}' if self.layer else ''
    return f'guard: step {self.step} (batch {self.batch}): {what}{where}; action: {self.action}'


class Guard:
  """The loop's side: events read from the step's scalars, one step late."""

  def __init__(self, options: GuardOptions, events: list[dict] | None = None):
    self.options = options
    self.events = [Event(**e) for e in (events or [])]
    self.rollbacks = sum(e.action == 'rollback' for e in self.events)
    self._pending = None  # (step, batch index, guard scalars, batch) not yet judged.

  def split_scalars(self, scalars: dict) -> tuple[dict, dict]:
    """(the optimizer's scalars, the guard's) from one step's scalar outputs."""
    own = {k: v for k, v in scalars.items() if k.startswith(SCALAR_PREFIX)}
    return {k: v for k, v in scalars.items() if k not in own}, own

  def event(self, step: int, batch: int, scalars: dict) -> Event | None:
    """The event of `step`, whose scalars are `scalars` (fetched now), or None."""
    if not self.options.on or not scalars:
      return None
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    if not values['guard_nonfinite'] and not values['guard_spike']:
      return None
    action = self.options.policy
    if action == 'rollback' and self.rollbacks >= self.options.max_rollbacks:
      action = 'stop'
    kind = 'nonfinite' if values['guard_nonfinite'] else 'spike'
    finite_or_none = lambda x: x if math.isfinite(x) else None  # noqa: E731 (JSON has no NaN)
    return Event(step=step, batch=batch, kind=kind, loss=finite_or_none(values['guard_loss']),
                 zscore=finite_or_none(values['guard_zscore']), action=action)

  def review(self, step: int, batch_index: int, scalars: dict, batch, last: bool
             ) -> list[tuple[Event, dict]]:
    """Events to answer now, each with the batch that caused it: the previous step's (read
    one step late, so that reading never stalls the step just dispatched) and, at the run's
    last step, this one's too."""
    if not self.options.on:
      return []
    judged = [self._pending] if self._pending is not None else []
    self._pending = (step, batch_index, scalars, batch)
    if last:
      judged.append(self._pending)
      self._pending = None
    events = [(self.event(*entry[:3]), entry[3]) for entry in judged]
    return [(event, bad_batch) for event, bad_batch in events if event is not None]

  def forget_pending(self) -> None:
    """After a rollback: the step in flight belongs to the discarded timeline."""
    self._pending = None

  def record(self, event: Event) -> None:
    self.events.append(event)
    self.rollbacks += event.action == 'rollback'

  def to_json(self) -> list[dict]:
    return [dataclasses.asdict(e) for e in self.events]


def locate_in_run(exp, state, batch) -> str:
  """`locate` for a step of the run `exp` (a loop.experiment.Experiment) on `batch` as the
  strategy placed it, from `state` (the params the step started from, or the next ones)."""
  view = exp.strategy.checkpoint_view(state)
  if exp.strategy.name == 'pmap':  # Stacked per device: back to one batch.
    batch = jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), batch)
  key = jax.random.fold_in(jax.random.wrap_key_data(view.rng), view.step)
  params = view.params if exp.lora is None else exp.lora.apply(view.params, view.lora,
                                                               freeze=False)
  return locate(exp.task, exp.template, params, view.model_state, batch, key)
