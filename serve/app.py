"""The FastAPI application: TF Serving's REST API, KServe v2 health, metrics, auth and limits.

  POST /v1/models/{name}:predict    {"instances": [...]} or {"inputs": ...}
  POST /v1/models/{name}:generate   causal LMs: {"prompt", "max_tokens", "temperature",
                                    "top_k", "top_p", "seed", "stream"} (stream: server-sent
                                    events, one per token, then the whole text)
  GET  /v1/models/{name}            version status (TF Serving's JSON)
  GET  /v1/models/{name}/metadata   signature: inputs and outputs, dtypes, shapes
  GET  /v2/health/live, /v2/health/ready   (exempt from API keys; ready after warm-up)
  GET  /v2/models/{name}, /v2/models/{name}/ready, POST /v2/models/{name}/infer
                                    the Open Inference Protocol (KServe v2) on the same model
  GET  /metrics                     Prometheus text format
  GET  /                            a demo page: draw or upload a digit, type text or a prompt

Every error is {"error": "..."} with a 4xx code (5xx only for the server's own state: still
loading, failed to load, queue full). The model loads and compiles on a thread after the
server starts listening, so liveness answers at once and readiness turns true when every
bucket is compiled. With `poll_seconds`, a newer version (a newer checkpoint of a workdir, or
a new DIR/<version>/) is loaded and compiled beside the serving one, then swapped in between
batches: no request is dropped or waits on a compile. On SIGTERM readiness turns false
first; after `drain_seconds` the server stops accepting connections and answers every
request it already accepted.
"""

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import ml_collections
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from core.errors import KilnError
from serve import batching, codec, generation, model as model_lib
from serve.metrics import Metrics

logger = logging.getLogger('kiln.serve')
access_logger = logging.getLogger('kiln.access')  # One JSON line per request.

SETTINGS_ENV = 'KILN_SERVE_SETTINGS'  # JSON Settings for worker processes (--workers > 1).
API_KEYS_ENV = 'KILN_API_KEYS'  # Comma-separated keys, when no keys file is given.
HEALTH_PATHS = ('/v2/health/live', '/v2/health/ready')  # Never need a key (probes).
DEMO_PAGE = os.path.join(os.path.dirname(__file__), 'static', 'index.html')
PUBLIC_PATHS = (*HEALTH_PATHS, '/')  # The demo page holds no data: it asks for a key to call.
MAX_GENERATE_TOKENS = 4096


@dataclasses.dataclass
class Settings:
  """Everything a server process needs (JSON-serialisable: worker processes read it)."""
  path: str  # A trained workdir, or a jax export folder.
  name: str = ''  # The model's name in URLs; '' = the folder's base name.
  max_batch_size: int = 32  # Largest compiled bucket, and most examples in one request.
  batch_timeout_ms: float = 0.0  # How long a batch waits for more after its first (0: none).
  batching: bool = True  # False: every request runs alone (the baseline).
  batch_threads: int = 2  # Batches computing at once (one computes while the next forms).
  max_queue: int = 1024  # Examples queued or running before requests are refused (503).
  api_keys: tuple[str, ...] = ()  # Accepted keys; empty = no auth (the server binds loopback).
  max_body_bytes: int = 8 << 20  # Larger request bodies are refused (413).
  drain_seconds: float = 0.0  # After SIGTERM: not ready, still serving, this long.
  access_log: bool = True  # One JSON line per request on the 'kiln.access' logger.
  poll_seconds: float = 0.0  # How often to look for a newer version (0: never).
  defaults_json: str = ''  # configs/base.py's config as JSON (sections older runs lack).

  @property
  def model_name(self) -> str:
    return self.name or os.path.basename(os.path.normpath(self.path))

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> 'Settings':
    values = json.loads(text)
    values['api_keys'] = tuple(values.get('api_keys', ()))
    return cls(**values)


def read_api_keys(path: str | None) -> tuple[str, ...]:
  """Keys from a file (one per line; blank lines and # comments skipped) or, without a file,
  from $KILN_API_KEYS (comma-separated)."""
  if path:
    try:
      with open(path) as f:
        lines = f.read().splitlines()
    except OSError as e:
      raise KilnError(f'cannot read --api_keys_file={path}: {e.strerror}') from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.startswith('#'))
    if not keys:
      raise KilnError(f'--api_keys_file={path} holds no keys (one per line)')
    return keys
  return tuple(k.strip() for k in os.environ.get(API_KEYS_ENV, '').split(',') if k.strip())


class _State:
  """What the routes share: the model once loaded, the batcher, readiness."""

  def __init__(self, settings: Settings, metrics: Metrics):
    self.settings, self.metrics = settings, metrics
    self.model: model_lib.ServedModel | None = None
    self.batcher: batching.Batcher | None = None
    self.compiled = False
    self.draining = False
    self.failed: str | None = None

  @property
  def ready(self) -> bool:
    return self.compiled and not self.draining and self.failed is None


def _defaults(settings: Settings) -> ml_collections.ConfigDict | None:
  if not settings.defaults_json:
    return None
  return ml_collections.ConfigDict(json.loads(settings.defaults_json))


def _error(status: int, message: str, headers: dict | None = None) -> Response:
  return Response(codec.dumps({'error': message}), status, headers=headers,
                  media_type='application/json')


def _json(payload: Any, status: int = 200) -> Response:
  return Response(codec.dumps(payload), status, media_type='application/json')


def _route(path: str) -> str:
  """A fixed label per endpoint (paths carry model names: unbounded label values)."""
  if path.startswith('/v1/models/'):
    for suffix in (':predict', ':generate', '/metadata'):
      if path.endswith(suffix):
        return suffix.strip(':/')
    return 'status'
  if path.startswith('/v2/models/'):
    for suffix in ('/infer', '/ready'):
      if path.endswith(suffix):
        return 'v2_' + suffix.strip('/')
    return 'v2_metadata'
  if path == '/':
    return 'demo'
  if path in HEALTH_PATHS or path == '/metrics':
    return path.rsplit('/', 1)[-1]
  return 'other'


class _Guard:
  """ASGI middleware: metrics for every answer, API keys, and the body size limit (the body
  is read here, at most max_body_bytes of it, and handed on)."""

  def __init__(self, app, state: _State):
    self.app, self.state = app, state

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    start, status, sizes = time.perf_counter(), [500], [0, 0]  # sizes: bytes in, out.

    async def send_and_record(message):
      if message['type'] == 'http.response.start':
        status[0] = message['status']
      elif message['type'] == 'http.response.body':
        sizes[1] += len(message.get('body', b''))
      await send(message)

    try:
      denied = self._deny(scope)
      if denied is None:
        body = await self._read_body(scope, receive)
        if isinstance(body, Response):
          denied = body
        else:
          sizes[0] = len(body)
      if denied is not None:
        await denied(scope, receive, send_and_record)
        return

      async def replay():
        nonlocal body
        chunk, body = body, None
        if chunk is None:
          return await receive()  # After the body: disconnect notices.
        return {'type': 'http.request', 'body': chunk, 'more_body': False}
      await self.app(scope, replay, send_and_record)
    finally:
      seconds = time.perf_counter() - start
      route = _route(scope['path'])
      self.state.metrics.observe(route, status[0], seconds)
      if self.state.settings.access_log:
        client = scope.get('client') or ('', 0)
        access_logger.info(json.dumps({
            'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'client': client[0],
            'method': scope['method'], 'path': scope['path'], 'route': route,
            'status': status[0], 'ms': round(seconds * 1000, 3), 'bytes_in': sizes[0],
            'bytes_out': sizes[1]}))

  def _deny(self, scope) -> Response | None:
    keys = self.state.settings.api_keys
    if not keys or scope['path'] in PUBLIC_PATHS:
      return None
    headers = {k.decode('latin-1').lower(): v.decode('latin-1') for k, v in scope['headers']}
    given = headers.get('x-api-key', '')
    auth = headers.get('authorization', '')
    if not given and auth.lower().startswith('bearer '):
      given = auth[7:].strip()
    if given and any(hmac.compare_digest(given.encode(), key.encode()) for key in keys):
      return None
    return _error(401, 'missing or wrong API key: send "Authorization: Bearer <key>" or '
                  '"X-API-Key: <key>"' if not given else 'wrong API key',
                  {'WWW-Authenticate': 'Bearer'})

  async def _read_body(self, scope, receive) -> bytes | Response:
    limit = self.state.settings.max_body_bytes
    headers = dict(scope['headers'])
    length = headers.get(b'content-length')
    if length is not None and (not length.isdigit() or int(length) > limit):
      return _error(413, f'body of {length.decode("latin-1")} bytes is over the limit of '
                    f'{limit} bytes')
    chunks, size = [], 0
    while True:
      message = await receive()
      if message['type'] == 'http.disconnect':
        break
      chunk = message.get('body', b'')
      size += len(chunk)
      if size > limit:
        return _error(413, f'body is over the limit of {limit} bytes')
      chunks.append(chunk)
      if not message.get('more_body', False):
        break
    return b''.join(chunks)


def _metadata(model: model_lib.ServedModel) -> dict:
  """TF Serving's GetModelMetadata JSON (signature_def), plus Kiln's task and preprocessing."""
  def tensor(name, shape, dtype):
    dt = {'float32': 'DT_FLOAT', 'int32': 'DT_INT32', 'int64': 'DT_INT64', 'float16': 'DT_HALF',
          'bfloat16': 'DT_BFLOAT16', 'bool': 'DT_BOOL'}.get(np.dtype(dtype).name,
                                                          np.dtype(dtype).name)
    return {'dtype': dt, 'name': name, 'tensor_shape': {
        'dim': [{'size': '-1', 'name': ''}, *({'size': str(d), 'name': ''} for d in shape)],
        'unknown_rank': False}}
  return {
      'model_spec': {'name': model.name, 'signature_name': '', 'version': str(model.version)},
      'metadata': {'signature_def': {'signature_def': {'serving_default': {
          'inputs': {k: tensor(k, s, d) for k, (s, d) in model.inputs.items()},
          'outputs': {k: tensor(k, s, d) for k, (s, d) in model.outputs.items()},
          'method_name': 'tensorflow/serving/predict'}}}},
      'kiln': {'task': model.task, 'preprocessing': model.preprocessing,
               'max_batch_size': model.max_batch_size, 'buckets': list(model.buckets),
               'label_names': list(model.label_names) if model.label_names else None,
               'text_inputs': codec.text_inputs(model), 'generate': generation.supports(model),
               'wav_inputs': codec.wav_inputs(model),
               'sample_rate': model.audio_spec.sample_rate if model.audio_spec else None},
  }


def create_app(settings: Settings, model: model_lib.ServedModel | None = None) -> FastAPI:
  """The app for `settings`; `model` (compiled or not) skips loading (tests, notebooks)."""
  metrics = Metrics(settings.max_batch_size)
  state = _State(settings, metrics)

  def load_and_compile():
    try:
      served = model
      if served is None:
        served = model_lib.load(settings.path, settings.model_name, settings.max_batch_size,
                                _defaults(settings))
      state.model = served
      if not served.ready:
        served.compile()
      state.compiled = True
      metrics.ready.set(1)
      logger.info('Serving %s version %d (%s): ready, buckets %s', served.name, served.version,
                  served.task, list(served.buckets))
    except Exception as e:  # noqa: BLE001  Reported by liveness; the process stays up to say so.
      state.failed = str(e) if isinstance(e, KilnError) else f'{type(e).__name__}: {e}'
      logger.error('error: the model did not load: %s', state.failed, exc_info=not isinstance(
          e, KilnError))

  def run(inputs):
    return state.model.run(inputs)

  stop_polling = threading.Event()

  def poll():
    """Swaps in newer versions as they appear; a version that fails to load is retried at
    the next poll (it may still be being written) and the current one keeps serving."""
    while not stop_polling.wait(settings.poll_seconds):
      if not state.compiled:
        continue
      try:
        latest = model_lib.latest_version(settings.path)
        if latest is None or latest == state.model.version:
          continue
        logger.info('Loading version %d of %s', latest, settings.model_name)
        newer = model_lib.load(settings.path, settings.model_name, settings.max_batch_size,
                               _defaults(settings))
        newer.compile()
        previous, state.model = state.model, newer  # The next batch runs the new version.
        logger.info('Serving version %d of %s (was %d)', newer.version, newer.name,
                    previous.version)
      except Exception as e:  # noqa: BLE001  The serving version stays.
        logger.warning('A newer version of %s did not load (%s); still serving version %d',
                       settings.model_name, e, state.model.version)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    state.batcher = batching.Batcher(
        run, settings.max_batch_size, settings.batch_timeout_ms / 1000, settings.max_queue,
        settings.batching, on_batch=metrics.batch_size.observe, on_depth=metrics.queue_depth.set,
        batch_threads=settings.batch_threads)
    state.batcher.start()
    _hook_sigterm(state)
    loader = threading.Thread(target=load_and_compile, name='kiln-load', daemon=True)
    loader.start()
    if settings.poll_seconds > 0:
      threading.Thread(target=poll, name='kiln-poll', daemon=True).start()
    yield
    stop_polling.set()
    state.draining = True
    metrics.ready.set(0)
    await state.batcher.close()

  app = FastAPI(title='Kiln model server', lifespan=lifespan, docs_url=None, redoc_url=None,
                openapi_url=None)
  app.state.kiln = state

  @app.exception_handler(codec.RequestError)
  async def request_error(request, exc: codec.RequestError):
    return _error(exc.status, exc.message)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request, exc: StarletteHTTPException):
    return _error(exc.status_code, str(exc.detail), getattr(exc, 'headers', None))

  @app.exception_handler(RequestValidationError)  # FastAPI's own echoes the body back.
  async def validation_error(request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    where = '.'.join(str(p) for p in first.get('loc', ()))
    return _error(400, f"{where or 'request'}: {first.get('msg', 'invalid')}")

  @app.exception_handler(batching.QueueFull)
  async def queue_full(request, exc: batching.QueueFull):
    return _error(503, f'server busy: {exc}; retry shortly', {'Retry-After': '1'})

  @app.exception_handler(Exception)
  async def internal_error(request, exc: Exception):
    logger.error('error answering %s: %s', request.url.path, exc, exc_info=exc)
    return _error(500, f'internal error: {type(exc).__name__}')

  def known(name: str) -> None:
    """404 for a model name this server does not serve (status and readiness included)."""
    if name != settings.model_name:
      raise codec.RequestError(404, f"no model '{name}' here: this server has "
                               f"'{settings.model_name}'")

  def served(name: str) -> model_lib.ServedModel:
    known(name)
    if state.failed:
      raise codec.RequestError(503, f'the model failed to load: {state.failed}')
    if not state.compiled:
      raise codec.RequestError(503, 'the model is still loading: wait for /v2/health/ready')
    return state.model

  with open(DEMO_PAGE) as f:  # Read once: the page is the same for every request.
    demo_page = f.read().replace(
        '"{{MODEL_NAME}}"', json.dumps(settings.model_name).replace('<', '\\u003c'))

  @app.get('/')
  async def demo():
    return Response(demo_page, media_type='text/html')

  @app.get('/v2/health/live')
  async def live():
    if state.failed:
      return _error(503, f'the model failed to load: {state.failed}')
    return _json({'live': True})

  @app.get('/v2/health/ready')
  async def ready():
    return _json({'ready': state.ready}, 200 if state.ready else 503)

  @app.get('/metrics')
  async def prometheus():
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)

  @app.get('/v1/models/{name}')
  async def status(name: str):
    known(name)
    version = str(state.model.version) if state.model else '0'
    if state.failed:
      code, message, stage = 'UNKNOWN', state.failed, 'END'
    else:
      code, message, stage = 'OK', '', 'AVAILABLE' if state.compiled else 'LOADING'
    return _json({'model_version_status': [{'version': version, 'state': stage, 'status': {
        'error_code': code, 'error_message': message}}]})

  @app.get('/v1/models/{name}/metadata')
  async def metadata(name: str):
    return _json(_metadata(served(name)))

  # The two routes under load are plain Starlette endpoints: FastAPI's parameter solving
  # costs as much per request as parsing the body.
  async def predict(request: Request):
    model = served(request.path_params['name'])
    payload = codec.loads(await request.body())
    inputs, columnar = codec.parse_predict(payload, model)
    outputs = await state.batcher.submit(inputs)
    return _json(codec.format_outputs(model, outputs, columnar))

  @app.get('/v2/models/{name}')
  async def v2_metadata(name: str):
    model = served(name)
    def tensors(specs):
      return [{'name': k, 'datatype': codec.v2_datatype(d), 'shape': [-1, *s]}
              for k, (s, d) in specs.items()]
    return _json({'name': model.name, 'versions': [str(model.version)], 'platform': 'jax',
                  'inputs': tensors(model.inputs), 'outputs': tensors(model.outputs)})

  @app.get('/v2/models/{name}/ready')
  async def v2_ready(name: str):
    known(name)
    return _json({'name': name, 'ready': state.ready}, 200 if state.ready else 503)

  async def v2_infer(request: Request):
    model = served(request.path_params['name'])
    v2 = codec.read_v2(await request.body(), request.headers.get(codec.BINARY_HEADER), model)
    outputs = await state.batcher.submit(v2.inputs)
    body, header_length = codec.format_v2(model, outputs, v2)
    if header_length is None:
      return Response(body, media_type='application/json')
    return Response(body, media_type='application/octet-stream',
                    headers={'Inference-Header-Content-Length': str(header_length)})

  app.router.add_route('/v1/models/{name}:predict', predict, methods=['POST'])
  app.router.add_route('/v2/models/{name}/infer', v2_infer, methods=['POST'])
  app.router.routes[:0] = [app.router.routes.pop(), app.router.routes.pop()]  # Matched first.

  @app.post('/v1/models/{name}:generate')
  async def generate(name: str, request: Request):
    model = served(name)
    if not generation.supports(model):
      raise codec.RequestError(400, f"model '{name}' ({model.task}) does not generate text: "
                               'use :predict')
    payload = codec.loads(await request.body())
    if not isinstance(payload, dict):
      raise codec.RequestError(400, 'body: expected a JSON object with "prompt"')
    unknown = set(payload) - {'prompt', 'max_tokens', 'temperature', 'top_k', 'top_p', 'seed',
                              'stream'}
    if unknown:
      raise codec.RequestError(400, f"body: unknown field '{sorted(unknown)[0]}'")
    prompt = payload.get('prompt')
    if not isinstance(prompt, str):
      raise codec.RequestError(400, 'prompt: expected a string')
    vocab = model.tokenizer.vocab_size
    args = dict(
        max_tokens=int(codec.finite(payload.get('max_tokens', 100), 'max_tokens', 1,
                                    MAX_GENERATE_TOKENS)),
        temperature=float(codec.finite(payload.get('temperature', 1.0), 'temperature', 0, 100)),
        top_k=int(codec.finite(payload.get('top_k', 0), 'top_k', 0, vocab)),
        top_p=float(codec.finite(payload.get('top_p', 1.0), 'top_p', 1e-6, 1.0)),
        seed=int(codec.finite(payload.get('seed', 0), 'seed', 0, 2**31 - 1)))
    for field in ('max_tokens', 'top_k', 'seed'):
      if field in payload and payload[field] != int(payload[field]):
        raise codec.RequestError(400, f'{field}: expected an integer')
    stream = payload.get('stream', False)
    if not isinstance(stream, bool):
      raise codec.RequestError(400, 'stream: expected true or false')
    loop = asyncio.get_running_loop()
    if not stream:
      return _json(await loop.run_in_executor(None, lambda: generation.generate(
          model, prompt, **args)))
    generation.encode_prompt(model, prompt)  # A bad prompt is a 400, before the stream starts.
    tokens = generation.tokens(model, prompt, **args)

    async def events():  # Server-sent events: one per token, then the whole text.
      done, generated = object(), []
      while (token := await loop.run_in_executor(None, next, tokens, done)) is not done:
        generated.append(token)
        yield f"data: {json.dumps({'token': token, 'text': model.tokenizer.decode([token])})}\n\n"
      completion = model.tokenizer.decode(generated)
      final = {'done': True, 'text': prompt + completion, 'completion': completion,
               'tokens': generated}
      yield f'data: {json.dumps(final)}\n\n'
    return StreamingResponse(events(), media_type='text/event-stream',
                             headers={'Cache-Control': 'no-cache'})

  app.add_middleware(_Guard, state=state)
  return app


def _hook_sigterm(state: _State) -> None:
  """SIGTERM: readiness false at once; the server's own handler (uvicorn's graceful stop)
  runs `drain_seconds` later, so that a load balancer stops sending first."""
  if threading.current_thread() is not threading.main_thread():
    return  # Signals reach the main thread only (an in-process test server has none).
  previous = signal.getsignal(signal.SIGTERM)

  def on_sigterm(sig, frame):
    state.draining = True
    state.metrics.ready.set(0)
    logger.info('SIGTERM: not ready; stopping in %.1f s after the in-flight requests',
                state.settings.drain_seconds)
    if callable(previous):
      if state.settings.drain_seconds > 0:
        threading.Timer(state.settings.drain_seconds, previous, (sig, frame)).start()
      else:
        previous(sig, frame)
  signal.signal(signal.SIGTERM, on_sigterm)


def configure_logging() -> None:
  """The server's lines with a time stamp; access lines as bare JSON (one object per line)."""
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(message)s')
  if not access_logger.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('%(message)s'))
    access_logger.addHandler(handler)
    access_logger.propagate = False


def create_app_from_env() -> FastAPI:
  """uvicorn's factory for worker processes: Settings from $KILN_SERVE_SETTINGS."""
  configure_logging()
  return create_app(Settings.from_json(os.environ[SETTINGS_ENV]))
