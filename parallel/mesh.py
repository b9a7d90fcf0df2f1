"""The device mesh and the shardings the loop uses on it."""

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from core.errors import KilnError

MESH_AXES = ('data', 'fsdp', 'tensor')
# Batch dimension of every input is split over these mesh axes.
BATCH_AXES = ('data', 'fsdp')


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A mesh over all devices; an axis of size -1 takes the devices the others leave."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [mesh_config[axis] for axis in MESH_AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1 or len(devices) % fixed:
    raise KilnError(f'mesh sizes {dict(zip(MESH_AXES, sizes))} do not fit {len(devices)} '
                    'devices: set at most one axis to -1 and make the others divide the count')
  sizes = [len(devices) // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise KilnError(f'mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} of '
                    f'{len(devices)} devices: make the axis sizes multiply to the device count')
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  """A global batch must be a multiple of this many shards."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)
