"""Low-rank factoring of a trained model's Dense and Conv kernels by truncated SVD.

A kernel seen as a [rows, cols] matrix W = U S V^T keeps its r largest singular values,
W_r = (U_r sqrt(S_r)) (sqrt(S_r) V_r^T): by the Eckart-Young theorem the best rank-r
approximation, with squared Frobenius error the sum of the dropped s_i^2 (Eckart & Young
1936; as used to compress trained networks by Denton et al. 2014, "Exploiting Linear
Structure Within Convolutional Networks for Efficient Evaluation", and Jaderberg et al.
2014). The layer becomes two thinner ones:

- Dense [in, out] -> Dense [in, r] (no bias) then Dense [r, out] (the bias);
- Conv [kh, kw, in, out] (rows kh*kw*in) -> Conv kh x kw: in -> r (no bias, the same
  strides, padding and dilation) then a 1x1 conv r -> out (the bias).

The rank per layer is the smallest that keeps a fraction `energy` of sum s_i^2, or
ceil(rank_ratio * min(rows, cols)); a layer where r * (rows + cols) >= rows * cols would
not get smaller and stays whole. Then the model is fine-tuned as usual.
"""

import dataclasses
import math
import re
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from flax import nnx

from core.errors import KilnError
from core.logical_axes import LOGICAL_AXES_KEY
from core.paths import path_string
from models.conv import Conv


def svd_factors(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """(U_r sqrt(S_r) [rows, r], sqrt(S_r) V_r^T [r, cols]) of a [rows, cols] matrix."""
  u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
  root = np.sqrt(s[:rank])
  return u[:, :rank] * root, root[:, None] * vt[:rank]


def choose_rank(singular_values: np.ndarray, rows: int, cols: int, energy: float = 0.0,
                rank_ratio: float = 0.0) -> int | None:
  """The rank a [rows, cols] kernel is factored to, or None when factoring would not save
  parameters (r * (rows + cols) >= rows * cols). One of energy / rank_ratio is set."""
  if rank_ratio:
    rank = math.ceil(rank_ratio * min(rows, cols))
  else:
    squares = np.square(np.asarray(singular_values, np.float64))
    kept = np.cumsum(squares) / max(squares.sum(), np.finfo(np.float64).tiny)
    # The smallest r with kept energy >= energy (rounding slack so energy=1 is reachable).
    rank = int(np.searchsorted(kept, energy - 1e-12) + 1)
  rank = max(1, min(rank, min(rows, cols)))
  return None if rank * (rows + cols) >= rows * cols else rank


def _axes(variable) -> tuple | None:
  axes = variable.get_metadata().get(LOGICAL_AXES_KEY)
  return None if axes is None else tuple(axes)


def _meta(axes) -> dict:
  return {} if axes is None else {LOGICAL_AXES_KEY: tuple(axes)}


class FactoredLinear(nnx.Module):
  """x -> up(down(x)): a Dense [in, out] as [in, r] then [r, out] (bias on `up`)."""

  def __init__(self, layer: nnx.Linear, rank: int, *, rngs: nnx.Rngs):
    axes = _axes(layer.kernel)
    row_axis, col_axis = (None, None) if axes is None else axes
    self.in_features, self.out_features, self.rank = layer.in_features, layer.out_features, rank
    common = dict(dtype=layer.dtype, param_dtype=layer.param_dtype, precision=layer.precision,
                  rngs=rngs)
    self.down = nnx.Linear(layer.in_features, rank, use_bias=False,
                           kernel_metadata=_meta(None if axes is None else (row_axis, None)),
                           **common)
    bias_axes = _axes(layer.bias) if layer.bias is not None else None
    self.up = nnx.Linear(rank, layer.out_features, use_bias=layer.use_bias,
                         kernel_metadata=_meta(None if axes is None else (None, col_axis)),
                         bias_metadata=_meta(bias_axes), **common)

  def __call__(self, x):
    return self.up(self.down(x))

  def linear_flops(self) -> float:
    """One example's forward FLOPs (models.cost.linear_flops calls this)."""
    return 2.0 * self.rank * (self.in_features + self.out_features)


class FactoredConv(nnx.Module):
  """A conv kh x kw: in -> out as the same-shaped conv in -> r, then a 1x1 conv r -> out."""

  def __init__(self, layer: nnx.Conv, rank: int, *, rngs: nnx.Rngs):
    axes = _axes(layer.kernel)
    spatial = len(layer.kernel_size)
    self.in_features, self.out_features, self.rank = layer.in_features, layer.out_features, rank
    self.kernel_size = tuple(layer.kernel_size)
    common = dict(dtype=layer.dtype, param_dtype=layer.param_dtype, precision=layer.precision,
                  rngs=rngs)
    self.spatial = Conv(layer.in_features, rank, layer.kernel_size, strides=layer.strides,
                        padding=layer.padding, input_dilation=layer.input_dilation,
                        kernel_dilation=layer.kernel_dilation, use_bias=False,
                        kernel_metadata=_meta(None if axes is None else (*axes[:-1], None)),
                        **common)
    bias_axes = _axes(layer.bias) if layer.bias is not None else None
    self.pointwise = Conv(rank, layer.out_features, (1,) * spatial, use_bias=layer.use_bias,
                          kernel_metadata=_meta(None if axes is None else
                                                ((None,) * (spatial + 1) + (axes[-1],))),
                          bias_metadata=_meta(bias_axes), **common)

  def __call__(self, x):
    return self.pointwise(self.spatial(x))

  def conv_flops(self, spatial_shape):
    """(one example's forward FLOPs, output spatial shape), as models.cost.conv_flops."""
    from models.cost import conv_flops
    first, shape = conv_flops(self.spatial, spatial_shape)
    second, shape = conv_flops(self.pointwise, shape)
    return first + second, shape


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which submodules are factored, to what rank: module path 'a/0/b' -> rank."""
  ranks: dict
  checkpoint_dir: str

  def build(self, build_model):
    """`build_model` (rngs -> module) followed by the surgery that swaps the planned
    layers for their factored versions."""
    def build_factored(rngs: nnx.Rngs):
      model = build_model(rngs)
      replace(model, self.ranks, rngs)
      return model
    return build_factored

  def factored_params(self, source: dict) -> dict:
    """The checkpoint's params with each planned kernel K (and bias) replaced by the SVD
    factors at the factored modules' paths; every other leaf as it was."""
    out = jax.tree.map(lambda x: x, source)
    for name, rank in self.ranks.items():
      parent, key = _lookup_parent(out, name.split('/'))
      layer = parent.pop(key)
      kernel = np.asarray(layer['kernel'])
      first, second = svd_factors(kernel.reshape(-1, kernel.shape[-1]), rank)
      dtype = kernel.dtype
      if kernel.ndim == 2:
        factored = {'down': {'kernel': first.astype(dtype)}, 'up': {'kernel': second.astype(dtype)}}
        top = 'up'
      else:
        spatial = kernel.ndim - 2
        factored = {'spatial': {'kernel': first.reshape(*kernel.shape[:-1], rank).astype(dtype)},
                    'pointwise': {'kernel': second.reshape(*(1,) * spatial, rank,
                                                           kernel.shape[-1]).astype(dtype)}}
        top = 'pointwise'
      if 'bias' in layer:
        factored[top]['bias'] = layer['bias']
      parent[key] = factored
    return out


def _lookup_parent(tree: dict, parts: list[str]):
  """(the dict holding parts[-1], its key), matching string or int keys."""
  for part in parts[:-1]:
    tree = tree[_match_key(tree, part)]
  return tree, _match_key(tree, parts[-1])


def _match_key(tree: dict, part: str):
  for key in tree:
    if str(key) == part:
      return key
  raise KeyError(part)


def _eligible(model: nnx.Module) -> dict[str, nnx.Module]:
  """'a/0/b' -> each Dense or (ungrouped) Conv submodule."""
  out = {}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, nnx.Conv) and module.feature_group_count != 1:
      continue
    if isinstance(module, (nnx.Linear, nnx.Conv)):
      out['/'.join(str(p) for p in path)] = module
  return out


def replace(model: nnx.Module, ranks: dict, rngs: nnx.Rngs) -> None:
  """Swaps each planned submodule (path -> rank) for its factored version, in place."""
  modules = dict(nnx.iter_modules(model))
  for name, rank in ranks.items():
    path = tuple(int(p) if p.isdigit() else p for p in name.split('/'))
    layer, parent = modules[path], modules[path[:-1]]
    factored = (FactoredLinear if isinstance(layer, nnx.Linear) else FactoredConv)(
        layer, rank, rngs=rngs)
    if isinstance(path[-1], int):
      parent[path[-1]] = factored
    else:
      setattr(parent, path[-1], factored)


def plan(config, abstract_model: Callable[[], nnx.Module], read_source: Callable[[], dict]
         ) -> Plan | None:
  """The ranks config.low_rank gives each eligible layer of `abstract_model()`, from the
  trained kernels in `read_source()` (the checkpoint's params); None when low_rank is off
  (then neither is called). Raises a one-line KilnError on bad settings."""
  settings = config.low_rank
  energy, ratio = settings.energy, settings.rank_ratio
  if not energy and not ratio:
    return None
  if energy and ratio:
    raise KilnError(f'config.low_rank.energy={energy} and rank_ratio={ratio} are both set: set '
                    'one of them to 0')
  if not 0 < energy <= 1 and not 0 < ratio <= 1:
    raise KilnError('config.low_rank.energy and rank_ratio must lie in (0, 1] (0 off): a rank '
                    "cannot exceed a layer's size")
  if not config.init.checkpoint_dir:
    raise KilnError('config.low_rank factors a trained model: set config.init.checkpoint_dir '
                    'to the workdir of the run to factor')
  patterns = {}
  for key in ('include', 'exclude'):
    try:
      patterns[key] = re.compile(settings[key]) if settings[key] else None
    except re.error as e:
      raise KilnError(f"config.low_rank.{key}='{settings[key]}' is not a valid regex ({e}): "
                      'fix the pattern') from e
  eligible = _eligible(abstract_model())
  chosen = {name: layer for name, layer in eligible.items()
            if (patterns['include'] is None or patterns['include'].search(f'{name}/kernel'))
            and not (patterns['exclude'] is not None
                     and patterns['exclude'].search(f'{name}/kernel'))}
  if not chosen:
    raise KilnError(f"config.low_rank.include='{settings.include}' (less exclude="
                    f"'{settings.exclude}') matches no Dense or Conv kernel: choose from "
                    f"{', '.join(f'{n}/kernel' for n in list(eligible)[:6])}")
  kernels = {path_string(path): leaf
             for path, leaf in jax.tree_util.tree_flatten_with_path(read_source())[0]}
  ranks, whole = {}, []
  for name, layer in chosen.items():
    kernel = kernels.get(f'{name}/kernel')
    if kernel is None or tuple(kernel.shape) != tuple(layer.kernel.shape):
      raise KilnError(f"the checkpoint in config.init.checkpoint_dir has no kernel '{name}/"
                      f"kernel' of shape {tuple(layer.kernel.shape)}: point it at a run of "
                      'this model')
    matrix = np.asarray(kernel).reshape(-1, kernel.shape[-1])
    rows, cols = matrix.shape
    singular = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
    rank = choose_rank(singular, rows, cols, energy, ratio)
    if rank is None:
      whole.append(name)
    else:
      ranks[name] = rank
  logging.info('Low-rank: factoring %s; kept whole (no saving): %s',
               ', '.join(f'{n} (rank {r})' for n, r in ranks.items()) or 'none',
               ', '.join(whole) or 'none')
  return Plan(ranks=ranks, checkpoint_dir=config.init.checkpoint_dir)
