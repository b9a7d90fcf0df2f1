"""Wall-clock accounting for one run."""

import time


class Stopwatch:
  """Accumulates named intervals (train, eval, checkpoint, ...)."""

  def __init__(self):
    self.totals: dict[str, float] = {}
    self.started = time.perf_counter()

  def add(self, name: str, seconds: float) -> None:
    self.totals[name] = self.totals.get(name, 0.0) + seconds

  def elapsed(self) -> float:
    return time.perf_counter() - self.started
