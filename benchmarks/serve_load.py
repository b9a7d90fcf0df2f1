"""Load test of serve.py: N concurrent clients on real held-out inputs, with dynamic batching on
and off and with 1 or K server processes, every setup measured in the same run.

  .venv/bin/python benchmarks/serve_load.py --workdir=runs/mnist [--clients=16] [--seconds=20]
      [--rounds=4] [--setups=batched,unbatched,batched:2] [--format=json|binary]
      [--max_batch_size=32] [--batch_timeout_ms=0] [--json=serve_load.json]

Every setup gets its own `serve.py` (a setup is `batched` or `unbatched`, with `:K` for K worker
processes), all started first; then `--rounds` rounds drive each setup in turn for
seconds/rounds, so that a noisy host (other jobs come and go) weighs on every setup alike.
Each client sends one held-out example per request on its own keep-alive connection and checks
the answer's class against the model's own (a wrong class counts as an error). `--format=json`
sends TF Serving's `:predict` rows of numbers; `--format=binary` sends KServe v2 `/infer` with
the binary tensor extension (raw float32 after a JSON header) and asks for the class only.

Prints per setup: requests/s, p50/p95/p99 latency, errors, the mean batch size (the server's
/metrics; one worker's with K > 1), the lone-request latency (one client, one request at a
time), and CPU milliseconds per request of the server's processes and of this load generator
(they share the host: on a small machine the clients take part of the server's CPU). Then the
model alone: its compiled buckets timed in this process, per image at batch 1 and at the
largest batch, whose ratio bounds what batching can gain on this host, and the latency 16
clients must see at that rate (Little's law: latency = clients / throughput).
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

backends.configure_host(may_restart=__name__ == '__main__')

import httpx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from loop import trained as trained_lib  # noqa: E402
from serve import codec, model as model_lib  # noqa: E402

KEY = 'serve-load-benchmark'


class Load:
  """What the clients send: one request body per held-out example, and the class the model
  itself gives each."""

  def __init__(self, trained: trained_lib.Trained, count: int, fmt: str):
    self.name = model_name(trained.workdir)
    self.format = fmt
    self.path = (f'/v1/models/{self.name}:predict' if fmt == 'json' else
                 f'/v2/models/{self.name}/infer')
    self.content_type = 'application/json' if fmt == 'json' else 'application/octet-stream'
    self.bodies, self.header_lengths, classes = [], [], []
    predict = jax.jit(trained_lib.predict_fn(trained.model, trained.serving))
    for batch in trained.exp.task.eval_batches(trained.exp.host_eval_batch):
      inputs = trained.serving.inputs_from_batch(batch)
      own = np.asarray(trained.serving.predicted_labels(jax.device_get(predict(inputs))))
      for i in np.flatnonzero(np.asarray(batch['mask']) > 0):
        self._add({k: np.asarray(v[i:i + 1]) for k, v in inputs.items()})
        classes.append(int(own[i]))
      if len(self.bodies) >= count:
        break
    self.bodies, self.header_lengths = self.bodies[:count], self.header_lengths[:count]
    self.classes = np.asarray(classes[:count])

  def _add(self, example: dict[str, np.ndarray]) -> None:
    if self.format == 'json':
      self.bodies.append(json.dumps({'instances': [{k: v[0].tolist() for k, v in
                                                    example.items()}]}).encode())
      self.header_lengths.append(None)
      return
    blobs = [np.ascontiguousarray(v, v.dtype.newbyteorder('<')).tobytes()
             for v in example.values()]
    header = json.dumps({'inputs': [
        {'name': k, 'shape': list(v.shape), 'datatype': codec.v2_datatype(v.dtype),
         'parameters': {'binary_data_size': len(blob)}}
        for (k, v), blob in zip(example.items(), blobs)], 'outputs': [{'name': 'classes'}]}
    ).encode()
    self.bodies.append(header + b''.join(blobs))
    self.header_lengths.append(len(header))

  def answered_class(self, body: bytes) -> int:
    answer = json.loads(body)
    if self.format == 'json':
      return answer['predictions'][0]['classes']
    return answer['outputs'][0]['data'][0]


def model_name(workdir: str) -> str:
  return os.path.basename(os.path.normpath(workdir))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_server(path: str, name: str, workers: int, batching: bool, args
                 ) -> tuple[subprocess.Popen, str]:
  port = _free_port()
  env = dict(os.environ, KILN_API_KEYS=KEY)
  process = subprocess.Popen(
      [sys.executable, os.path.join(REPO_ROOT, 'serve.py'), f'--workdir={path}',
       f'--name={name}', f'--port={port}', '--host=127.0.0.1', f'--workers={workers}',
       f'--batching={str(batching).lower()}', f'--max_batch_size={args.max_batch_size}',
       f'--batch_timeout_ms={args.batch_timeout_ms}', f'--max_queue={args.max_queue}',
       '--poll_seconds=0'],
      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  return process, f'http://127.0.0.1:{port}'


def wait_ready(process: subprocess.Popen, url: str, workers: int) -> None:
  deadline = time.monotonic() + 600
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise SystemExit(f'error: serve.py exited with {process.returncode} (run it by hand to '
                       'see why)')
    try:  # Each worker answers for itself: wait for many ready answers on fresh connections.
      if all(httpx.get(url + '/v2/health/ready', timeout=2).status_code == 200
             for _ in range(10 * workers)):
        return
    except httpx.TransportError:
      pass
    time.sleep(0.5)
  process.kill()
  raise SystemExit('error: serve.py was not ready within 600 s')


def _cpu_seconds(pid: int) -> float:
  """CPU time (user + system) of a process and all its descendants alive now."""
  ticks, parents = {}, {}
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
      continue
    parents[int(entry)] = int(fields[1])
    ticks[int(entry)] = int(fields[11]) + int(fields[12])
  total, frontier = 0, [pid]
  while frontier:
    current = frontier.pop()
    total += ticks.get(current, 0)
    frontier += [child for child, parent in parents.items() if parent == current]
  return total / os.sysconf('SC_CLK_TCK')


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

  async def post(self, path: str, body: bytes, content_type: str,
                 header_length: int | None) -> tuple[int, bytes]:
    if self.writer is None:
      self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
    extra = ('' if header_length is None else
             f'Inference-Header-Content-Length: {header_length}\r\n')
    self.writer.write(f'POST {path} HTTP/1.1\r\nHost: {self.host}\r\nX-API-Key: {KEY}\r\n'
                      f'Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}'
                      '\r\n'.encode() + body)
    head = await self.reader.readuntil(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    status = int(lines[0].split()[1])
    length = next(int(line.split(':')[1]) for line in lines
                  if line.lower().startswith('content-length:'))
    return status, await self.reader.readexactly(length)

  async def close(self):
    if self.writer is not None:
      self.writer.close()


async def drive(url: str, load: Load, clients: int, seconds: float, first: int = 0) -> dict:
  """`clients` concurrent loops for `seconds`, each on its own keep-alive connection: the
  latencies of correct answers, the error count (a wrong class is an error), and this
  process's CPU seconds."""
  latencies, errors, counter = [], [0], [first]
  end = time.perf_counter() + seconds

  async def client():
    connection = _Connection(url)
    try:
      while time.perf_counter() < end:
        i = counter[0] % len(load.bodies)
        counter[0] += 1
        start = time.perf_counter()
        try:
          status, body = await connection.post(load.path, load.bodies[i], load.content_type,
                                               load.header_lengths[i])
          ok = status == 200 and load.answered_class(body) == load.classes[i]
        except (OSError, asyncio.IncompleteReadError, KeyError, IndexError, ValueError,
                StopIteration):
          ok = False
          await connection.close()
          connection = _Connection(url)
        if ok:
          latencies.append(time.perf_counter() - start)
        else:
          errors[0] += 1
    finally:
      await connection.close()
  began, cpu = time.perf_counter(), time.process_time()
  await asyncio.gather(*[client() for _ in range(clients)])
  return {'latencies': latencies, 'errors': errors[0], 'wall': time.perf_counter() - began,
          'client_cpu': time.process_time() - cpu}


def _percentiles(latencies: list[float]) -> dict:
  ms = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
  return {f'p{q}_ms': float(np.percentile(ms, q)) for q in (50, 95, 99)}


def model_alone(trained: trained_lib.Trained, max_batch_size: int, repeats: int) -> dict:
  """Milliseconds per image of the served program (compiled as serve.py compiles it) at batch
  1 and at max_batch_size: the fastest of `repeats` calls, alternating (on a shared host the
  fastest call is the one least disturbed by other jobs)."""
  served = model_lib.from_trained(trained, 'alone', max_batch_size)
  served.compile()
  example = {k: np.zeros((1, *shape), dtype) for k, (shape, dtype) in served.inputs.items()}
  full = {k: np.repeat(v, max_batch_size, 0) for k, v in example.items()}
  times = {1: [], max_batch_size: []}
  for _ in range(repeats):
    for size, inputs in ((1, example), (max_batch_size, full)):
      start = time.perf_counter()
      served.run(inputs)
      times[size].append((time.perf_counter() - start) / size)
  return {f'model_ms_per_image_b{size}': 1000 * float(np.min(t)) for size, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='A trained run.')
  parser.add_argument('--serve', default='', help='What serve.py serves (default: --workdir; '
                      'e.g. a jax export of it): answers are checked against the run.')
  parser.add_argument('--clients', type=int, default=16)
  parser.add_argument('--seconds', type=float, default=20.0, help='Driving time per setup.')
  parser.add_argument('--rounds', type=int, default=4, help='Setups take turns this often.')
  parser.add_argument('--setups', default='batched,unbatched',
                      help='Comma-separated: batched or unbatched, optionally :K workers.')
  parser.add_argument('--format', choices=('json', 'binary'), default='json')
  parser.add_argument('--max_batch_size', type=int, default=32)
  parser.add_argument('--batch_timeout_ms', type=float, default=0.0)
  parser.add_argument('--max_queue', type=int, default=4096)
  parser.add_argument('--examples', type=int, default=1000, help='Held-out examples cycled.')
  parser.add_argument('--model_repeats', type=int, default=200,
                      help='Calls per batch size when timing the model alone (0: skip).')
  parser.add_argument('--json', default='', help='Also write the rows here.')
  args = parser.parse_args()

  setups = []
  for setup in args.setups.split(','):
    mode, _, workers = setup.partition(':')
    if mode not in ('batched', 'unbatched'):
      raise SystemExit(f'error: setup {setup!r}: use batched or unbatched, optionally :K')
    setups.append((setup, mode == 'batched', int(workers or 1)))
  servers = {setup: start_server(args.serve or args.workdir, model_name(args.workdir), workers,
                                batched, args)
             for setup, batched, workers in setups}  # They load while the data is read.
  rows = []
  try:
    trained = trained_lib.load(args.workdir, base.get_base_config())
    load = Load(trained, args.examples, args.format)
    for setup, _, workers in setups:
      wait_ready(*servers[setup], workers)
    print(f'{len(load.bodies)} held-out examples of {load.name} as {args.format} requests; '
          f'{args.clients} clients, {args.seconds:g} s per setup in {args.rounds} rounds',
          flush=True)
    results = {setup: [] for setup, _, _ in setups}
    lone = {setup: [] for setup, _, _ in setups}
    for round_ in range(args.rounds):
      for setup, _, _ in setups:
        process, url = servers[setup]
        lone[setup] += asyncio.run(drive(url, load, 1, 1.0, round_))['latencies']
        before, cpu = _batch_stats(url), _cpu_seconds(process.pid)
        result = asyncio.run(drive(url, load, args.clients, args.seconds / args.rounds,
                                   round_ * 97))
        result['server_cpu'] = _cpu_seconds(process.pid) - cpu
        after = _batch_stats(url)
        result['batches'] = (after[0] - before[0], after[1] - before[1])
        results[setup].append(result)
    for setup, batched, workers in setups:
      parts = results[setup]
      latencies = [x for r in parts for x in r['latencies']]
      errors = sum(r['errors'] for r in parts)
      requests = len(latencies) + errors
      wall = sum(r['wall'] for r in parts)
      examples, batches = (sum(r['batches'][i] for r in parts) for i in (0, 1))
      row = {'setup': setup, 'workers': workers, 'batching': batched, 'format': args.format,
             'requests': requests, 'errors': errors, 'requests_per_s': requests / wall,
             **_percentiles(latencies), 'lone_p50_ms': _percentiles(lone[setup])['p50_ms'],
             'mean_batch': examples / batches if batches else float('nan'),
             'server_cpu_ms': 1000 * sum(r['server_cpu'] for r in parts) / max(requests, 1),
             'client_cpu_ms': 1000 * sum(r['client_cpu'] for r in parts) / max(requests, 1),
             'rounds_requests_per_s': [(len(r['latencies']) + r['errors']) / r['wall']
                                       for r in parts]}
      rows.append(row)
      print(f"{setup:>14}: {row['requests_per_s']:8.1f} req/s, p50 {row['p50_ms']:6.1f} ms, "
            f"p95 {row['p95_ms']:6.1f} ms, p99 {row['p99_ms']:6.1f} ms, {errors} errors of "
            f"{requests}, mean batch {row['mean_batch']:.1f}, lone request p50 "
            f"{row['lone_p50_ms']:.2f} ms; CPU per request: server {row['server_cpu_ms']:.2f} "
            f"ms, clients {row['client_cpu_ms']:.2f} ms", flush=True)
  finally:
    for process, _ in servers.values():
      process.send_signal(signal.SIGTERM)
    for process, _ in servers.values():
      try:
        process.wait(60)
      except subprocess.TimeoutExpired:
        process.kill()
  by_setup = {row['setup']: row for row in rows}
  if {'batched', 'unbatched'} <= set(by_setup):
    on, off = by_setup['batched'], by_setup['unbatched']
    per_round = ', '.join(f'{a / b:.2f}' for a, b in zip(on['rounds_requests_per_s'],
                                                          off['rounds_requests_per_s']))
    print(f"batched / unbatched: {on['requests_per_s'] / off['requests_per_s']:.2f}x requests/s "
          f"(per round: {per_round}); batched p95 / lone p50: "
          f"{on['p95_ms'] / on['lone_p50_ms']:.1f}x")
  if args.model_repeats:
    alone = model_alone(trained, args.max_batch_size, args.model_repeats)
    one = alone['model_ms_per_image_b1']
    full = alone[f'model_ms_per_image_b{args.max_batch_size}']
    print(f'model alone: {one:.3f} ms per image at batch 1, {full:.3f} at batch '
          f'{args.max_batch_size}: batching can at most make it {one / full:.2f}x faster here; '
          f'{args.clients} clients at that rate wait >= {args.clients * full:.1f} ms each '
          f'(Little\'s law), {args.clients * full / one:.1f}x a lone batch-1 call')
    for row in rows:
      row.update(alone)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
