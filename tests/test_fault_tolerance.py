"""Surviving what kills long runs: SIGKILL at random steps, SIGTERM (preemption), a corrupted
newest checkpoint, a workdir that cannot be written. Real processes and real signals."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import train
from core.errors import KilnError
from loop.checkpoint import CHECKPOINTS_FOLDER
from tests.checkpoints import latest_params
from tests.tiny import REPO, fault_config

CHAOS_SEED = 20261204  # The kill steps are random, and reproducible from this seed.


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, devices):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  summary = train.train_and_evaluate(fault_config(), workdir)
  return workdir, summary


def _checkpoint_steps(workdir: str) -> list[int]:
  folder = os.path.join(workdir, CHECKPOINTS_FOLDER)
  if not os.path.isdir(folder):
    return []
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def _start(workdir: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, 'tests/fault_worker.py', workdir], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(proc, workdir: str, at_least: int, timeout: float = 240) -> int:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = _checkpoint_steps(workdir)
    if steps and steps[-1] >= at_least:
      return steps[-1]
    if proc.poll() is not None:
      raise AssertionError(f'worker ended before step {at_least}:\n{proc.stdout.read()[-3000:]}')
    time.sleep(0.01)
  proc.kill()
  raise AssertionError(f'no checkpoint {at_least} within {timeout} s')


def _assert_same_params(expected_workdir: str, workdir: str, exact: bool = True):
  """The two runs' last parameters: the same bits where both ran in one process each (the
  CPU is deterministic), else (two processes' collectives against one process's sums) equal
  to float rounding."""
  check = np.testing.assert_array_equal if exact else (
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6))
  jax.tree.map(check, latest_params(expected_workdir), latest_params(workdir))


@pytest.mark.slow  # Six processes, each compiling.
def test_sigkill_at_five_random_steps_then_resume_equals_uninterrupted(uninterrupted, tmp_path):
  workdir = str(tmp_path / 'chaos')
  kill_steps = sorted(np.random.default_rng(CHAOS_SEED).choice(np.arange(2, 26, 2), 5,
                                                               replace=False))
  killed_at = []
  for step in kill_steps:
    proc = _start(workdir)
    reached = _wait_for_checkpoint(proc, workdir, step)
    proc.send_signal(signal.SIGKILL)  # Mid-step, maybe mid-write: no chance to clean up.
    proc.wait()
    killed_at.append(reached)
  proc = _start(workdir)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0 and 'done steps=30 preempted=False' in out, out[-3000:]
  assert len(set(killed_at)) == 5, f'kills at {killed_at} (asked {kill_steps})'
  _assert_same_params(uninterrupted[0], workdir)


@pytest.mark.slow  # Two processes.
def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(uninterrupted, tmp_path):
  workdir = str(tmp_path / 'preempted')
  proc = _start(workdir)
  _wait_for_checkpoint(proc, workdir, 6)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0 and 'preempted=True' in out, out[-3000:]
  stopped_at = int(out.split('done steps=')[1].split()[0])
  assert 6 <= stopped_at < 30 and _checkpoint_steps(workdir)[-1] == stopped_at
  proc = _start(workdir)
  out, _ = proc.communicate(timeout=300)
  assert 'done steps=30 preempted=False' in out, out[-3000:]
  _assert_same_params(uninterrupted[0], workdir)


@pytest.mark.slow  # Two tiny runs.
def test_corrupted_newest_checkpoint_resumes_from_the_one_before(uninterrupted, tmp_path,
                                                                 caplog):
  workdir = str(tmp_path / 'corrupt')
  train.train_and_evaluate(fault_config(), workdir, stop_at_step=20)
  assert _checkpoint_steps(workdir)[-1] == 20
  newest = os.path.join(workdir, CHECKPOINTS_FOLDER, '20', 'state')
  data_files = [os.path.join(root, name) for root, _, names in os.walk(newest) for name in names
                if 'd' in root.split(os.sep)[-1] or name.startswith('ocdbt')]
  for path in data_files or [os.path.join(root, n) for root, _, ns in os.walk(newest)
                             for n in ns]:
    with open(path, 'r+b') as f:  # Truncated and overwritten, as a dying disk would leave it.
      size = os.path.getsize(path)
      f.truncate(max(size // 2, 1))
      f.seek(0)
      f.write(b'\0' * min(64, max(size // 2, 1)))
  summary = train.train_and_evaluate(fault_config(), workdir)
  assert summary['steps'] == 30
  assert any('checkpoint 20' in r.getMessage() and 'resuming from checkpoint 18' in r.getMessage()
             for r in caplog.records)
  assert os.path.isdir(os.path.join(workdir, 'corrupt_checkpoints', '20'))
  _assert_same_params(uninterrupted[0], workdir)


def test_unwritable_workdir_fails_in_one_line(tmp_path, devices):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  with pytest.raises(KilnError, match=r'cannot be written .*pass a writable folder') as error:
    train.train_and_evaluate(fault_config(), str(blocker / 'run'))
  assert '\n' not in str(error.value)


@pytest.mark.slow  # Two interpreters, twice (the one-process reference is shared).
def test_two_process_job_resumes_after_one_process_is_killed(multihost_reference, tmp_path):
  """SIGKILL one of two processes mid-run (the other is stuck in a collective and is killed
  by the "scheduler" too), restart both: the job ends equal to one uninterrupted process."""
  from tests.test_multihost import _free_port, _run_two_processes
  reference = multihost_reference[0]
  workdir = str(tmp_path / 'two_processes')
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, 'tests/multihost_worker.py', str(i), '2', str(port),
                             workdir], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  _wait_for_checkpoint(procs[0], workdir, 3, timeout=900)
  procs[1].send_signal(signal.SIGKILL)
  try:
    procs[0].wait(timeout=20)
  except subprocess.TimeoutExpired:
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
  killed_at = _checkpoint_steps(workdir)[-1]
  assert killed_at < 12, 'the job finished before the kill: nothing to resume'
  _run_two_processes(workdir)
  _assert_same_params(reference, workdir, exact=False)
