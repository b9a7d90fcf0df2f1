"""Joining a multi-process job (TPU pods, GPU clusters, several CPU processes in tests)."""

import jax


def initialize(distributed_config) -> None:
  """Joins a multi-process job; JAX detects unset values on TPU pods and SLURM/GPU clusters."""
  if not distributed_config.initialize:
    return
  # CPU processes need gloo for cross-process collectives; GPUs and TPUs ignore this.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {}
  if distributed_config.coordinator_address:
    kwargs['coordinator_address'] = distributed_config.coordinator_address
  if distributed_config.num_processes >= 0:
    kwargs['num_processes'] = distributed_config.num_processes
  if distributed_config.process_id >= 0:
    kwargs['process_id'] = distributed_config.process_id
  jax.distributed.initialize(**kwargs)
