"""Weight pruning: which parameters are prunable, their masks, and the sparsity schedule.

Two methods, both keeping a boolean mask per prunable kernel in the train state:
- 'magnitude': gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune",
  arXiv:1710.01878). Every `update_every` steps from `begin_step` to `end_step` the smallest
  weights (by |w|) are masked until the sparsity reaches
    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3,
  per layer or with one threshold across all prunable layers ('global').
- 'n_m': N:M structured sparsity as NVIDIA's ASP does it (Mishra et al. 2021, "Accelerating
  Sparse Deep Neural Networks", arXiv:2104.08378): in every group of M consecutive input
  weights of an output column the N largest are kept, once, from a trained model that is then
  retrained with the same recipe.

Everything here is a pure function of pytrees of jax arrays: it runs inside the jitted train
step on parameters where they live (sharded), and XLA adds whatever collectives a sort or a
reduction over a sharded kernel needs. Pruned weights are exactly zero, and a mask only ever
shrinks: a weight's score is -1 once masked, below every |w| of a live weight.
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp

from core.errors import KilnError
from core.paths import path_string

METHODS = ('magnitude', 'n_m')
SCOPES = ('layer', 'global')

Layout = tuple[int, int]  # (stacked, fan_in) of core.logical_axes.kernel_matrix_dims.


def cubic_sparsity(step, initial: float, final: float, begin: int, end: int):
  """Zhu & Gupta's s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3, t clamped to [t0, t1]."""
  if end <= begin:
    progress = jnp.asarray(step >= begin, jnp.float32)
  else:
    progress = jnp.clip((jnp.asarray(step, jnp.float32) - begin) / (end - begin), 0.0, 1.0)
  return final + (initial - final) * (1.0 - progress) ** 3


def prunable_layouts(layouts: dict[str, Layout | None], exclude: str) -> dict[str, Layout]:
  """The parameters pruning may touch ('a/b/kernel' -> layout): kernels (matrices, convs,
  stacked or fused projections: a layout that is not None) whose path `exclude` misses."""
  pattern = re.compile(exclude) if exclude else None
  return {path: layout for path, layout in layouts.items()
          if layout is not None and not (pattern and pattern.search(path))}


def flat_layouts(layout_tree) -> dict[str, Layout | None]:
  """`ModelTemplate.kernel_layout()`'s nested dict as 'a/b/kernel' -> layout."""
  leaves = jax.tree_util.tree_flatten_with_path(
      layout_tree, is_leaf=lambda x: x is None or isinstance(x, tuple))[0]
  return {path_string(path): layout for path, layout in leaves}


def as_matrices(w: jax.Array, layout: Layout) -> jax.Array:
  """[stacked matrices, input rows, output columns] view of a kernel."""
  stacked, fan_in = layout
  shape = w.shape
  return w.reshape(math.prod(shape[:stacked]), math.prod(shape[stacked:stacked + fan_in]), -1)


def _scores(w: jax.Array, mask: jax.Array) -> jax.Array:
  """|w| for live weights, -1 for masked ones: masked weights always rank lowest."""
  return jnp.where(mask, jnp.abs(w).astype(jnp.float32), -1.0)


def _num_pruned(sparsity, size: int):
  return jnp.round(sparsity * size).astype(jnp.int32)


def _threshold(scores: jax.Array, k) -> jax.Array:
  """The k-th smallest score (k counted from 1); -inf for k = 0, so that nothing is cut."""
  ordered = jnp.sort(scores.reshape(-1))
  return jnp.where(k > 0, ordered[jnp.maximum(k - 1, 0)], -jnp.inf)


def magnitude_mask(w: jax.Array, mask: jax.Array, sparsity) -> jax.Array:
  """Keeps all but the round(sparsity * size) smallest-|w| weights of one layer (ties at the
  threshold go too); already masked weights count among the pruned and stay pruned."""
  scores = _scores(w, mask)
  return mask & (scores > _threshold(scores, _num_pruned(sparsity, w.size)))


def global_magnitude_masks(weights: dict, masks: dict, sparsity) -> dict:
  """One threshold over every layer in `weights` (a flat dict): the round(sparsity * total)
  smallest-|w| weights of all of them together are pruned."""
  scores = {path: _scores(w, masks[path]) for path, w in weights.items()}
  total = sum(w.size for w in weights.values())
  threshold = _threshold(jnp.concatenate([s.reshape(-1) for s in scores.values()]),
                         _num_pruned(sparsity, total))
  return {path: masks[path] & (s > threshold) for path, s in scores.items()}


def n_m_mask(w: jax.Array, mask: jax.Array, layout: Layout, n: int, m: int) -> jax.Array:
  """Exactly `n` kept in every group of `m` consecutive input rows of each output column
  (the largest |w|; ties go to the earlier row), as ASP groups along input channels."""
  matrices = as_matrices(_scores(w, mask), layout)
  stacked, rows, cols = matrices.shape
  groups = matrices.reshape(stacked, rows // m, m, cols)
  # Rank within a group by pairwise comparison: m is small, and no sort crosses devices.
  a, b = groups[:, :, :, None, :], groups[:, :, None, :, :]  # a: weight i, b: weight j.
  earlier = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]  # [i, j]: j comes before i.
  beaten = (b > a) | ((b == a) & earlier[None, None, :, :, None])
  rank = beaten.sum(axis=3)
  return mask & (rank < n).reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class Pruning:
  """A resolved `config.pruning` (steps absolute) plus the prunable parameters' layouts;
  the train step calls `update_masks`, `apply` and `scalars`."""
  method: str
  target_sparsity: float
  initial_sparsity: float
  begin_step: int
  end_step: int
  update_every: int
  scope: str
  n: int
  m: int
  layouts: tuple[tuple[str, Layout], ...]  # ('a/b/kernel', (stacked, fan_in)) per prunable.

  @property
  def prunable(self) -> dict[str, Layout]:
    return dict(self.layouts)

  # Schedule.
  def is_update_step(self, step):
    """Masks are recomputed before the forward pass of these steps (0-based)."""
    step = jnp.asarray(step)
    if self.method == 'n_m':
      return step == self.begin_step
    on_grid = (step - self.begin_step) % self.update_every == 0
    return (step >= self.begin_step) & (step <= self.end_step) & (on_grid | (step == self.end_step))

  def scheduled_sparsity(self, step):
    """The sparsity the masks have during step `step`: the cubic schedule's value at the last
    update step so far (0 before begin_step; n_m: 1 - n/m from begin_step on)."""
    step = jnp.asarray(step)
    if self.method == 'n_m':
      return jnp.where(step >= self.begin_step, 1.0 - self.n / self.m, 0.0)
    clamped = jnp.minimum(step, self.end_step)
    last = self.begin_step + (clamped - self.begin_step) // self.update_every * self.update_every
    last = jnp.where(step >= self.end_step, self.end_step, last)
    value = cubic_sparsity(last, self.initial_sparsity, self.target_sparsity, self.begin_step,
                           self.end_step)
    return jnp.where(step >= self.begin_step, value, 0.0)

  # Masks.
  def init_masks(self, params) -> dict:
    """All True: a [shape] mask for each prunable kernel, a scalar for every other leaf (so
    that masks broadcast over params without holding a copy of what is never pruned)."""
    prunable = self.prunable
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.ones(p.shape if path_string(path) in prunable else (), jnp.bool_),
        params)

  def compute_masks(self, params, masks, sparsity) -> dict:
    """New masks from the current params at `sparsity` (magnitude) or the N:M rule."""
    prunable = self.prunable
    flat_params = _flat(params)
    flat_masks = _flat(masks)
    weights = {path: flat_params[path] for path in prunable}
    if self.method == 'n_m':
      new = {path: n_m_mask(w, flat_masks[path], prunable[path], self.n, self.m)
             for path, w in weights.items()}
    elif self.scope == 'global':
      new = global_magnitude_masks(weights, {p: flat_masks[p] for p in weights}, sparsity)
    else:
      new = {path: magnitude_mask(w, flat_masks[path], sparsity) for path, w in weights.items()}
    return jax.tree_util.tree_map_with_path(
        lambda path, mask: new.get(path_string(path), mask), masks)

  def update_masks(self, step, params, masks) -> dict:
    """`masks`, recomputed from `params` when `step` is an update step."""
    return jax.lax.cond(self.is_update_step(step),
                        lambda: self.compute_masks(params, masks, self.scheduled_sparsity(step)),
                        lambda: masks)

  @staticmethod
  def apply(tree, masks):
    """`tree` (params, gradients, EMA) with masked entries set to exactly zero."""
    return jax.tree.map(lambda x, mask: jnp.where(mask, x, jnp.zeros((), x.dtype)), tree, masks)

  def scalars(self, params) -> dict[str, jax.Array]:
    """'sparsity' (fraction of prunable weights that are zero) and 'sparsity/<path>' per layer."""
    flat = _flat(params)
    zeros = {path: jnp.sum(flat[path] == 0) for path in self.prunable}
    total = sum(flat[path].size for path in self.prunable)
    out = {'sparsity': sum(zeros.values()) / total}
    out.update({f'sparsity/{path}': count / flat[path].size for path, count in zeros.items()})
    return out


def _flat(tree) -> dict:
  return {path_string(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def is_on(pruning_config) -> bool:
  """Pruning runs for method 'n_m', or 'magnitude' with a target sparsity above 0."""
  return pruning_config.method == 'n_m' or pruning_config.target_sparsity > 0


def from_config(pruning_config, num_steps: int, layouts: dict[str, Layout | None],
                shapes: dict[str, tuple[int, ...]]) -> Pruning | None:
  """`config.pruning` resolved against the run (-1 steps from `num_steps`) and the model
  (`layouts` and `shapes` by 'a/b/kernel' path); None when pruning is off. Bad combinations
  raise a one-line KilnError naming the key and the fix."""
  c = pruning_config
  if c.method not in METHODS:
    raise KilnError(f"unknown config.pruning.method='{c.method}': choose one of "
                    f"{', '.join(METHODS)}")
  if not 0.0 <= c.target_sparsity < 1.0:
    raise KilnError(f'config.pruning.target_sparsity={c.target_sparsity} must lie in [0, 1) '
                    '(0 disables magnitude pruning)')
  if not is_on(c):
    return None
  try:
    prunable = prunable_layouts(layouts, c.exclude)
  except re.error as e:
    raise KilnError(f"config.pruning.exclude='{c.exclude}' is not a valid regex ({e}): fix the "
                    'pattern') from e
  if not prunable:
    raise KilnError(f"config.pruning.exclude='{c.exclude}' leaves no kernel to prune: narrow "
                    'the pattern')
  if c.method == 'n_m':
    begin = 0 if c.begin_step == -1 else c.begin_step
    end = begin
  else:
    begin = round(0.1 * num_steps) if c.begin_step == -1 else c.begin_step
    end = round(0.75 * num_steps) if c.end_step == -1 else c.end_step
  if begin >= num_steps:
    raise KilnError(f'config.pruning.begin_step={begin} is not before the last of {num_steps} '
                    'training steps: set it lower (or -1)')
  if c.method == 'n_m':
    if not 0 < c.n < c.m:
      raise KilnError(f'config.pruning.n={c.n} must lie in [1, config.pruning.m={c.m}): keep n '
                      'of every m weights, e.g. n=2, m=4')
    for path, layout in prunable.items():
      stacked, fan_in = layout
      rows = math.prod(shapes[path][stacked:stacked + fan_in])
      if rows % c.m:
        raise KilnError(f"config.pruning.m={c.m} does not divide the {rows} input rows of "
                        f"'{path}': add it to config.pruning.exclude, or change m")
  else:
    if not 0.0 <= c.initial_sparsity <= c.target_sparsity:
      raise KilnError(f'config.pruning.initial_sparsity={c.initial_sparsity} must lie in '
                      f'[0, target_sparsity={c.target_sparsity}]: lower it')
    if end < begin:
      raise KilnError(f'config.pruning.end_step={end} comes before begin_step={begin}: set '
                      'end_step >= begin_step (or -1 for 75% of training)')
  return Pruning(method=c.method, target_sparsity=float(c.target_sparsity),
                 initial_sparsity=float(c.initial_sparsity), begin_step=int(begin),
                 end_step=int(end), update_every=int(c.update_every), scope=c.scope,
                 n=int(c.n), m=int(c.m), layouts=tuple(sorted(prunable.items())))
