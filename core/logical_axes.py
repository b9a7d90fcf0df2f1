"""Logical axis names on parameters and activations, and the rules that map them to a mesh.

Models name the dimensions of their parameters (`kernel_metadata={'logical_axes': ...}`)
and activations (`constrain(x, names)`); `parallel/` activates a (mesh, rules) pair while
a step is traced. This sits at the ground floor so that models and backends can name
axes without importing the parallel strategies.
"""

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = dict[str, tuple[str, ...]]
LOGICAL_AXES_KEY = 'logical_axes'
# Param metadata: how many trailing dims are a kernel's outputs (default 1, as for Dense
# and Conv kernels); a fused projection such as attention's [E, 3, N, H] says 3.
FAN_OUT_KEY = 'fan_out_dims'


def kernel_matrix_dims(shape: Sequence[int], logical_axes: Sequence[str | None] | None,
                       fan_out_dims: int = 1) -> tuple[int, int] | None:
  """(stacked, fan_in): a kernel of `shape` is `prod(shape[:stacked])` matrices (leading
  dims a transform added, e.g. scanned layers) of `prod(shape[stacked:stacked + fan_in])`
  input rows by the remaining output columns. None for vectors and scalars."""
  own = len(logical_axes) if logical_axes is not None else len(shape)
  stacked = len(shape) - own
  fan_in = own - fan_out_dims
  if own < 2 or fan_in < 1:
    return None
  return stacked, fan_in

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    'kiln_sharding', default=None)


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int],
                    mesh: Mesh, rules: Rules) -> P:
  """The PartitionSpec for one array. A dimension whose size the mesh axes do not divide,
  or whose mesh axes an earlier dimension already uses, stays unsharded."""
  if logical_axes is None:
    return P()
  # Leading dims a transform added (e.g. the layer axis of scanned blocks) stay unsharded.
  logical_axes = (None,) * (len(shape) - len(logical_axes)) + tuple(logical_axes)
  used, spec = set(), []
  for name, size in zip(logical_axes, shape):
    axes = tuple(a for a in rules.get(name, ()) if mesh.shape[a] > 1) if name else ()
    if axes and not used & set(axes) and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used |= set(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
  """Makes `constrain` effective while a step is traced."""
  token = _ACTIVE.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[Mesh, Rules] | None:
  """The (mesh, rules) of the enclosing `activate`, or None."""
  return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Pins an activation's layout by logical names; a no-op outside `activate` (eager
  use, pmap, notebooks)."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_to_spec(logical_axes, x.shape, mesh, rules)))
