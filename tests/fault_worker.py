"""A tiny training run in its own process, for tests that kill or signal it (test_fault_tolerance).

usage: python tests/fault_worker.py WORKDIR [NUM_TRAIN_STEPS]
Prints 'step N' after every checkpoint write is requested (flushed), so that a test can signal
the process while it is at a known step.
"""

import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from tests.tiny import fault_config  # noqa: E402


def main(workdir: str, num_train_steps: str = ''):
  config = fault_config()
  if num_train_steps:
    config.num_train_steps = int(num_train_steps)
  summary = train.train_and_evaluate(config, workdir)
  print(f"done steps={summary['steps']} preempted={summary['preempted']}", flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
