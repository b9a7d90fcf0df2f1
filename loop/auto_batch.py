"""`config.batch_size='auto'`: the largest global batch whose compiled train step fits a memory
budget, read from XLA's memory analysis of the step compiled for each size (no step runs, so
nothing can run out of memory while searching), and the learning rate scaled to it.

The search doubles from the smallest legal batch (the mesh's batch shards x processes x
accumulation steps) until a size does not fit, then bisects between the last fit and that
size down to one legal step: the batch it returns fits and the next legal size does not.
"""

import dataclasses
import math
import os

import jax
import ml_collections
from absl import logging

from core.errors import KilnError
from loop import experiment as experiment_lib
from monitor import hardware
from parallel import mesh as mesh_lib

AUTO = 'auto'
LR_SCALINGS = ('none', 'linear', 'sqrt')


def memory_budget(gigabytes: float) -> tuple[float, str]:
  """Bytes one device may use: `gigabytes` when positive, else the device's own limit, else
  (CPU) the host's memory shared by its devices; with where the figure came from."""
  if gigabytes > 0:
    return gigabytes * 2 ** 30, 'config.auto_batch.limit_gb'
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return float(stats['bytes_limit']), 'device memory_stats'
  host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return host / jax.local_device_count(), 'host memory / local devices'


def step_peak_bytes(exp, train_step, state, host_batch: dict, size: int) -> float:
  """Peak bytes per device of `train_step` compiled for a global batch of `size` (the arrays of
  `host_batch`, one host's batch of exp.config.batch_size, give the shapes)."""
  base = exp.config.batch_size
  batch = {k: jax.ShapeDtypeStruct((size * v.shape[0] // base, *v.shape[1:]), v.dtype,
                                   sharding=exp.strategy.batch_sharding)
           for k, v in host_batch.items()}
  return float(hardware.memory_analysis_bytes(train_step.lower(state, batch).compile())[1])


def largest_fitting_batch(exp, state, shardings, host_batch: dict, budget: float,
                          limit: int, step: int) -> tuple[int | None, int | None, dict]:
  """(largest size that fits, smallest measured size that does not (None: `limit` reached),
  {size: peak bytes}), over multiples of `step` starting at exp.config.batch_size."""
  train_step = exp.train_step(shardings)
  measured: dict[int, float] = {}

  def fits(size: int) -> bool:
    measured[size] = step_peak_bytes(exp, train_step, state, host_batch, size)
    logging.info('batch %d: compiled peak %.3f GiB per device (budget %.3f GiB)', size,
                 measured[size] / 2 ** 30, budget / 2 ** 30)
    return measured[size] <= budget

  good, bad, size = None, None, exp.config.batch_size
  while size <= limit:
    if not fits(size):
      bad = size
      break
    good, size = size, size * 2
  if good is not None and bad is not None:
    while bad - good > step:  # Bisection in legal steps.
      middle = (good + bad) // 2 // step * step
      if middle in (good, bad):
        break
      good, bad = (middle, bad) if fits(middle) else (good, middle)
  return good, bad, measured


def scaled_learning_rate(config, batch_size: int) -> float:
  """config.optimizer.learning_rate moved from reference_batch_size to `batch_size` by
  config.optimizer.lr_scaling (linear: proportional; sqrt: by the square root)."""
  rule, reference = config.optimizer.lr_scaling, config.optimizer.reference_batch_size
  if rule == 'none' or batch_size == reference:
    return config.optimizer.learning_rate
  if reference <= 0:
    raise KilnError(f"config.optimizer.lr_scaling='{rule}' needs the batch the learning rate "
                    'was set for: set config.optimizer.reference_batch_size')
  factor = batch_size / reference
  return config.optimizer.learning_rate * (factor if rule == 'linear' else math.sqrt(factor))


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` as the run trains it: batch_size='auto' replaced by the largest batch that fits
  and the learning rate scaled to the batch; the same config when neither applies."""
  auto = config.batch_size == AUTO
  if not auto and config.optimizer.lr_scaling == 'none':
    return config
  size = search(config).batch_size if auto else config.batch_size
  config = _with_batch_size(config, size)  # A copy: the caller's stays as it was.
  config.optimizer.learning_rate = scaled_learning_rate(config, config.batch_size)
  if config.optimizer.lr_scaling != 'none':
    logging.info('Learning rate %.4g for batch %d (%s scaling from %d)',
                 config.optimizer.learning_rate, config.batch_size, config.optimizer.lr_scaling,
                 config.optimizer.reference_batch_size)
  return config


def _with_batch_size(config: ml_collections.ConfigDict, size: int) -> ml_collections.ConfigDict:
  """A copy of `config` with an int batch size (a copy of 'auto' would be typed str)."""
  return ml_collections.ConfigDict({**config.to_dict(), 'batch_size': size})


@dataclasses.dataclass(frozen=True)
class Search:
  """What batch_size='auto' measured."""
  batch_size: int  # The largest legal batch that fits.
  next_size: int | None  # The next legal size, measured not to fit; None: max_batch_size reached.
  measured: dict[int, float]  # Global batch -> compiled peak bytes per device.
  budget_bytes: float
  budget_source: str
  step: int  # Legal batches are multiples of this.


def search(config: ml_collections.ConfigDict) -> Search:
  """The largest legal batch whose compiled train step fits config.auto_batch's budget."""
  # The smallest legal batch (as experiment.global_batch_check demands): the search's step.
  mesh = mesh_lib.make_mesh(config.mesh)
  step = (math.lcm(mesh_lib.batch_divisor(mesh), jax.process_count())
          * config.gradient.accumulation_steps)
  exp = experiment_lib.build_experiment(_with_batch_size(config, step))
  if exp.strategy.name != 'jit':
    raise KilnError("config.batch_size='auto' needs parallel.strategy='jit' (it compiles the "
                    'sharded step for each size): set a number with pmap')
  budget, source = memory_budget(config.auto_batch.limit_gb)
  state, shardings = exp.create_state()
  host_batch = next(iter(exp.train_batches(0)))  # Under DP-SGD: its padded Poisson batch.
  good, bad, measured = largest_fitting_batch(exp, state, shardings, host_batch, budget,
                                              config.auto_batch.max_batch_size, step)
  if good is None:
    raise KilnError(f'batch_size=auto: even batch {step} needs {measured[step] / 2**30:.3f} GiB '
                    f'per device, over the budget of {budget / 2**30:.3f} GiB ({source}): raise '
                    'config.auto_batch.limit_gb or shrink the model')
  logging.info('batch_size=auto: %d fits (%.3f GiB peak per device of %.3f GiB, %s); %s', good,
               measured[good] / 2**30, budget / 2**30, source,
               f'{bad} does not ({measured[bad] / 2**30:.3f} GiB)' if bad else
               f'config.auto_batch.max_batch_size={config.auto_batch.max_batch_size} reached')
  return Search(good, bad, measured, budget, source, step)
