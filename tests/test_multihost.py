"""Two real processes (gloo collectives, 4 fake CPU devices each) train, checkpoint and
resume exactly like one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from monitor import run_log
from tests.checkpoints import latest_params
from tests.tiny import REPO



def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run_two_processes(workdir: str, stop_at_step: int | None = None) -> None:
  port = _free_port()
  args = [] if stop_at_step is None else [str(stop_at_step)]
  procs = [subprocess.Popen([sys.executable, 'tests/multihost_worker.py', str(i), '2', str(port),
                             workdir, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]


def _losses(workdir: str) -> list[float]:
  return list(run_log.read_scalars(workdir)['train_loss'][1])


@pytest.mark.slow  # Two more interpreters, twice (the one-process reference is shared).
def test_two_processes_match_one_process_step_for_step(multihost_reference, tmp_path):
  reference, expected = multihost_reference
  multi = str(tmp_path / 'two_processes')
  _run_two_processes(multi, stop_at_step=6)
  assert sorted(os.listdir(os.path.join(multi, 'checkpoints'))) == ['3', '6']
  _run_two_processes(multi)  # Resumes from step 6.

  with open(os.path.join(multi, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['num_processes'] == 2 and summary['num_devices'] == 8
  assert summary['steps'] == expected['steps'] == 12
  np.testing.assert_allclose(_losses(multi), _losses(reference), rtol=1e-5)
  assert len(_losses(multi)) == 12
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               latest_params(multi), latest_params(reference))
  assert summary['final_eval'] == pytest.approx(expected['final_eval'], rel=1e-5)
