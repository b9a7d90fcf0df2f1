"""One process of a multi-process CPU run (4 fake devices each), started by test_multihost.

usage: python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR [STOP_AT_STEP]
"""

import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from parallel import distributed  # noqa: E402
from tests.tiny import multihost_config  # noqa: E402


def main(process_id: str, num_processes: str, port: str, workdir: str, stop_at_step: str = ''):
  config = multihost_config()
  config.distributed.initialize = True
  config.distributed.coordinator_address = f'localhost:{port}'
  config.distributed.num_processes = int(num_processes)
  config.distributed.process_id = int(process_id)
  distributed.initialize(config.distributed)
  train.train_and_evaluate(config, workdir, stop_at_step=int(stop_at_step) if stop_at_step else None)


if __name__ == '__main__':
  main(*sys.argv[1:])
