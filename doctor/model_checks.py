"""Initialisation and optimisation checks: one probed forward/backward at initialisation,
overfitting one batch, a learning-rate range test (Smith 2017) and the largest batch that
fits device memory. All run the task's real loss and the run's real compiled train step."""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from core.errors import KilnError
from core.paths import path_string
from doctor.findings import Finding
from loop import guard as guard_lib
from loop import auto_batch, layer_probe, steps
from loop.state import create_sharded_state
from optim.chain import build_transform

INITIAL_LOSS_TOLERANCE = 0.25  # Initial loss more than this fraction off the uniform loss.
OUTPUT_STD_LIMIT = 5.0  # Output (logit) std at initialisation above this: overconfident init.
DEAD_LIMIT = 0.5  # Share of a layer's channels negative for every input: dead under ReLU.
ACTIVATION_RMS = (1e-4, 1e3)  # A layer output RMS outside this: vanishing or exploding.
INPUT_SENSITIVITY = 1e-4  # Outputs of two different batches closer than this: input ignored.


def _stats(x) -> dict:
  """RMS, finiteness and (for [..., C] outputs) the share of channels never positive."""
  x = x.astype(jnp.float32)
  out = {'rms': jnp.sqrt(jnp.mean(jnp.square(x))), 'finite': jnp.all(jnp.isfinite(x))}
  if x.ndim >= 2 and x.shape[-1] > 1:
    out['dead'] = jnp.mean(jnp.all(x.reshape(-1, x.shape[-1]) <= 0, axis=0))
  return out


def probe(task, template, params, model_state, batch, key):
  """Jitted: the loss, the uniform-prediction loss (the root output replaced by zeros: ln C
  for C classes, the CTC/RNN-T loss of uniform predictions), per-layer output statistics in
  call order, the root output's std and every parameter's gradient."""
  paths = []

  # The batch and model state are arguments, not constants baked into the compiled program
  # (XLA constant-folds what is computed from constants alone, at compile time).
  def loss_fn(params, model_state, batch):
    model = template.merge(params, model_state)
    with layer_probe.recording(model, root_method=task.prediction_method) as records:
      loss, _ = task.loss(model, batch, nnx.Rngs(dropout=key))
    paths[:] = [path for path, _ in records]
    layer_stats = [[_stats(x) for x in layer_probe.array_leaves(out)][:1] for _, out in records]
    root = layer_probe.array_leaves(records[-1][1]) if records else []
    root_std = jnp.std(root[0].astype(jnp.float32)) if root else jnp.float32(0)
    return loss, (layer_stats, root_std)

  def zeros(out):
    return jax.tree.map(lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.inexact)
                        else x, out)

  def uniform_loss(params, model_state, batch):
    model = template.merge(params, model_state)
    with layer_probe.recording(model, zeros, task.prediction_method):
      return task.loss(model, batch, nnx.Rngs(dropout=key))[0]

  def both(params, model_state, batch):
    (loss, (layer_stats, root_std)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, model_state, batch)
    return loss, uniform_loss(params, model_state, batch), layer_stats, root_std, grads

  loss, uniform, layer_stats, root_std, grads = jax.jit(both)(params, model_state, batch)
  return {'loss': float(loss), 'uniform_loss': float(uniform), 'output_std': float(root_std),
          'root_called': '<model>' in paths,  # Else the loss calls sub-modules (RNN-T).
          'layers': [(path, {k: float(v) for k, v in s[0].items()} if s else {})
                     for path, s in zip(paths, layer_stats)],
          'zero_params': _layers_where(params, lambda leaf: not bool(jnp.any(leaf != 0))),
          'unused': _unused_layers(loss_fn, params, model_state, batch),
          'grads': grads}


def _layer(path) -> str:
  """A parameter's layer: its parent path ('blocks/0/norms/1' of 'blocks/0/norms/1/scale')."""
  return path_string(path).rsplit('/', 1)[0]


def _layers_where(params, predicate) -> set[str]:
  """Layers every one of whose own parameters satisfies `predicate` (a leaf -> bool)."""
  every: dict[str, bool] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    every[_layer(path)] = every.get(_layer(path), True) and predicate(leaf)
  return {layer for layer, holds in every.items() if holds}


def _unused_layers(loss_fn, params, *rest) -> set[str]:
  """Layers none of whose parameters the loss reads (a head another task uses: a classifying
  BERT's masked-LM head). No gradient reaches them by design, so they are not 'frozen'."""
  jaxpr = jax.make_jaxpr(loss_fn)(params, *rest).jaxpr  # Its first inputs are `params`' leaves.
  read = {v for eqn in jaxpr.eqns for v in eqn.invars if not hasattr(v, 'val')}  # Not literals.
  read.update(v for v in jaxpr.outvars if not hasattr(v, 'val'))
  unread = {id(leaf) for leaf, var in zip(jax.tree.leaves(params), jaxpr.invars)
            if var not in read}
  return _layers_where(params, lambda leaf: id(leaf) in unread)


def init_findings(probed: dict) -> list[Finding]:
  out = []
  loss, uniform = probed['loss'], probed['uniform_loss']
  if not math.isfinite(loss):
    out.append(Finding('initial_loss', 'error', f'the initial loss is {loss}',
                       'look for NaN inputs, a log of zero or a division in the loss'))
  elif (probed['root_called'] and uniform > 0
        and abs(loss - uniform) > INITIAL_LOSS_TOLERANCE * uniform):
    # Below uniform is no bug (e.g. box regression from zeros costs more than from an init).
    out.append(Finding('initial_loss', 'info' if loss < uniform else 'error',
                       f'initial loss {loss:.4g}, but uniform predictions score {uniform:.4g} '
                       f'(ln C for C classes): the initial outputs are '
                       f"{'confidently wrong' if loss > uniform else 'already informed'}",
                       'initialise the output layer small (or zero) and check the labels and '
                       'the loss', {'loss': loss, 'uniform_loss': uniform}))
  if probed['output_std'] > OUTPUT_STD_LIMIT:
    out.append(Finding('output_scale', 'warning',
                       f"initial outputs have std {probed['output_std']:.3g} (> "
                       f'{OUTPUT_STD_LIMIT}): the model starts overconfident',
                       'scale down the output layer initialisation'))
  layers = [(p, s) for p, s in probed['layers'] if s and p != '<model>']
  # Zero output from all-zero parameters is a deliberate start (Goyal et al. 2017: each residual
  # block begins as the identity), not a vanishing or dead layer; it learns if its gradient is
  # nonzero, which frozen_layer checks after the overfit steps.
  zero_initialised = [p for p, s in layers if s['rms'] == 0 and p in probed['zero_params']]
  if zero_initialised:
    out.append(Finding('zero_initialised', 'info',
                       f'{len(zero_initialised)} layers output exactly zero from all-zero '
                       f"initial parameters (left out of the scale and dead-unit checks): "
                       f"{', '.join(zero_initialised[:5])}", data={'layers': zero_initialised}))
  hidden = [(p, s) for p, s in layers[:-1] if p not in zero_initialised]  # The head may be < 0.
  layers = [(p, s) for p, s in layers if p not in zero_initialised]
  bad = [p for p, s in layers if not s['finite']]
  if bad:
    out.append(Finding('nonfinite_activations', 'error', f'layer {bad[0]} outputs NaN/Inf at '
                       'initialisation', 'check its initialisation and its inputs'))
  scale = [(p, s['rms']) for p, s in layers if s['finite']
           and not ACTIVATION_RMS[0] <= s['rms'] <= ACTIVATION_RMS[1]]
  if scale:
    out.append(Finding('activation_scale', 'warning',
                       'layer outputs vanish or explode at initialisation: ' + ', '.join(
                           f'{p} rms {r:.3g}' for p, r in scale[:5]),
                       'use fan-in scaled initialisation and normalisation layers'))
  dead = [(p, s['dead']) for p, s in hidden if s.get('dead', 0) > DEAD_LIMIT]
  if dead:
    out.append(Finding('dead_units', 'warning',
                       'channels negative for every example of a batch (dead under ReLU): ' +
                       ', '.join(f'{p} {d:.0%}' for p, d in dead[:5]),
                       'lower the learning rate, check biases and the input scale, or use a '
                       'leaky activation', {'layers': dict(dead)}))
  return out


def layer_grad_norms(grads) -> dict[str, float]:
  """Global gradient norm per layer (a parameter's parent path)."""
  norms: dict[str, float] = {}
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    norms[_layer(path)] = (norms.get(_layer(path), 0.0)
                           + float(jnp.sum(jnp.square(g.astype(jnp.float32)))))
  return {k: math.sqrt(v) for k, v in norms.items()}


def frozen_findings(norms: dict[str, float], unused: set[str] = frozenset()) -> list[Finding]:
  """Layers with zero gradient; those the loss never reads (`unused`) are reported, not blamed."""
  out = []
  if unused:
    out.append(Finding('unused_layers', 'info',
                       f"{len(unused)} layers take no part in this task's loss (no gradient by "
                       'design; if not, the forward pass skips them): '
                       f"{', '.join(sorted(unused)[:6])}",
                       data={'layers': sorted(unused)}))
  frozen = [layer for layer, n in norms.items() if n == 0.0 and layer not in unused]
  if not frozen or len(frozen) == len(norms) - len(unused):
    return out
  return out + [Finding('frozen_layer', 'error',
                  f"{len(frozen)} of {len(norms)} layers get exactly zero gradient after a few "
                  f"steps: {', '.join(frozen[:6])}",
                  'look for stop_gradient, a detached branch, an output multiplied by zero or '
                  'parameters the optimizer masks', {'layers': frozen})]


@dataclasses.dataclass
class Trained:
  """What the overfit check leaves for the checks that need a trained model."""
  state: object
  losses: list


def _step_loss(batch_metrics, scalars) -> float:
  values = batch_metrics.compute()
  if 'loss' in values:
    return float(values['loss'])
  return float(scalars['guard_loss'])


class _OneDraw:
  """`task` with its training randomness (dropout masks, a masked LM's corruption) drawn once:
  the overfit check then memorises one fixed problem, as one batch's host-side augmentation is
  fixed once drawn. A masked LM re-corrupted at every step is a new problem each step."""

  def __init__(self, task, key):
    self._task, self._key = task, key

  def __getattr__(self, name):
    return getattr(self._task, name)

  def loss(self, model, batch, rngs):
    del rngs
    return self._task.loss(model, batch, nnx.Rngs(dropout=self._key))

  def example_train_losses(self, model, batch, rngs):
    del rngs
    return self._task.example_train_losses(model, batch, nnx.Rngs(dropout=self._key))


def overfit_one_batch(exp, host_batch, num_steps: int, target: float, uniform: float
                      ) -> tuple[list[Finding], Trained]:
  """Trains the run's own step on one batch, its randomness drawn once; the loss should fall
  near zero."""
  state, shardings = exp.create_state()
  train_step = exp.train_step(shardings, _OneDraw(exp.task, jax.random.key(exp.config.seed)))
  batch = exp.strategy.place(host_batch)
  losses = []
  for _ in range(num_steps):
    state, batch_metrics, scalars = train_step(state, batch)
    losses.append(_step_loss(batch_metrics, scalars))
    if len(losses) >= 10 and max(losses[-5:]) < target * uniform:
      break
  trained = Trained(state, losses)
  first, last = losses[0], float(np.mean(losses[-5:]))
  data = {'first_loss': first, 'last_loss': last, 'steps': len(losses), 'target': target * uniform}
  if math.isfinite(last) and last < target * uniform:
    return [Finding('overfit_one_batch', 'info', f'one batch memorised: loss {first:.3g} -> '
                    f'{last:.3g} in {len(losses)} steps', data=data)], trained
  if not math.isfinite(last) or last > first:
    suspect = ('the learning rate is too high (the loss rose or diverged)', 'lower the learning '
               'rate (see learning_rate_range) and add warmup or gradient clipping')
  elif last > 0.9 * first:
    suspect = ('the model barely learns: a learning rate far too low, frozen layers, or outputs '
               'that ignore the input', 'see the other findings; raise the learning rate')
  else:
    suspect = ('learning is slow: capacity, regularisation (dropout, weight decay) or the '
               'learning rate', 'raise capacity or the learning rate, lower regularisation')
  return [Finding('overfit_failed', 'error',
                  f'one batch not memorised in {len(losses)} steps: loss {first:.3g} -> '
                  f'{last:.3g} (target < {target * uniform:.3g}); suspect: {suspect[0]}',
                  suspect[1], data)], trained


def input_sensitivity(exp, state, batches) -> list[Finding]:
  """Outputs on two different batches: identical outputs mean the input is ignored."""
  view = exp.strategy.checkpoint_view(state)
  params, model_state = view.params, view.model_state

  def root_output(batch):
    model = exp.template.merge(params, model_state)
    with layer_probe.recording(model, root_method=exp.task.prediction_method) as records:
      exp.task.evaluate(model, batch)
    root = [out for path, out in records if path == '<model>']
    return layer_probe.array_leaves(root[0])[0].astype(jnp.float32) if root else None

  a, b = (jax.jit(root_output)(batch) for batch in batches)
  if a is None:  # The task's eval calls sub-modules only (RNN-T decoding): nothing to compare.
    return []
  n = min(a.shape[0], b.shape[0])
  difference = float(jnp.mean(jnp.abs(a[:n] - b[:n])) / (jnp.mean(jnp.abs(a[:n])) + 1e-12))
  if difference >= INPUT_SENSITIVITY:
    return []
  return [Finding('input_ignored', 'error',
                  f'the trained model gives the same outputs for two different batches '
                  f'(relative difference {difference:.2g}): its outputs ignore the input',
                  'check that the forward pass uses its input (a wrong variable, a zeroed or '
                  'detached input path, a constant fed instead of the batch)',
                  {'relative_difference': difference})]


def learning_rate_range(exp, batches, low: float, high: float, num_steps: int, workdir: str,
                        writer=None) -> tuple[list[Finding], dict]:
  """Smith (2017): the rate grows exponentially from `low` to `high` over successive training
  batches; the suggestion is a tenth of the rate at the lowest smoothed loss."""
  config = exp.config
  rates = low * (high / low) ** (np.arange(num_steps) / max(num_steps - 1, 1))
  tx = build_transform(config, lambda step: low * (high / low) ** (
      step / max(num_steps - 1, 1)))
  options = dataclasses.replace(exp.step_options, guard=guard_lib.GuardOptions())
  state, shardings = create_sharded_state(exp.template, tx, config.seed, exp.mesh, exp.rules,
                                          exp.use_ema, options.pruning, lora=exp.lora,
                                          fairness=options.fairness)
  state = exp.strategy.distribute(state, shardings)
  train_step = exp.strategy.compile_train(steps.train_step_fn(
      exp.task, exp.template, tx, options,
      mesh=exp.mesh if exp.strategy.name == 'jit' else None,
      axis_name=exp.strategy.norm_axis_name, lora=exp.lora), shardings)
  losses, smoothed, average = [], [], 0.0
  for i, host_batch in zip(range(num_steps), batches):
    state, batch_metrics, scalars = train_step(state, exp.strategy.place(host_batch))
    loss = _step_loss(batch_metrics, scalars)
    losses.append(loss)
    average = 0.9 * average + 0.1 * loss
    smoothed.append(average / (1 - 0.9 ** (i + 1)))
    if not math.isfinite(loss) or (i > 10 and smoothed[-1] > 4 * min(smoothed)):
      break
  best = int(np.nanargmin(smoothed))
  suggested = float(rates[best] / 10)
  data = {'rates': rates[:len(losses)].tolist(), 'losses': losses, 'smoothed': smoothed,
          'suggested': suggested, 'lowest_loss_rate': float(rates[best])}
  if writer is not None:
    for i, (rate, loss) in enumerate(zip(rates, smoothed)):
      writer.write_scalars(i, {'doctor/lr_range_rate': float(rate),
                               'doctor/lr_range_loss': float(loss)})
  plot = _plot_range(data, os.path.join(workdir, 'doctor_lr_range.png'))
  findings = [Finding('learning_rate_range', 'info',
                      f'smoothed loss lowest at rate {rates[best]:.3g}; suggested rate '
                      f'{suggested:.3g} (a tenth of it){f"; plot: {plot}" if plot else ""}',
                      data=data)]
  configured = config.optimizer.learning_rate
  if config.optimizer.name != 'adafactor':  # Its "rate" is a relative step size.
    ratio = configured / suggested
    if ratio > 10:
      findings.append(Finding('learning_rate', 'error',
                              f'config.optimizer.learning_rate={configured:g} is {ratio:.0f}x the '
                              f'range test\'s suggestion {suggested:.3g}: too high',
                              f'set --config.optimizer.learning_rate={suggested:.2g}',
                              {'configured': configured, 'suggested': suggested}))
    elif ratio < 0.02:
      findings.append(Finding('learning_rate', 'warning',
                              f'config.optimizer.learning_rate={configured:g} is 1/{1 / ratio:.0f} '
                              f'of the range test\'s suggestion {suggested:.3g}: likely too low',
                              f'try --config.optimizer.learning_rate={suggested:.2g}',
                              {'configured': configured, 'suggested': suggested}))
  return findings, data


def _plot_range(data: dict, path: str) -> str:
  try:
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
  except ImportError:
    return ''
  figure, axis = plt.subplots(figsize=(6, 4))
  axis.semilogx(data['rates'], data['smoothed'][:len(data['rates'])], label='smoothed loss')
  axis.axvline(data['suggested'], color='g', linestyle='--', label='suggested')
  axis.set_xlabel('learning rate')
  axis.set_ylabel('training loss')
  axis.legend()
  figure.tight_layout()
  tmp = path + '.tmp.png'
  figure.savefig(tmp)
  plt.close(figure)
  os.replace(tmp, path)
  return path


def largest_batch(config, scaling: str) -> list[Finding]:
  """loop.auto_batch's search (the largest global batch whose compiled step fits
  config.auto_batch's memory budget), with the learning rate moved to it by `scaling` from the
  rate config.batch_size has."""
  try:
    found = auto_batch.search(config)
  except KilnError as error:
    return [Finding('largest_batch', 'warning', str(error),
                    'lower the batch size or use gradient accumulation')]
  reference = ml_collections.ConfigDict(config.to_dict())
  reference.optimizer.lr_scaling, reference.optimizer.reference_batch_size = (
      scaling, config.batch_size)
  rate = auto_batch.scaled_learning_rate(reference, found.batch_size)
  bound = ('the search limit' if found.next_size is None
           else f'{found.next_size} does not')
  peak = found.measured[found.batch_size]
  return [Finding('largest_batch', 'info',
                  f'global batch {found.batch_size} fits ({peak / 2**30:.2f} GiB peak per device '
                  f'of {found.budget_bytes / 2**30:.2f} GiB, {found.budget_source}; {bound}); '
                  f'with the {scaling} rule its learning rate is {rate:.3g}',
                  data={'batch_size': found.batch_size, 'learning_rate': rate,
                        'measured_bytes': {str(k): v for k, v in found.measured.items()},
                        'budget_bytes': found.budget_bytes})]
