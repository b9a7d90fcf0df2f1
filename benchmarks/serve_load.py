"""Load test of serve.py: N concurrent clients for T seconds on real held-out inputs, with
dynamic batching on and off and with 1 or K server processes.

  .venv/bin/python benchmarks/serve_load.py --workdir=runs/mnist [--clients=16] [--seconds=20]
      [--setups=batched,unbatched,batched:2] [--max_batch_size=32] [--batch_timeout_ms=0]
      [--json=serve_load.json]

Each setup starts its own `serve.py` (a setup is `batched` or `unbatched`, with `:K` for K
worker processes), waits for readiness, times lone requests one after another (the latency a
single client sees), then drives the clients: each sends one held-out example per request
and checks the answer's class against the model's own (a wrong class counts as an error).
Prints requests/s, p50/p95/p99 latency, errors and the mean batch size from the server's own
/metrics (one worker's, with K > 1). The clients share the host with the server: on a small
machine they take part of its CPU, so compare setups, not absolute figures.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import backends  # noqa: E402  First: before JAX or TF start threads.

backends.configure_host()

import httpx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from loop import trained as trained_lib  # noqa: E402

KEY = 'serve-load-benchmark'


def held_out(workdir: str, count: int) -> tuple[str, list[bytes], np.ndarray]:
  """(model name, one request body per held-out example, the model's own classes)."""
  trained = trained_lib.load(workdir, base.get_base_config())
  bodies, classes = [], []
  predict = jax.jit(trained_lib.predict_fn(trained.model, trained.serving))
  for batch in trained.exp.task.eval_batches(trained.exp.host_eval_batch):
    inputs = trained.serving.inputs_from_batch(batch)
    real = np.asarray(batch['mask']) > 0
    own = np.asarray(trained.serving.predicted_labels(jax.device_get(predict(inputs))))
    for i in np.flatnonzero(real):
      bodies.append(json.dumps({'instances': [{k: v[i].tolist() for k, v in inputs.items()}]}
                               ).encode())
      classes.append(own[i])
    if len(bodies) >= count:
      break
  return os.path.basename(os.path.normpath(workdir)), bodies[:count], np.asarray(classes[:count])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_server(workdir: str, workers: int, batching: bool, args) -> tuple[subprocess.Popen, str]:
  port = _free_port()
  env = dict(os.environ, KILN_API_KEYS=KEY)
  process = subprocess.Popen(
      [sys.executable, os.path.join(REPO_ROOT, 'serve.py'), f'--workdir={workdir}',
       f'--port={port}', '--host=127.0.0.1', f'--workers={workers}',
       f'--batching={str(batching).lower()}', f'--max_batch_size={args.max_batch_size}',
       f'--batch_timeout_ms={args.batch_timeout_ms}', f'--max_queue={args.max_queue}'],
      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f'http://127.0.0.1:{port}'
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise SystemExit(f'error: serve.py exited with {process.returncode} (run it by hand to '
                       'see why)')
    try:  # Each worker answers for itself: wait for many ready answers on fresh connections.
      if all(httpx.get(url + '/v2/health/ready', timeout=2).status_code == 200
             for _ in range(10 * workers)):
        return process, url
    except httpx.TransportError:
      pass
    time.sleep(0.5)
  process.kill()
  raise SystemExit('error: serve.py was not ready within 300 s')


def _batch_stats(url: str) -> tuple[float, float]:
  text = httpx.get(url + '/metrics', headers={'X-API-Key': KEY}).text
  values = {}
  for line in text.splitlines():
    if line.startswith(('kiln_batch_size_sum ', 'kiln_batch_size_count ')):
      name, value = line.split()
      values[name] = float(value)
  return values.get('kiln_batch_size_sum', 0.0), values.get('kiln_batch_size_count', 0.0)


class _Connection:
  """A minimal HTTP/1.1 keep-alive client on asyncio streams: a load generator in Python must
  spend less CPU per request than the server it measures (httpx costs about as much)."""

  def __init__(self, url: str):
    host, port = url.removeprefix('http://').split(':')
    self.host, self.port = host, int(port)
    self.reader = self.writer = None

  async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
    if self.writer is None:
      self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
    self.writer.write(f'POST {path} HTTP/1.1\r\nHost: {self.host}\r\nX-API-Key: {KEY}\r\n'
                      f'Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n'
                      .encode() + body)
    head = await self.reader.readuntil(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    status = int(lines[0].split()[1])
    length = next(int(line.split(':')[1]) for line in lines
                  if line.lower().startswith('content-length:'))
    return status, await self.reader.readexactly(length)

  async def close(self):
    if self.writer is not None:
      self.writer.close()


async def drive(url: str, name: str, bodies: list[bytes], classes: np.ndarray, clients: int,
                seconds: float) -> dict:
  """`clients` concurrent loops for `seconds`, each on its own keep-alive connection:
  latencies of correct answers, and the error count (a wrong class is an error)."""
  path = f'/v1/models/{name}:predict'
  latencies, errors, counter = [], [0], [0]
  end = time.perf_counter() + seconds

  async def client():
    connection = _Connection(url)
    try:
      while time.perf_counter() < end:
        i = counter[0] % len(bodies)
        counter[0] += 1
        start = time.perf_counter()
        try:
          status, body = await connection.post(path, bodies[i])
          ok = status == 200 and json.loads(body)['predictions'][0]['classes'] == int(classes[i])
        except (OSError, asyncio.IncompleteReadError, KeyError, ValueError, StopIteration):
          ok = False
          await connection.close()
          connection = _Connection(url)
        if ok:
          latencies.append(time.perf_counter() - start)
        else:
          errors[0] += 1
    finally:
      await connection.close()
  began = time.perf_counter()
  await asyncio.gather(*[client() for _ in range(clients)])
  wall = time.perf_counter() - began
  return {'requests': len(latencies) + errors[0], 'errors': errors[0],
          'requests_per_s': (len(latencies) + errors[0]) / wall,
          **_percentiles(latencies)}


def _percentiles(latencies: list[float]) -> dict:
  ms = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
  return {f'p{q}_ms': float(np.percentile(ms, q)) for q in (50, 95, 99)}


def lone(url: str, name: str, bodies: list[bytes], classes: np.ndarray, count: int) -> float:
  """p50 latency (ms) of requests sent one after another by one client."""
  return asyncio.run(drive(url, name, bodies[:count], classes[:count], 1, 2.0))['p50_ms']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='A trained run (or a jax export).')
  parser.add_argument('--clients', type=int, default=16)
  parser.add_argument('--seconds', type=float, default=20.0)
  parser.add_argument('--setups', default='batched,unbatched',
                      help='Comma-separated: batched or unbatched, optionally :K workers.')
  parser.add_argument('--max_batch_size', type=int, default=32)
  parser.add_argument('--batch_timeout_ms', type=float, default=0.0)
  parser.add_argument('--max_queue', type=int, default=4096)
  parser.add_argument('--examples', type=int, default=1000, help='Held-out examples cycled.')
  parser.add_argument('--json', default='', help='Also write the rows here.')
  args = parser.parse_args()

  name, bodies, classes = held_out(args.workdir, args.examples)
  print(f'{len(bodies)} held-out examples of {name}; {args.clients} clients for '
        f'{args.seconds:g} s per setup')
  rows = []
  for setup in args.setups.split(','):
    mode, _, workers = setup.partition(':')
    if mode not in ('batched', 'unbatched'):
      raise SystemExit(f'error: setup {setup!r}: use batched or unbatched, optionally :K')
    workers = int(workers or 1)
    process, url = start_server(args.workdir, workers, mode == 'batched', args)
    try:
      lone_ms = lone(url, name, bodies, classes, 50)
      before = _batch_stats(url)
      row = asyncio.run(drive(url, name, bodies, classes, args.clients, args.seconds))
      after = _batch_stats(url)
      batches = after[1] - before[1]
      row.update(setup=setup, workers=workers, batching=mode == 'batched', lone_p50_ms=lone_ms,
                 mean_batch=(after[0] - before[0]) / batches if batches else float('nan'))
    finally:
      process.send_signal(signal.SIGTERM)
      try:
        process.wait(60)
      except subprocess.TimeoutExpired:
        process.kill()
    rows.append(row)
    print(f"{setup:>14}: {row['requests_per_s']:8.1f} req/s, p50 {row['p50_ms']:6.1f} ms, "
          f"p95 {row['p95_ms']:6.1f} ms, p99 {row['p99_ms']:6.1f} ms, {row['errors']} errors of "
          f"{row['requests']}, mean batch {row['mean_batch']:.1f} (lone request p50 "
          f"{lone_ms:.1f} ms)", flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
