"""How a step runs on the devices: 'jit' (GSPMD over the mesh) or 'pmap' (replicas).

A strategy compiles the step functions, places host batches, and converts the train
state to and from the layout checkpoints use. It knows nothing of models or tasks.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from core import logical_axes
from core.errors import KilnError
from core.logical_axes import Rules
from parallel import mesh as mesh_lib

from parallel.placement import to_global

STRATEGIES = ('jit', 'pmap')
PMAP_AXIS = 'batch'


class _MetricsToHost:
  """A compiled step that returns once every device has finished it, with its outputs after
  the first `keep_on_device` (the train state) as host arrays, so that merging and reading
  metrics runs no device programs; `.lower` etc. pass through.

  Why: on XLA:CPU every program over several in-process devices is a "collective launch":
  each device admits a bounded number of queued programs (32 in XLA's source), and
  launches are admitted per device in no fixed order. When a later program takes a
  device's slot before an earlier one, the earlier one's all-reduce waits forever and XLA
  aborts the process after its 40 s rendezvous timeout (seen in CI in the 8-fake-device
  RNN-T eval loop, whose per-field metric merges queued dozens of tiny 8-device programs).
  A replicated metric is fetched from one device while the step may still run on the
  others, so the call also waits for every device: at most one step is ever in flight.
  Accelerators and single-device CPU keep metrics on the device and async dispatch.
  """

  def __init__(self, step, keep_on_device: int):
    self._step, self._keep = step, keep_on_device

  def __call__(self, *args):
    # Every device's share, state included: fetching a replicated metric reads one device.
    outputs = jax.block_until_ready(self._step(*args))
    if not self._keep:
      return jax.device_get(outputs)
    return (*outputs[:self._keep], *jax.device_get(tuple(outputs[self._keep:])))

  def __getattr__(self, name):
    return getattr(self._step, name)


def _in_process_collectives(devices) -> bool:
  """True where several local devices of one process are the CPU's fake devices."""
  local = [d for d in devices if d.process_index == jax.process_index()]
  return len(local) > 1 and local[0].platform == 'cpu'


def _dispatch_safely(step, devices, keep_on_device: int):
  return _MetricsToHost(step, keep_on_device) if _in_process_collectives(devices) else step


class JitStrategy:
  """One program over the global mesh; parameters and batches sharded by NamedSharding."""
  name = 'jit'
  norm_axis_name = None  # XLA already computes BatchNorm statistics over the global batch.

  def __init__(self, mesh: Mesh, rules: Rules):
    self.mesh, self.rules = mesh, rules
    self.batch_sharding = mesh_lib.batch_sharding(mesh)

  def compile_train(self, step_fn, state_shardings):
    replicated = mesh_lib.replicated(self.mesh)
    return _dispatch_safely(
        jax.jit(self._with_rules(step_fn), in_shardings=(state_shardings, self.batch_sharding),
                out_shardings=(state_shardings, replicated, replicated), donate_argnums=0),
        self.mesh.devices.flat, keep_on_device=1)

  def compile_eval(self, step_fn, state_shardings):
    return _dispatch_safely(
        jax.jit(self._with_rules(step_fn), in_shardings=(state_shardings, self.batch_sharding),
                out_shardings=mesh_lib.replicated(self.mesh)),
        self.mesh.devices.flat, keep_on_device=0)

  def _with_rules(self, step_fn):
    def traced(*args):
      with logical_axes.activate(self.mesh, self.rules):
        return step_fn(*args)
    return traced

  def place(self, host_batch):
    return to_global(host_batch, self.batch_sharding)

  def distribute(self, state, state_shardings):
    return state  # Created sharded already.

  def step_of(self, state) -> int:
    return int(state.step)

  def checkpoint_view(self, state):
    return state

  def restore_shardings(self, state_shardings):
    return state_shardings


class PmapStrategy:
  """Pure data parallelism: a full replica of the state on every local device,
  gradients and BatchNorm statistics averaged over `PMAP_AXIS`."""
  name = 'pmap'
  norm_axis_name = PMAP_AXIS

  def __init__(self, mesh: Mesh):
    if any(mesh.shape[a] > 1 for a in mesh.axis_names if a not in mesh_lib.BATCH_AXES[:1]):
      raise KilnError(f'config.parallel.strategy=pmap is pure data parallelism but the mesh is '
                      f'{dict(mesh.shape)}: set config.mesh.fsdp=1 and config.mesh.tensor=1')
    self.devices = jax.local_devices()
    self.local_mesh = Mesh(np.asarray(self.devices), (PMAP_AXIS,))
    self.stacked = NamedSharding(self.local_mesh, P(PMAP_AXIS))

  def compile_train(self, step_fn, state_shardings):
    mapped = _dispatch_safely(jax.pmap(step_fn, axis_name=PMAP_AXIS, donate_argnums=0),
                              self.devices, keep_on_device=1)

    def train_step(state, batch):
      state, batch_metrics, scalars = mapped(state, batch)
      return state, *jax.tree.map(lambda x: x[0], (batch_metrics, scalars))
    return train_step

  def compile_eval(self, step_fn, state_shardings):
    mapped = _dispatch_safely(jax.pmap(step_fn, axis_name=PMAP_AXIS), self.devices,
                              keep_on_device=0)
    return lambda state, batch: jax.tree.map(lambda x: x[0], mapped(state, batch))

  def place(self, host_batch):
    n = len(self.devices)

    def split(x):
      if x.shape[0] % n:
        raise KilnError(f'host batch of {x.shape[0]} does not split over {n} local devices: '
                        'make the batch size a multiple of the device count')
      return jax.device_put(x.reshape(n, x.shape[0] // n, *x.shape[1:]), self.stacked)
    return jax.tree.map(split, host_batch)

  def distribute(self, state, state_shardings):
    """One copy per local device, stacked on a leading axis."""
    n = len(self.devices)
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n, *x.shape)), self.stacked),
        state)

  def step_of(self, state) -> int:
    return int(state.step[0])

  def checkpoint_view(self, state):
    """Replica 0, as host arrays: the replicas are identical by construction."""
    return jax.device_get(jax.tree.map(lambda x: x[0], state))

  def restore_shardings(self, state_shardings):
    single = jax.sharding.SingleDeviceSharding(self.devices[0])
    return jax.tree.map(lambda _: single, state_shardings)


def create_strategy(name: str, mesh: Mesh, rules: Rules):
  if name == 'jit':
    return JitStrategy(mesh, rules)
  if name == 'pmap':
    return PmapStrategy(mesh)
  raise KilnError(f"unknown config.parallel.strategy '{name}': choose one of "
                  f"{', '.join(STRATEGIES)}")
