"""Preemption: SIGTERM (a scheduler reclaiming the machine) or SIGINT (Ctrl-C) asks the loop
to checkpoint the step it is on and return, instead of dying between checkpoints.

The handlers only set a flag; the loop reads it between steps. A second signal of the same
kind is not caught again (Ctrl-C twice still interrupts at once). With several processes the
step to stop at must be the same on all of them: JAX's preemption service (started by
jax.distributed.initialize) catches SIGTERM on any process and agrees on that step, so no
handler is installed there.
"""

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
  """Within `with Preemption() as preemption:`, `preemption.requested` turns True on a signal."""

  def __init__(self):
    self.requested = False
    self.signal_name = ''
    self._previous = {}

  def _handle(self, signum, frame):
    self.requested = True
    self.signal_name = signal.Signals(signum).name
    logging.warning('%s received: checkpointing the current step, then stopping',
                    self.signal_name)
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  def requested_at(self, step: int) -> bool:
    """Whether to checkpoint `step` and stop; called once per step, on every process."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __enter__(self):
    # Handlers live in the main thread only; several processes use JAX's preemption service.
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    return False
