"""Optimizers as published, assembled from Optax transformations.

Each builder returns the rule of its paper with decoupled weight decay
w <- w - lr_t * (update + weight_decay * w) on the leaves where `mask` is True
(AdamW's convention, where the learning rate also scales the decay). With
weight_decay == 0 no decay transformation is added at all.

Where Optax's own alias differs from the paper the builder says so and
chains the pieces itself:
- AdaGrad: optax.adagrad starts the accumulator at 0.1 and puts eps inside the
  square root; Duchi et al. (2011) start at 0 and add delta to sqrt(G_t), hence
  scale_by_duchi_adagrad below.
- Adafactor: optax.adafactor adds its decay after the step size (so it is not
  scaled by the learning rate), only factors dimensions >= 128, and has no
  1/sqrt(t) relative step; the builder chains the same Optax pieces with decay
  before the step size, exposes the factoring threshold and adds the relative step.
- RMSProp with momentum keeps the learning rate inside the momentum buffer
  (Graves 2013, eq. 40), so its decay is added after the buffer, scaled by lr_t.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

NAMES = ('sgd', 'adagrad', 'rmsprop', 'adam', 'adamw', 'lion', 'adafactor')


def _decay(weight_decay: float, mask) -> list[optax.GradientTransformation]:
  """Adds weight_decay * w to the updates before the learning rate scales them."""
  return [optax.add_decayed_weights(weight_decay, mask)] if weight_decay else []


def _as_schedule(learning_rate) -> optax.Schedule:
  return learning_rate if callable(learning_rate) else (lambda _: learning_rate)


def sgd(learning_rate, momentum: float, nesterov: bool, weight_decay: float = 0.0,
        mask=None) -> optax.GradientTransformation:
  """m_t = mu m_{t-1} + g_t; w -= lr_t (m_t, or g_t + mu m_t with Nesterov, + wd w).

  The PyTorch/Optax form (Sutskever et al. 2013 with the learning rate outside
  the buffer); momentum == 0 is plain gradient descent.
  """
  direction = [optax.trace(decay=momentum, nesterov=nesterov)] if momentum else []
  return optax.chain(*direction, *_decay(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


class ScaleByDuchiAdagradState(NamedTuple):
  sum_of_squares: optax.Updates  # G_t: every squared gradient so far, summed (from 0).


def scale_by_duchi_adagrad(delta: float) -> optax.GradientTransformation:
  """g_t / (delta + sqrt(G_t)), G_t = sum of g_s^2 for s <= t (Duchi et al. 2011, diagonal).

  Leaves whose gradients have all been 0 (G_t == 0) get a 0 update, the limit of
  the rule, instead of 0/0 when delta == 0.
  """

  def init_fn(params):
    return ScaleByDuchiAdagradState(sum_of_squares=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    sums = jax.tree.map(lambda g, s: s + jnp.square(g), updates, state.sum_of_squares)
    updates = jax.tree.map(
        lambda g, s: jnp.where(s > 0, g / (jnp.sqrt(s) + delta), jnp.zeros_like(g)),
        updates, sums)
    return updates, ScaleByDuchiAdagradState(sum_of_squares=sums)

  return optax.GradientTransformation(init_fn, update_fn)


def adagrad(learning_rate, eps: float, weight_decay: float = 0.0,
            mask=None) -> optax.GradientTransformation:
  return optax.chain(scale_by_duchi_adagrad(eps), *_decay(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


def rmsprop(learning_rate, decay: float, eps: float, centered: bool, momentum: float,
            weight_decay: float = 0.0, mask=None) -> optax.GradientTransformation:
  """Tieleman & Hinton (2012); centered and with momentum, Graves (2013) eq. 38-41.

  n_t = a n + (1-a) g^2, (centered) gbar_t = a gbar + (1-a) g, u = g / sqrt(n - gbar^2 + eps).
  Without momentum w -= lr_t (u + wd w). With momentum D_t = m D_{t-1} - lr_t u and
  w += D_t - lr_t wd w. eps sits inside the square root as in Graves; Tieleman &
  Hinton had none. The moving averages start at 0, as Optax's initial_scale=0.
  """
  if centered:
    precondition = optax.scale_by_stddev(decay=decay, eps=eps, initial_scale=0.0)
  else:
    precondition = optax.scale_by_rms(decay=decay, eps=eps, initial_scale=0.0)
  if not momentum:
    return optax.chain(precondition, *_decay(weight_decay, mask),
                       optax.scale_by_learning_rate(learning_rate))
  # The buffer holds lr-scaled steps, so decay must not enter it: add -lr_t * wd * w after it.
  schedule = _as_schedule(learning_rate)
  decay_after = ([optax.add_decayed_weights(lambda count: -weight_decay * schedule(count), mask)]
                 if weight_decay else [])
  return optax.chain(precondition, optax.scale_by_learning_rate(learning_rate),
                     optax.trace(decay=momentum), *decay_after)


def adam(learning_rate, b1: float, b2: float, eps: float, weight_decay: float = 0.0,
         mask=None) -> optax.GradientTransformation:
  """Kingma & Ba (2015) Algorithm 1: w -= lr_t * m_hat / (sqrt(v_hat) + eps), bias-corrected.

  optax.scale_by_adam with eps_root=0 is exactly that; a nonzero weight decay
  makes it AdamW.
  """
  return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=0.0),
                     *_decay(weight_decay, mask), optax.scale_by_learning_rate(learning_rate))


def adamw(learning_rate, b1: float, b2: float, eps: float, weight_decay: float = 0.0,
          mask=None) -> optax.GradientTransformation:
  """Loshchilov & Hutter (2019): w -= lr_t * (adam_update + wd * w) (Optax/PyTorch form)."""
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=0.0,
                     weight_decay=weight_decay, mask=mask)


def lion(learning_rate, b1: float, b2: float, weight_decay: float = 0.0,
         mask=None) -> optax.GradientTransformation:
  """Chen et al. (2023): w -= lr_t (sign(b1 m + (1-b1) g) + wd w); m <- b2 m + (1-b2) g."""
  return optax.lion(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask)


def relative_step(learning_rate) -> optax.Schedule:
  """rho_t = min(lr_t, 1 / sqrt(t)) with t = count + 1: Shazeer & Stern's min(1e-2, 1/sqrt(t))
  with the configured schedule in place of the constant 1e-2."""
  schedule = _as_schedule(learning_rate)
  return lambda count: jnp.minimum(schedule(count), 1.0 / jnp.sqrt(count + 1.0))


def adafactor(learning_rate, *, decay_rate: float, eps: float, factored: bool,
              min_dim_size_to_factor: int, clipping_threshold: float,
              multiply_by_parameter_scale: bool, min_parameter_scale: float,
              use_relative_step: bool, weight_decay: float = 0.0,
              mask=None) -> optax.GradientTransformation:
  """Shazeer & Stern (2018), Algorithms 4 (matrices, factored) and 5 (other shapes), beta1 = 0.

  beta2_t = 1 - t^-decay_rate; V from row/column sums of G^2 + eps1; U = G / sqrt(V);
  U_hat = U / max(1, RMS(U) / d); alpha_t = max(eps2, RMS(w_{t-1})) rho_t;
  w -= alpha_t U_hat + rho_t wd w. Tensors of rank > 2 factor their two largest dims.
  Not exposed: a first moment (the paper's recommended beta1 = 0) and Optax's decay_offset.
  """
  chain = [optax.scale_by_factored_rms(factored=factored, decay_rate=decay_rate,
                                       min_dim_size_to_factor=min_dim_size_to_factor,
                                       epsilon=eps)]
  if clipping_threshold:
    chain.append(optax.clip_by_block_rms(clipping_threshold))
  if multiply_by_parameter_scale:
    chain.append(optax.scale_by_param_block_rms(min_scale=min_parameter_scale))
  step_size = relative_step(learning_rate) if use_relative_step else learning_rate
  return optax.chain(*chain, *_decay(weight_decay, mask),
                     optax.scale_by_learning_rate(step_size))
