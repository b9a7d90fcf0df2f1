"""Every optimizer against an independent NumPy float64 transcription of its paper.

The references below never call Optax: each is the published update rule
written out step by step, run on a quadratic and on a tiny MLP (gradients by
hand-written backprop), and compared with build_optimizer's trajectory.
Hyper-parameters are picked so that the usual near-misses (eps inside vs outside
the square root, a non-zero initial accumulator, decay not scaled by the
learning rate) move the parameters by far more than the 1e-6 tolerance;
test_near_misses_are_caught checks that on Optax's own variants.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from core.errors import KilnError
from optim import build_optimizer, build_schedule

STEPS = 6
TOL = {'rtol': 1e-6, 'atol': 1e-6}


@pytest.fixture(autouse=True)
def float64():
  # The references are float64; so is JAX here, so 1e-6 measures the rule, not rounding.
  with jax.enable_x64(True):
    yield


# ---- Problems: parameters as nested dicts (int keys included) and their gradients ----

def _flatten(tree, prefix=()):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = np.asarray(value, np.float64)
  return out


def _unflatten(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


class Quadratic:
  """f = 0.5 v'Av - b'v + 0.5 tr(M'AM) - tr(B'M), A symmetric positive definite."""

  def __init__(self):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(6, 6))
    self.a = q @ q.T / 6 + np.eye(6)
    self.b = rng.normal(size=6)
    self.bm = rng.normal(size=(6, 3))
    self.init = {'vec': rng.normal(size=6), 'mat': rng.normal(size=(6, 3))}

  def np_grads(self, p):
    return {('vec',): self.a @ p[('vec',)] - self.b, ('mat',): self.a @ p[('mat',)] - self.bm}

  def jax_grads(self, params):
    def loss(p):
      v, m = p['vec'], p['mat']
      return (0.5 * v @ self.a @ v - self.b @ v + 0.5 * jnp.sum(m * (self.a @ m))
              - jnp.sum(self.bm * m))
    return jax.grad(loss)(params)


class Mlp:
  """Two tanh-hidden layers' worth of parameters, squared error on fixed data."""

  def __init__(self):
    rng = np.random.default_rng(1)
    self.x = rng.normal(size=(16, 4))
    self.y = rng.normal(size=(16, 3))
    self.init = {'layers': {
        0: {'kernel': rng.normal(size=(4, 8)) / 2, 'bias': rng.normal(size=8) / 10},
        1: {'kernel': rng.normal(size=(8, 3)) / 3, 'bias': np.zeros(3) + 0.1}}}

  def np_grads(self, p):
    w0, b0 = p[('layers', 0, 'kernel')], p[('layers', 0, 'bias')]
    w1, b1 = p[('layers', 1, 'kernel')], p[('layers', 1, 'bias')]
    h = np.tanh(self.x @ w0 + b0)
    d_out = (h @ w1 + b1 - self.y) / len(self.x)
    d_h = (d_out @ w1.T) * (1 - h ** 2)
    return {('layers', 0, 'kernel'): self.x.T @ d_h, ('layers', 0, 'bias'): d_h.sum(0),
            ('layers', 1, 'kernel'): h.T @ d_out, ('layers', 1, 'bias'): d_out.sum(0)}

  def loss(self, p):
    h = jnp.tanh(self.x @ p['layers'][0]['kernel'] + p['layers'][0]['bias'])
    out = h @ p['layers'][1]['kernel'] + p['layers'][1]['bias']
    return 0.5 * jnp.sum((out - self.y) ** 2) / len(self.x)

  def jax_grads(self, params):
    return jax.grad(self.loss)(params)


PROBLEMS = {'quadratic': Quadratic, 'mlp': Mlp}


def _decay_kernels_only(path) -> bool:
  return path[-1] in ('kernel', 'mat')


# ---- The published rules in NumPy float64 (t counts from 1; lr(t - 1) as Optax calls it) ----

class Sgd:
  """m = mu m + g; w -= lr (m, or g + mu m for Nesterov) (+ lr wd w where decayed)."""

  def __init__(self, lr, momentum=0.0, nesterov=False, wd=0.0, mask=None):
    self.lr, self.mu, self.nesterov, self.wd, self.mask = lr, momentum, nesterov, wd, mask
    self.m = {}

  def step(self, p, g, t):
    out = {}
    for k in p:
      m = self.mu * self.m.get(k, 0.0) + g[k]
      self.m[k] = m
      d = g[k] + self.mu * m if self.nesterov else m
      out[k] = p[k] - self.lr(t - 1) * (d + _wd(self, k) * p[k])
    return out


def _wd(opt, k):
  return opt.wd if opt.mask is None or opt.mask(k) else 0.0


class Adagrad:
  """Duchi et al. (2011): G = sum g^2 (from 0); w -= lr g / (delta + sqrt(G))."""

  def __init__(self, lr, delta, wd=0.0, mask=None):
    self.lr, self.delta, self.wd, self.mask = lr, delta, wd, mask
    self.gsum = {}

  def step(self, p, g, t):
    out = {}
    for k in p:
      self.gsum[k] = self.gsum.get(k, 0.0) + g[k] ** 2
      u = g[k] / (self.delta + np.sqrt(self.gsum[k]))
      out[k] = p[k] - self.lr(t - 1) * (u + _wd(self, k) * p[k])
    return out


class RmsProp:
  """Tieleman & Hinton (2012) and Graves (2013) eq. 38-41:
  n = a n + (1-a) g^2; gb = a gb + (1-a) g; D = mom D - lr g / sqrt(n - gb^2 + eps); w += D."""

  def __init__(self, lr, decay, eps, centered=False, momentum=0.0, wd=0.0, mask=None):
    self.lr, self.a, self.eps, self.centered, self.mom = lr, decay, eps, centered, momentum
    self.wd, self.mask = wd, mask
    self.n, self.gb, self.delta = {}, {}, {}

  def step(self, p, g, t):
    out, lr = {}, self.lr(t - 1)
    for k in p:
      self.n[k] = self.a * self.n.get(k, 0.0) + (1 - self.a) * g[k] ** 2
      self.gb[k] = self.a * self.gb.get(k, 0.0) + (1 - self.a) * g[k]
      var = self.n[k] - self.gb[k] ** 2 if self.centered else self.n[k]
      self.delta[k] = self.mom * self.delta.get(k, 0.0) - lr * g[k] / np.sqrt(var + self.eps)
      out[k] = p[k] + self.delta[k] - lr * _wd(self, k) * p[k]
    return out


class Adam:
  """Kingma & Ba (2015) Algorithm 1; with wd, Loshchilov & Hutter's AdamW (decay times lr)."""

  def __init__(self, lr, b1, b2, eps, wd=0.0, mask=None):
    self.lr, self.b1, self.b2, self.eps, self.wd, self.mask = lr, b1, b2, eps, wd, mask
    self.m, self.v = {}, {}

  def step(self, p, g, t):
    out = {}
    for k in p:
      self.m[k] = self.b1 * self.m.get(k, 0.0) + (1 - self.b1) * g[k]
      self.v[k] = self.b2 * self.v.get(k, 0.0) + (1 - self.b2) * g[k] ** 2
      m_hat = self.m[k] / (1 - self.b1 ** t)
      v_hat = self.v[k] / (1 - self.b2 ** t)
      out[k] = p[k] - self.lr(t - 1) * (m_hat / (np.sqrt(v_hat) + self.eps) + _wd(self, k) * p[k])
    return out


class Lion:
  """Chen et al. (2023) Program 1: c = b1 m + (1-b1) g; w -= lr (sign(c) + wd w);
  m = b2 m + (1-b2) g."""

  def __init__(self, lr, b1, b2, wd=0.0, mask=None):
    self.lr, self.b1, self.b2, self.wd, self.mask = lr, b1, b2, wd, mask
    self.m = {}

  def step(self, p, g, t):
    out = {}
    for k in p:
      m = self.m.get(k, 0.0)
      c = self.b1 * m + (1 - self.b1) * g[k]
      out[k] = p[k] - self.lr(t - 1) * (np.sign(c) + _wd(self, k) * p[k])
      self.m[k] = self.b2 * m + (1 - self.b2) * g[k]
    return out


class Adafactor:
  """Shazeer & Stern (2018) Algorithms 4 (matrices) and 5 (vectors) with beta1 = 0:
  beta2_t = 1 - t^-c; R = b R + (1-b)(G^2 + eps1) 1; C = b C + (1-b) 1'(G^2 + eps1);
  V = R C / (1'R); U = G / sqrt(V); U /= max(1, RMS(U) / d); rho_t = min(lr, 1/sqrt(t));
  w -= max(eps2, RMS(w)) rho_t U (+ rho_t wd w)."""

  def __init__(self, lr, decay_rate=0.8, eps1=1e-30, eps2=1e-3, d=1.0, relative_step=True,
               parameter_scale=True, factored=True, wd=0.0, mask=None):
    self.lr, self.c, self.eps1, self.eps2, self.d = lr, decay_rate, eps1, eps2, d
    self.relative_step, self.parameter_scale = relative_step, parameter_scale
    self.factored = factored
    self.wd, self.mask = wd, mask
    self.r, self.col, self.v = {}, {}, {}

  def step(self, p, g, t):
    beta = 1 - t ** -self.c
    rho = self.lr(t - 1)
    if self.relative_step:
      rho = min(rho, 1 / math.sqrt(t))
    out = {}
    for k in p:
      sq = g[k] ** 2 + self.eps1
      if self.factored and g[k].ndim == 2:
        self.r[k] = beta * self.r.get(k, 0.0) + (1 - beta) * sq.sum(axis=1)
        self.col[k] = beta * self.col.get(k, 0.0) + (1 - beta) * sq.sum(axis=0)
        v = np.outer(self.r[k], self.col[k]) / self.r[k].sum()
      else:
        self.v[k] = beta * self.v.get(k, 0.0) + (1 - beta) * sq
        v = self.v[k]
      u = g[k] / np.sqrt(v)
      if self.d:
        u = u / max(1.0, np.sqrt(np.mean(u ** 2)) / self.d)
      alpha = rho * (max(self.eps2, np.sqrt(np.mean(p[k] ** 2))) if self.parameter_scale else 1.0)
      out[k] = p[k] - alpha * u - rho * _wd(self, k) * p[k]
    return out


# ---- Schedules the references use, in closed form ----

def constant(lr):
  return lambda step: lr


def warmup_cosine(peak, warmup, total, end_fraction):
  end = peak * end_fraction

  def lr(step):
    if step < warmup:
      return peak * step / warmup
    s = min(step - warmup, total - warmup) / (total - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * s))
  return lr


def _schedule_config(warmup, end_fraction):
  c = base.get_base_config().schedule
  c.name, c.warmup_steps, c.end_learning_rate_fraction = 'cosine', warmup, end_fraction
  return c


def _const_config():
  c = base.get_base_config().schedule
  c.name, c.warmup_steps = 'constant', 0
  return c


# ---- Cases: (config overrides, schedule (kiln, numpy), weight decay, mask kind, reference) ----

def _case(name, overrides, reference, lr=0.05, cosine=False, wd=0.0, mask=None):
  # Hyper-parameters sit under the optimizer's section (adamw shares adam's).
  section = 'adam' if name == 'adamw' else name
  nested = {'name': name, section: overrides} if overrides else {'name': name}
  return pytest.param(nested, lr, cosine, wd, mask, reference, id=(
      f"{name}-{'-'.join(f'{k}={v}' for k, v in overrides.items())}"
      f"{'-cosine' if cosine else ''}{f'-wd-{mask}' if wd else ''}"))


CASES = [
    _case('sgd', {'momentum': 0.0}, lambda lr, wd, m: Sgd(lr, wd=wd, mask=m)),
    _case('sgd', {'momentum': 0.9}, lambda lr, wd, m: Sgd(lr, 0.9, wd=wd, mask=m)),
    _case('sgd', {'momentum': 0.8, 'nesterov': True},
          lambda lr, wd, m: Sgd(lr, 0.8, True, wd, m)),
    _case('sgd', {'momentum': 0.9}, lambda lr, wd, m: Sgd(lr, 0.9, wd=wd, mask=m),
          cosine=True, wd=0.3, mask='callable'),
    _case('adagrad', {'eps': 0.1}, lambda lr, wd, m: Adagrad(lr, 0.1, wd, m), lr=0.2),
    _case('adagrad', {'eps': 1e-2}, lambda lr, wd, m: Adagrad(lr, 1e-2, wd, m), lr=0.2,
          wd=0.5, mask='tree'),
    _case('rmsprop', {'decay': 0.9, 'eps': 1e-2},
          lambda lr, wd, m: RmsProp(lr, 0.9, 1e-2, wd=wd, mask=m), lr=0.01),
    _case('rmsprop', {'decay': 0.95, 'eps': 1e-3, 'centered': True},
          lambda lr, wd, m: RmsProp(lr, 0.95, 1e-3, True, wd=wd, mask=m), lr=0.01),
    _case('rmsprop', {'decay': 0.9, 'eps': 1e-2, 'momentum': 0.9},
          lambda lr, wd, m: RmsProp(lr, 0.9, 1e-2, momentum=0.9, wd=wd, mask=m), lr=0.01),
    _case('rmsprop', {'decay': 0.95, 'eps': 1e-4, 'centered': True, 'momentum': 0.9},
          lambda lr, wd, m: RmsProp(lr, 0.95, 1e-4, True, 0.9, wd, m), lr=0.01, cosine=True,
          wd=0.5, mask='tree'),
    _case('adam', {'b1': 0.9, 'b2': 0.99, 'eps': 1e-3},
          lambda lr, wd, m: Adam(lr, 0.9, 0.99, 1e-3, wd, m), cosine=True),
    _case('adam', {'b1': 0.8, 'b2': 0.95, 'eps': 1e-2},
          lambda lr, wd, m: Adam(lr, 0.8, 0.95, 1e-2, wd, m), wd=0.5, mask='tree'),
    _case('adamw', {'b1': 0.9, 'b2': 0.999, 'eps': 1e-8},
          lambda lr, wd, m: Adam(lr, 0.9, 0.999, 1e-8, wd, m), wd=0.5, mask='callable'),
    _case('adamw', {'b1': 0.9, 'b2': 0.99, 'eps': 1e-6},
          lambda lr, wd, m: Adam(lr, 0.9, 0.99, 1e-6, wd, m), cosine=True, wd=1.0, mask='tree'),
    _case('lion', {'b1': 0.9, 'b2': 0.99}, lambda lr, wd, m: Lion(lr, 0.9, 0.99, wd, m),
          lr=0.01),
    _case('lion', {'b1': 0.95, 'b2': 0.98}, lambda lr, wd, m: Lion(lr, 0.95, 0.98, wd, m),
          lr=0.01, cosine=True, wd=2.0, mask='tree'),
    _case('adafactor', {}, lambda lr, wd, m: Adafactor(lr, wd=wd, mask=m), lr=0.5),
    _case('adafactor', {'clipping_threshold': 0.5, 'decay_rate': 0.7},
          lambda lr, wd, m: Adafactor(lr, decay_rate=0.7, d=0.5, wd=wd, mask=m), lr=0.05,
          cosine=True, wd=0.5, mask='tree'),
    _case('adafactor', {'use_relative_step': False, 'min_parameter_scale': 0.5,
                        'clipping_threshold': 0.0},
          lambda lr, wd, m: Adafactor(lr, eps2=0.5, d=0.0, relative_step=False, wd=wd, mask=m),
          lr=0.1),
    _case('adafactor',
          {'factored': False, 'multiply_by_parameter_scale': False},
          lambda lr, wd, m: Adafactor(lr, factored=False, parameter_scale=False, wd=wd, mask=m),
          lr=0.3),
]


def _run_kiln(tx, params, grads_fn, steps=STEPS):
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(grads_fn(params), state, params)
    params = optax.apply_updates(params, updates)
  return params


def _run_reference(opt, problem, steps=STEPS):
  params = _flatten(problem.init)
  for t in range(1, steps + 1):
    params = opt.step(params, problem.np_grads(params), t)
  return params


def _mask(kind, init):
  tree = _unflatten({path: _decay_kernels_only(path) for path in _flatten(init)})
  return {'tree': tree, 'callable': lambda params: tree, None: None}[kind]


@pytest.mark.parametrize('problem_name', PROBLEMS)
@pytest.mark.parametrize('overrides,lr,cosine,wd,mask,reference', CASES)
def test_matches_the_published_rule(problem_name, overrides, lr, cosine, wd, mask, reference):
  problem = PROBLEMS[problem_name]()
  config = base.get_base_config().optimizer
  config.update(overrides)
  if cosine:
    total, warmup = 8, 2  # Warmup, then a cosine that is still far from its end after STEPS.
    schedule = build_schedule(_schedule_config(warmup, 0.1), lr, total, 4)
    np_schedule = warmup_cosine(lr, warmup, total, 0.1)
  else:
    schedule, np_schedule = build_schedule(_const_config(), lr, 100, 1), constant(lr)
  tx = build_optimizer(config, schedule, wd, _mask(mask, problem.init))
  params = jax.tree.map(jnp.asarray, problem.init)
  got = _flatten(jax.device_get(_run_kiln(tx, params, problem.jax_grads)))
  opt = reference(np_schedule, wd, _decay_kernels_only if mask else None)
  want = _run_reference(opt, problem)
  start = _flatten(problem.init)
  moved = max(np.abs(want[k] - start[k]).max() for k in want)
  assert moved > 1e-2, 'the case must move the parameters for the comparison to mean anything'
  for k in want:
    np.testing.assert_allclose(got[k], want[k], err_msg=str(k), **TOL)
  if wd and mask:
    # After one step (same gradients) only the masked-in leaves differ from a run without decay.
    def one_step(decay):
      tx = build_optimizer(config, build_schedule(_const_config(), lr, 100, 1), decay,
                           _mask(mask, problem.init))
      return _flatten(jax.device_get(_run_kiln(tx, params, problem.jax_grads, steps=1)))

    decayed, plain = one_step(wd), one_step(0.0)
    for k in want:
      if _decay_kernels_only(k):
        assert np.abs(plain[k] - decayed[k]).max() > 1e-6, k
      else:
        np.testing.assert_array_equal(plain[k], decayed[k], err_msg=str(k))


def test_adafactor_factors_matrices_and_only_matrices():
  config = base.get_base_config().optimizer
  config.name = 'adafactor'
  params = jax.tree.map(jnp.asarray, Mlp().init)
  state = build_optimizer(config, constant(0.1)).init(params)
  factored = state[0]
  # A 4x8 kernel keeps 4 + 8 numbers instead of 32; biases keep a full second moment.
  assert factored.v_row['layers'][0]['kernel'].size + factored.v_col['layers'][0]['kernel'].size \
      == 12
  assert factored.v['layers'][0]['kernel'].size == 1
  assert factored.v['layers'][0]['bias'].shape == (8,)


@pytest.mark.parametrize('name,plain', [
    ('sgd', lambda lr, c: optax.sgd(lr, c.sgd.momentum, c.sgd.nesterov)),
    ('adam', lambda lr, c: optax.adam(lr, c.adam.b1, c.adam.b2, c.adam.eps)),
    ('adamw', lambda lr, c: optax.adam(lr, c.adam.b1, c.adam.b2, c.adam.eps)),
    ('rmsprop', lambda lr, c: optax.rmsprop(lr, c.rmsprop.decay, c.rmsprop.eps)),
    ('lion', lambda lr, c: optax.lion(lr, c.lion.b1, c.lion.b2, weight_decay=0.0)),
])
def test_zero_weight_decay_is_exactly_the_plain_optimizer(name, plain):
  problem = Mlp()
  config = base.get_base_config().optimizer
  config.name = name
  schedule = build_schedule(_schedule_config(2, 0.0), 0.05, 10, 5)
  params = jax.tree.map(jnp.asarray, problem.init)
  mask = _mask('tree', problem.init)
  ours = _run_kiln(build_optimizer(config, schedule, 0.0, mask), params, problem.jax_grads)
  theirs = _run_kiln(plain(schedule, config), params, problem.jax_grads)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)


@pytest.mark.parametrize('near_miss,reference', [
    # Optax's AdaGrad: accumulator from 0.1, eps inside the root.
    (lambda: optax.adagrad(0.2, eps=0.1), lambda: Adagrad(constant(0.2), 0.1)),
    # RMSProp with eps outside the root.
    (lambda: optax.rmsprop(0.01, 0.9, 1e-2, eps_in_sqrt=False),
     lambda: RmsProp(constant(0.01), 0.9, 1e-2)),
    # Momentum outside the learning rate (PyTorch's centered RMSProp) under a changing rate.
    (lambda: optax.chain(optax.scale_by_stddev(0.95, 1e-4), optax.trace(0.9),
                         optax.scale_by_learning_rate(lambda s: 0.01 * (1 + s))),
     lambda: RmsProp(lambda s: 0.01 * (1 + s), 0.95, 1e-4, True, 0.9)),
    # Optax's Adafactor: decay not scaled by the step size, matrices this small left unfactored.
    (lambda: optax.adafactor(0.05, weight_decay_rate=0.01),
     lambda: Adafactor(constant(0.05), relative_step=False, wd=0.01)),
])
def test_near_misses_are_caught(near_miss, reference):
  """The comparison above is tight enough to reject formulations that are almost the paper's."""
  problem = Mlp()
  got = _flatten(jax.device_get(_run_kiln(near_miss(), jax.tree.map(jnp.asarray, problem.init),
                                          problem.jax_grads)))
  want = _run_reference(reference(), problem)
  assert max(np.abs(got[k] - want[k]).max() / (1 + np.abs(want[k]).max()) for k in want) > 1e-5


@pytest.mark.parametrize('overrides,weight_decay,message', [
    ({'name': 'sgdd'}, 0.0,
     "unknown optimizer 'sgdd': set config.optimizer.name to one of sgd, adagrad"),
    ({'name': 'adam', 'adam': {'b1': 1.0}}, 0.0,
     'config.optimizer.adam.b1=1.0 is out of range: set it to a number in [0, 1)'),
    ({'name': 'adam', 'adam': {'b2': -0.1}}, 0.0, 'config.optimizer.adam.b2=-0.1 is out of range'),
    ({'name': 'adamw', 'adam': {'eps': -1e-8}}, 0.0,
     'config.optimizer.adam.eps=-1e-08 is out of range'),
    ({'name': 'sgd', 'sgd': {'momentum': 1.5}}, 0.0,
     'config.optimizer.sgd.momentum=1.5 is out of range'),
    ({'name': 'sgd', 'sgd': {'momentum': 0.0, 'nesterov': True}}, 0.0,
     'config.optimizer.sgd.nesterov=True needs momentum'),
    ({'name': 'rmsprop', 'rmsprop': {'decay': 1.0}}, 0.0,
     'config.optimizer.rmsprop.decay=1.0 is out of range'),
    ({'name': 'rmsprop', 'rmsprop': {'momentum': -0.5}}, 0.0,
     'config.optimizer.rmsprop.momentum=-0.5 is out of range'),
    ({'name': 'lion', 'lion': {'b2': 1.1}}, 0.0, 'config.optimizer.lion.b2=1.1 is out of range'),
    ({'name': 'adafactor', 'adafactor': {'decay_rate': 0.0}}, 0.0,
     'config.optimizer.adafactor.decay_rate=0.0 is out of range: set it to a number > 0'),
    ({'name': 'adafactor', 'adafactor': {'min_dim_size_to_factor': -1}}, 0.0,
     'config.optimizer.adafactor.min_dim_size_to_factor=-1 is out of range'),
    ({'name': 'adafactor', 'adafactor': {'clipping_threshold': -1.0}}, 0.0,
     'config.optimizer.adafactor.clipping_threshold=-1.0 is out of range'),
    ({'name': 'adamw'}, -0.01,
     'weight decay -0.01 is not a number >= 0: set config.regularization.weight_decay'),
])
def test_bad_values_raise_one_line_errors(overrides, weight_decay, message):
  config = base.get_base_config().optimizer
  config.update(overrides)
  with pytest.raises(KilnError) as error:
    build_optimizer(config, constant(0.1), weight_decay)
  assert message in str(error.value)
  assert '\n' not in str(error.value)


def _train_jitted(tx, loss, params, steps):
  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params


@pytest.mark.slow  # Several seconds of XLA compiles on a fresh machine.
def test_every_optimizer_trains_the_default_config_shape():
  """Each name builds from the base config and runs jitted, in float32, to a lower loss."""
  problem = Mlp()
  with jax.enable_x64(False):
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), problem.init)
    before = float(problem.loss(params))
    for name in ('sgd', 'adagrad', 'rmsprop', 'adam', 'adamw', 'lion', 'adafactor'):
      config = base.get_base_config()
      config.optimizer.name = name
      lr = {'sgd': 0.2, 'adagrad': 0.2, 'adafactor': 0.05}.get(name, 0.01)
      schedule = build_schedule(config.schedule, lr, 50, 10)
      tx = build_optimizer(config.optimizer, schedule, 1e-4, _mask('callable', problem.init))
      trained = _train_jitted(tx, problem.loss, params, 50)
      assert float(problem.loss(trained)) < 0.9 * before, name
