"""Logical axis names -> mesh axes: parameter, optimizer-state and activation shardings.

The names themselves and the activation constraint live in core/logical_axes.py; here
the config's rules table is parsed and whole trees of state get their specs. Nothing here knows which model it shards.
"""

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from core.errors import KilnError
from core.logical_axes import LOGICAL_AXES_KEY, Rules, logical_to_spec


def parse_rules(rules: Sequence[Sequence], mesh: Mesh) -> Rules:
  """((logical, mesh_axis | (mesh_axes...) | None), ...) from the config -> dict."""
  parsed = {}
  for rule in rules:
    if len(rule) != 2:
      raise KilnError(f'sharding rule {tuple(rule)} must be (logical_name, mesh_axes): fix '
                      'config.parallel.rules')
    logical, target = rule
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
      raise KilnError(f"sharding rule for '{logical}' names mesh axes {unknown}: use only "
                      f'{list(mesh.axis_names)} in config.parallel.rules')
    parsed[logical] = axes
  from parallel.mesh import BATCH_AXES  # The batch split is fixed by the input placement.
  parsed['batch'] = BATCH_AXES
  return parsed


def variable_logical_axes(abstract_state: nnx.State) -> dict:
  """Pure dict, like the state's values, of each variable's logical axes (or None)."""
  axes = jax.tree.map(lambda v: v.get_metadata().get(LOGICAL_AXES_KEY), abstract_state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(axes) if isinstance(axes, nnx.State) else axes


def tree_specs(values: dict, logical_axes: dict, mesh: Mesh, rules: Rules) -> dict:
  return jax.tree.map(lambda axes, v: logical_to_spec(axes, v.shape, mesh, rules),
                      logical_axes, values, is_leaf=lambda x: x is None or isinstance(x, tuple))


def match_by_path(tree, reference_specs: dict, reference_values: dict):
  """Specs for a tree (e.g. optimizer state) whose leaves mirror `reference_values` under a
  prefix (mu/params/...): a leaf takes the spec of the reference leaf whose path is a
  suffix of its own and whose shape is equal; any other leaf is replicated."""
  by_path = {}
  for (path, spec), value in zip(jax.tree_util.tree_flatten_with_path(reference_specs,
                                                                      is_leaf=lambda x: isinstance(x, P))[0],
                                 jax.tree.leaves(reference_values)):
    by_path[tuple(path)] = (spec, value.shape)

  def spec_for(path, leaf):
    path = tuple(path)
    for start in range(len(path)):
      hit = by_path.get(path[start:])
      if hit and tuple(hit[1]) == tuple(leaf.shape):
        return hit[0]
    return P()
  return jax.tree_util.tree_map_with_path(spec_for, tree)


def replicated_fraction(values: dict, specs: dict) -> float:
  """Fraction of the bytes of `values` stored whole on every device."""
  total = replicated = 0
  for value, spec in zip(jax.tree.leaves(values),
                         jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
    nbytes = math.prod(value.shape) * np.dtype(value.dtype).itemsize
    total += nbytes
    if not any(axis is not None for axis in spec):
      replicated += nbytes
  return replicated / total if total else 0.0
