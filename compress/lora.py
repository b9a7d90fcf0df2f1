"""LoRA: low-rank adapters on frozen kernels (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", arXiv:2106.09685).

A reparametrisation of the parameter tree, not module surgery, so that it reaches every
kernel, the Transformer's fused [E, 3, N, H] attention projection included: each targeted
kernel W, seen as `ModelTemplate.kernel_layout()` sees it (prod(shape[:stacked]) matrices
of `rows` inputs by `cols` outputs), gets A [stacked..., *row dims, r] and
B [stacked..., r, *col dims], and the model runs with

    W' = W + (alpha / r) * (A @ B).reshape(W.shape)

A is drawn as PEFT draws it (kaiming-uniform with a = sqrt(5): U(-1/sqrt(rows),
1/sqrt(rows))) and B is zero, so training starts exactly at the base model. Keeping each
factor's own row / column dims (rather than flattened matrices) lets A and B inherit the
kernel's logical axes: they shard like their kernel, the rank dim replicated.

The base stays frozen and has no optimizer state: `wrap_transform` runs the optimizer only
on the adapters and on base parameters matching config.lora.trainable (new heads), through
optax.multi_transform, whose masked inner state holds nothing for the other leaves.
`merge` folds the adapters back into plain kernels: the model without LoRA, for export.
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from core.errors import KilnError
from core.paths import path_string

TRAIN, FROZEN = 'train', 'frozen'


def _compile(key: str, pattern: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise KilnError(f"config.{key}='{pattern}' is not a valid regex ({e}): fix the "
                    'pattern') from e


def _flat(tree) -> dict[str, tuple]:
  """'a/b/kernel' -> (key path, leaf)."""
  return {path_string(path): (path, leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _set(tree: dict, path, value) -> None:
  for entry in path[:-1]:
    tree = tree.setdefault(_key(entry), {})
  tree[_key(path[-1])] = value


def _key(entry):
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  raise TypeError(f'unexpected pytree key {entry!r}')


@dataclasses.dataclass(frozen=True)
class Target:
  """One adapted kernel: its shape and (stacked, fan_in) matrix layout."""
  shape: tuple[int, ...]
  stacked: int
  fan_in: int

  @property
  def rows(self) -> int:
    return math.prod(self.shape[self.stacked:self.stacked + self.fan_in])

  @property
  def cols(self) -> int:
    return math.prod(self.shape[self.stacked + self.fan_in:])

  @property
  def a_shape(self) -> tuple[int, ...]:
    return self.shape[:self.stacked + self.fan_in]

  @property
  def b_shape(self) -> tuple[int, ...]:
    return (*self.shape[:self.stacked], *self.shape[self.stacked + self.fan_in:])


@dataclasses.dataclass(frozen=True)
class LoRA:
  """Which kernels get rank-`rank` adapters, their scale, and which base leaves still train."""
  rank: int
  alpha: float
  targets: dict  # 'a/b/kernel' -> Target.
  trainable: str  # Regex of base parameter paths that train (e.g. a new classifier).

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def init(self, params: dict, key: jax.Array) -> dict:
    """Adapters mirroring `params`' nesting: {..., 'qkv': {'a': A, 'b': B}} per target."""
    adapters = {}
    flat = _flat(params)
    for index, (name, target) in enumerate(sorted(self.targets.items())):
      path, leaf = flat[name]
      bound = 1.0 / math.sqrt(target.rows)
      a = jax.random.uniform(jax.random.fold_in(key, index), (*target.a_shape, self.rank),
                             jnp.float32, -bound, bound)
      b_shape = (*target.shape[:target.stacked], self.rank, *target.shape[target.stacked
                                                                            + target.fan_in:])
      _set(adapters, path, {'a': a.astype(leaf.dtype), 'b': jnp.zeros(b_shape, leaf.dtype)})
    return adapters

  def delta(self, name: str, a, b):
    """(alpha / r) * A @ B in the kernel's shape."""
    target = self.targets[name]
    stack = math.prod(target.shape[:target.stacked])
    product = jnp.matmul(a.reshape(stack, target.rows, self.rank),
                         b.reshape(stack, self.rank, target.cols))
    return (self.scale * product).reshape(target.shape)

  def apply(self, params: dict, adapters: dict, freeze: bool = True) -> dict:
    """The parameters the model runs with: W + (alpha/r) A B on targets. With `freeze`,
    base leaves outside config.lora.trainable are constants to autodiff, so the backward
    pass computes no weight gradient for them."""
    pairs = {name: (pair['a'], pair['b']) for name, pair in self._pairs(adapters).items()}
    trainable = _compile('lora.trainable', self.trainable) if self.trainable else None

    def effective(path, w):
      name = path_string(path)
      if freeze and not (trainable is not None and trainable.search(name)):
        w = jax.lax.stop_gradient(w)
      if name in pairs:
        w = w + self.delta(name, *pairs[name]).astype(w.dtype)
      return w
    return jax.tree_util.tree_map_with_path(effective, params)

  def merge(self, params: dict, adapters: dict) -> dict:
    """Plain model parameters (the tree of the model without LoRA) with the adapters
    folded into their kernels, as host NumPy arrays: what export reads."""
    merged = jax.jit(lambda p, a: self.apply(p, a, freeze=False))(params, adapters)
    return jax.tree.map(np.asarray, jax.device_get(merged))

  def _pairs(self, adapters: dict) -> dict:
    """'a/b/kernel' -> {'a': A, 'b': B} from the adapters tree."""
    pairs = {}
    for name, (_, leaf) in _flat(adapters).items():
      kernel, part = name.rsplit('/', 1)
      pairs.setdefault(kernel, {})[part] = leaf
    return pairs

  def labels(self, params: dict) -> dict:
    """'train' or 'frozen' for each leaf of {'params': ..., 'lora': ...}."""
    trainable = _compile('lora.trainable', self.trainable) if self.trainable else None
    return {
        'params': jax.tree_util.tree_map_with_path(
            lambda path, _: TRAIN if trainable is not None and trainable.search(
                path_string(path)) else FROZEN, params['params']),
        'lora': jax.tree.map(lambda _: TRAIN, params['lora']),
    }

  def wrap_transform(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on the adapters and trainable base leaves of {'params', 'lora'}; frozen leaves
    get zero updates and no state (multi_transform masks them out of `tx`'s state)."""
    return optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()}, self.labels)

  def adapter_axes(self, param_axes: dict, adapters: dict) -> dict:
    """Logical axes of each adapter leaf: A keeps its kernel's row axes, B its column
    axes, the rank dim none (replicated); kernels without names give None."""
    flat_axes = {path_string(path): axes for path, axes in jax.tree_util.tree_flatten_with_path(
        param_axes, is_leaf=lambda x: x is None or isinstance(x, tuple))[0]}

    def axes_of(path, _):
      name = path_string(path)
      kernel, part = name.rsplit('/', 1)
      axes, target = flat_axes.get(kernel), self.targets[kernel]
      if axes is None:
        return None
      own = tuple(axes)  # Excludes stacked dims, which logical_to_spec leaves unsharded.
      fan_in = target.fan_in
      return (*own[:fan_in], None) if part == 'a' else (None, *own[fan_in:])
    return jax.tree_util.tree_map_with_path(axes_of, adapters)

  def count(self, params: dict, adapters: dict) -> dict:
    """Trainable parameter counts: adapters plus trainable base leaves, against the base."""
    labels = self.labels({'params': params, 'lora': adapters})
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    base_trainable = sum(int(np.prod(x.shape)) for x, label in zip(
        jax.tree.leaves(params), jax.tree.leaves(labels['params'])) if label == TRAIN)
    adapter = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))
    return {'adapter_params': adapter, 'trainable_base_params': base_trainable,
            'base_params': total,
            'trainable_fraction': (adapter + base_trainable) / (total + adapter)}


def build(config, abstract_params: dict, layout: dict) -> LoRA | None:
  """The LoRA of config.lora for a model with these (abstract) params and kernel layout
  (`ModelTemplate.kernel_layout()`); None when config.lora.rank is 0. Raises a one-line
  KilnError on a regex that matches no kernel or a rank above a kernel's size."""
  settings = config.lora
  if not settings.rank:
    return None
  if not config.init.checkpoint_dir:
    raise KilnError('config.lora.rank > 0 adapts a pre-trained model: set '
                    'config.init.checkpoint_dir to the workdir of the run to adapt')
  if config.ema.decay:
    raise KilnError('config.ema.decay must be 0 with config.lora.rank > 0 (the frozen base '
                    'has nothing to average): set one of them to 0')
  targets_re = _compile('lora.targets', settings.targets)
  _compile('lora.trainable', settings.trainable)
  flat_layout = {path_string(path): dims for path, dims in jax.tree_util.tree_flatten_with_path(
      layout, is_leaf=lambda x: x is None or isinstance(x, tuple))[0]}
  targets = {}
  for name, (_, leaf) in _flat(abstract_params).items():
    dims = flat_layout.get(name)
    # Biases never get adapters (LoRA adapts weight matrices), even where a regex such as
    # 'attn/qkv' also matches 'attn/qkv_bias'.
    if dims is None or name.endswith('bias') or not targets_re.search(name):
      continue
    target = Target(tuple(leaf.shape), *dims)
    if settings.rank > min(target.rows, target.cols):
      raise KilnError(f'config.lora.rank={settings.rank} exceeds {name} ({target.rows} x '
                      f'{target.cols}): use a rank <= {min(target.rows, target.cols)}')
    targets[name] = target
  if not targets:
    kernels = [name for name, dims in flat_layout.items() if dims is not None]
    raise KilnError(f"config.lora.targets='{settings.targets}' matches no kernel: choose from "
                    f"paths such as {', '.join(kernels[:6])}")
  return LoRA(rank=settings.rank, alpha=float(settings.alpha), targets=targets,
              trainable=settings.trainable)
