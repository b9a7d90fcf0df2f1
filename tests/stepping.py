"""Runs a few train steps of a config on a chosen set of devices, outside the full loop."""

import jax

from loop.experiment import build_experiment


def host_batches(exp, count):
  batches = exp.train_batches(start_step=0)
  return [next(batches) for _ in range(count)]


def run_steps(config, devices, num_steps=3):
  """Params and step outputs after `num_steps` train steps on `devices`."""
  exp = build_experiment(config, devices)
  state, shardings = exp.create_state()
  train_step = exp.train_step(shardings)
  outputs = []
  for host_batch in host_batches(exp, num_steps):
    state, batch_metrics, optimizer_scalars = train_step(state, exp.strategy.place(host_batch))
    outputs.append((jax.device_get(batch_metrics.compute()), jax.device_get(optimizer_scalars)))
  return exp, state, outputs
