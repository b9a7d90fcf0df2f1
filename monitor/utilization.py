"""Per-interval throughput, TFLOP/s, MFU and input wait of a running training loop.

The loop never blocks on a step just to time it: it calls `record` when it has
fetched a log step's metrics anyway, and the interval since the previous record
is timed as a whole (async dispatch keeps the devices busy in between).
"""

import statistics
import time

from monitor import flops


class UtilizationMeter:
  def __init__(self, flops_per_step: float, examples_per_step: int, num_devices: int,
               peak_flops_per_device: float | None):
    self.flops_per_step = flops_per_step
    self.examples_per_step = examples_per_step
    self.num_devices = num_devices
    self.peak = peak_flops_per_device
    self.intervals: list[dict[str, float]] = []
    self._last = None  # (step, time, input wait seconds) of the previous record.

  def start(self, step: int, input_wait_seconds: float) -> None:
    """Marks the beginning of timed training (after the compiling first step)."""
    self._last = (step, time.perf_counter(), input_wait_seconds)

  def record(self, step: int, input_wait_seconds: float) -> dict[str, float]:
    """Scalars for the steps since the last record; {} if there are none."""
    now = time.perf_counter()
    last_step, last_time, last_wait = self._last
    self._last = (step, now, input_wait_seconds)
    if step <= last_step or now <= last_time:
      return {}
    step_seconds = (now - last_time) / (step - last_step)
    interval = {
        'step_time_s': step_seconds,
        'examples_per_sec': self.examples_per_step / step_seconds,
        'tflops_per_device': flops.tflops_per_device(self.flops_per_step, step_seconds,
                                                     self.num_devices),
        'input_wait_fraction': min((input_wait_seconds - last_wait) / (now - last_time), 1.0),
    }
    utilization = flops.mfu(self.flops_per_step, step_seconds, self.num_devices, self.peak)
    if utilization is not None:
      interval['mfu'] = utilization
    self.intervals.append(interval)
    return interval

  def medians(self) -> dict[str, float | None]:
    """Median of each scalar over the recorded intervals (None before any)."""
    keys = ('step_time_s', 'examples_per_sec', 'tflops_per_device', 'input_wait_fraction', 'mfu')
    return {k: statistics.median(i[k] for i in self.intervals)
            if self.intervals and k in self.intervals[0] else None for k in keys}
