"""Host batches -> global device arrays, placed ahead of the step that needs them."""

import queue
import threading
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

_DONE = object()


def to_global(host_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each host's slice into one array sharded over the batch axes."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), host_batch)


class DevicePrefetcher:
  """Iterates global batches; a background thread places the next `size` on the devices.

  `wait_seconds` accumulates the time the consumer spent blocked on input, which
  is the input-wait that the loop reports.
  """

  def __init__(self, host_batches: Iterator, place: Callable[[dict], dict], size: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
    self._stop = threading.Event()
    self.wait_seconds = 0.0
    self._thread = threading.Thread(target=self._fill, args=(host_batches, place), daemon=True)
    self._thread.start()

  def _fill(self, host_batches, place):
    try:
      for batch in host_batches:
        item = place(batch)
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if self._stop.is_set():
          return
      self._queue.put(_DONE)
    except BaseException as e:  # Re-raised in the consumer's thread.
      self._queue.put(e)

  def __iter__(self):
    return self

  def __next__(self):
    start = time.perf_counter()
    item = self._queue.get()
    self.wait_seconds += time.perf_counter() - start
    if item is _DONE:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)
