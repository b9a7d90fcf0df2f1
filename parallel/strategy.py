"""How a step runs on the devices: 'jit' (GSPMD over the mesh) or 'pmap' (replicas).

A strategy compiles the step functions, places host batches, and converts the train
state to and from the layout checkpoints use. It knows nothing of models or tasks.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from core.errors import KilnError
from parallel import mesh as mesh_lib
from parallel import sharding
from parallel.placement import to_global

STRATEGIES = ('jit', 'pmap')
PMAP_AXIS = 'batch'


class _WaitForResults:
  """A compiled step that returns only once its results exist; `.lower` etc. pass through.

  Why: XLA:CPU launches each fake device's share of a multi-device program on one
  shared thread pool. With two programs in flight (the next step, or a metrics merge,
  dispatched while a step with an all-reduce still runs), the per-device launches can
  take the devices in different orders, the in-process all-reduce never gathers all its
  participants, and XLA aborts the process after its rendezvous timeout (seen in CI on
  the 8-device RNN-T eval loop). Accelerators and single-device CPU keep async dispatch.
  """

  def __init__(self, step):
    self._step = step

  def __call__(self, *args):
    return jax.block_until_ready(self._step(*args))

  def __getattr__(self, name):
    return getattr(self._step, name)


def _in_process_collectives(devices) -> bool:
  """True where several local devices of one process are the CPU's fake devices."""
  local = [d for d in devices if d.process_index == jax.process_index()]
  return len(local) > 1 and local[0].platform == 'cpu'


def _dispatch_safely(step, devices):
  return _WaitForResults(step) if _in_process_collectives(devices) else step


class JitStrategy:
  """One program over the global mesh; parameters and batches sharded by NamedSharding."""
  name = 'jit'
  norm_axis_name = None  # XLA already computes BatchNorm statistics over the global batch.

  def __init__(self, mesh: Mesh, rules: sharding.Rules):
    self.mesh, self.rules = mesh, rules
    self.batch_sharding = mesh_lib.batch_sharding(mesh)

  def compile_train(self, step_fn, state_shardings):
    replicated = mesh_lib.replicated(self.mesh)
    return _dispatch_safely(
        jax.jit(self._with_rules(step_fn), in_shardings=(state_shardings, self.batch_sharding),
                out_shardings=(state_shardings, replicated, replicated), donate_argnums=0),
        self.mesh.devices.flat)

  def compile_eval(self, step_fn, state_shardings):
    return _dispatch_safely(
        jax.jit(self._with_rules(step_fn), in_shardings=(state_shardings, self.batch_sharding),
                out_shardings=mesh_lib.replicated(self.mesh)),
        self.mesh.devices.flat)

  def _with_rules(self, step_fn):
    def traced(*args):
      with sharding.activate(self.mesh, self.rules):
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
    # Waits before the replica-0 slices below are dispatched: they are programs too.
    mapped = _dispatch_safely(jax.pmap(step_fn, axis_name=PMAP_AXIS, donate_argnums=0),
                              self.devices)

    def train_step(state, batch):
      state, batch_metrics, scalars = mapped(state, batch)
      return state, *jax.tree.map(lambda x: x[0], (batch_metrics, scalars))
    return train_step

  def compile_eval(self, step_fn, state_shardings):
    mapped = _dispatch_safely(jax.pmap(step_fn, axis_name=PMAP_AXIS), self.devices)
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


def create_strategy(name: str, mesh: Mesh, rules: sharding.Rules):
  if name == 'jit':
    return JitStrategy(mesh, rules)
  if name == 'pmap':
    return PmapStrategy(mesh)
  raise KilnError(f"unknown config.parallel.strategy '{name}': choose one of "
                  f"{', '.join(STRATEGIES)}")
