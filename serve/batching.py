"""Dynamic batching: requests wait in a bounded asyncio queue and run together, up to
max_batch_size examples or batch_timeout_ms after the first of them arrived (TF Serving's and
Triton's two knobs), as one call of the compiled bucket that fits.

Up to `batch_threads` batches run at once, each on a thread of its own (TF Serving's
num_batch_threads), so the event loop keeps accepting requests while the model computes; those
that arrive meanwhile make up the next batch. With one thread a batch of requests waits for
the one before it while a core may idle (XLA runs a small batch on one core); with two, one
batch computes while the next is formed, and both cores work. The queue is
bounded in examples: a request that would overflow it is refused at once (QueueFull -> 503
with Retry-After) rather than left to time out.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable

import numpy as np


class QueueFull(Exception):
  """The queue holds max_queue examples already: the caller should retry later."""


@dataclasses.dataclass
class _Request:
  inputs: dict[str, np.ndarray]
  size: int
  future: asyncio.Future
  enqueued: float


class Batcher:
  """Merges concurrent `submit` calls into batches for `run` (numpy dict -> numpy dict).

  With `enabled=False` every request runs alone as it arrives (the baseline to compare
  batching against), still bounded by `max_queue` requests' examples in flight."""

  def __init__(self, run: Callable[[dict], dict], max_batch_size: int, timeout_s: float,
               max_queue: int, enabled: bool = True,
               on_batch: Callable[[int], None] | None = None,
               on_depth: Callable[[int], None] | None = None, batch_threads: int = 1):
    self._run, self.max_batch_size, self.timeout_s = run, max_batch_size, timeout_s
    self.max_queue, self.enabled, self.batch_threads = max_queue, enabled, batch_threads
    self._on_batch = on_batch or (lambda size: None)
    self._on_depth = on_depth or (lambda depth: None)
    self._pending: collections.deque[_Request] = collections.deque()
    self._queued = 0  # Examples waiting or running.
    self._wakeup = asyncio.Event()
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=batch_threads if enabled else 4, thread_name_prefix='kiln-batch')
    self._task: asyncio.Task | None = None
    self._running: set[asyncio.Task] = set()  # Batches computing (referenced until done).

  @property
  def depth(self) -> int:
    return self._queued

  def start(self) -> None:
    if self.enabled and self._task is None:
      self._task = asyncio.get_running_loop().create_task(self._serve())

  async def submit(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    size = len(next(iter(inputs.values())))
    if self._queued + size > self.max_queue:
      raise QueueFull(f'{self._queued} examples are queued (max_queue={self.max_queue})')
    self._queued += size
    self._on_depth(self._queued)
    try:
      loop = asyncio.get_running_loop()
      if not self.enabled:
        self._on_batch(size)
        return await loop.run_in_executor(self._executor, self._run, inputs)
      request = _Request(inputs, size, loop.create_future(), time.monotonic())
      self._pending.append(request)
      self._wakeup.set()
      return await request.future
    finally:
      self._queued -= size
      self._on_depth(self._queued)

  async def _next_batch(self) -> list[_Request]:
    while not self._pending:
      self._wakeup.clear()
      await self._wakeup.wait()
    loop = asyncio.get_running_loop()
    first = self._pending.popleft()
    batch, size = [first], first.size
    deadline = loop.time() + self.timeout_s
    while size < self.max_batch_size:
      if self._pending:
        if size + self._pending[0].size > self.max_batch_size:
          break  # It starts the next batch.
        request = self._pending.popleft()
        batch.append(request)
        size += request.size
        continue
      remaining = deadline - loop.time()
      if remaining <= 0:
        break
      self._wakeup.clear()
      try:
        await asyncio.wait_for(self._wakeup.wait(), remaining)
      except TimeoutError:
        break
    return batch

  async def _serve(self) -> None:
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(self.batch_threads)
    while True:
      await slots.acquire()  # A thread is free: the next batch forms from what is queued.
      batch = [r for r in await self._next_batch() if not r.future.done()]  # Skips cancelled.
      if not batch:
        slots.release()
        continue
      task = loop.create_task(self._run_batch(batch))
      self._running.add(task)
      task.add_done_callback(self._running.discard)
      task.add_done_callback(lambda _: slots.release())

  async def _run_batch(self, batch: list[_Request]) -> None:
    names = list(batch[0].inputs)
    inputs = {name: np.concatenate([r.inputs[name] for r in batch]) if len(batch) > 1
              else batch[0].inputs[name] for name in names}
    self._on_batch(sum(r.size for r in batch))
    try:
      outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._run,
                                                                 inputs)
    except Exception as e:  # The model failed: every request of the batch hears why.
      for r in batch:
        if not r.future.done():
          r.future.set_exception(e)
      return
    offset = 0
    for r in batch:
      if not r.future.done():
        r.future.set_result({k: v[offset:offset + r.size] for k, v in outputs.items()})
      offset += r.size

  async def close(self) -> None:
    """Stops after the requests already accepted have their answers."""
    while self._queued:
      await asyncio.sleep(0.01)
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass
      self._task = None
    self._executor.shutdown(wait=True)
