"""Serves a trained run (or a `jax` export) over HTTP with TF Serving's REST API.

  python serve.py --workdir=runs/mnist [--name=mnist] [--port=8501] [--host=...]
      [--workers=1] [--max_batch_size=32] [--batch_timeout_ms=0] [--api_keys_file=keys.txt]

  curl -X POST localhost:8501/v1/models/mnist:predict -d '{"instances": [...]}'

--workdir is a train.py run, a `jax` export (export.py --format=jax), or a folder of numbered
versions of either (TF Serving's DIR/<version>/; the highest is served). The model is compiled
for batch sizes 1, 2, 4, ... --max_batch_size when the server starts; /v2/health/ready answers
200 once that is done. A newer checkpoint or version folder is picked up while serving
(--poll_seconds). Concurrent requests are batched dynamically.
API keys come from --api_keys_file (one per line) or $KILN_API_KEYS (comma-separated);
clients send `Authorization: Bearer <key>` or `X-API-Key: <key>`. Without keys the server
answers anyone, so it listens on 127.0.0.1 only and refuses another --host. serve/app.py
lists the endpoints.
"""

import logging
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import backends  # noqa: E402  First: before JAX or TF start threads.

backends.configure_host(may_restart=__name__ == '__main__')

from absl import app, flags  # noqa: E402

from configs import base  # noqa: E402
from core.errors import KilnError  # noqa: E402
from loop import trained  # noqa: E402
from serve import app as app_lib, model as model_lib  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'A train.py run folder, or a jax export folder.')
_NAME = flags.DEFINE_string('name', '', 'Model name in URLs (default: the folder name).')
_HOST = flags.DEFINE_string('host', None, 'Address to listen on (default 0.0.0.0 with API keys, '
                            '127.0.0.1 without).')
_PORT = flags.DEFINE_integer('port', 8501, "Port (TF Serving's REST port by default).")
_WORKERS = flags.DEFINE_integer('workers', 1, 'Server processes sharing the port (each loads '
                                'and compiles its own model).')
_MAX_BATCH = flags.DEFINE_integer('max_batch_size', 32, 'Largest batch (and request) size.')
_TIMEOUT = flags.DEFINE_float('batch_timeout_ms', 0.0, 'How long a batch waits for more '
                              'requests after its first (0: it runs as soon as the model is '
                              'free; requests that arrive while it runs make the next batch).')
_BATCHING = flags.DEFINE_boolean('batching', True, 'Merge concurrent requests into batches.')
_BATCH_THREADS = flags.DEFINE_integer('batch_threads', 2, 'Batches computing at once (TF '
                                      "Serving's num_batch_threads): one computes while the "
                                      'next is formed.')
_MAX_QUEUE = flags.DEFINE_integer('max_queue', 1024, 'Examples queued before 503 answers.')
_MAX_BODY = flags.DEFINE_integer('max_body_bytes', 8 << 20, 'Largest request body (413 above).')
_KEYS = flags.DEFINE_string('api_keys_file', None, 'File of API keys, one per line (else '
                            f'${app_lib.API_KEYS_ENV}, comma-separated).')
_POLL = flags.DEFINE_float('poll_seconds', 30.0, 'How often to look for a newer version (a '
                           'newer checkpoint, or a new --workdir/<version>/); 0 = never.')
_DRAIN = flags.DEFINE_float('drain_seconds', 0.0, 'After SIGTERM: seconds not ready but still '
                            'serving (for a load balancer to notice) before stopping.')

LOOPBACK = ('127.0.0.1', 'localhost', '::1')


def settings_and_host() -> tuple[app_lib.Settings, str]:
  keys = app_lib.read_api_keys(_KEYS.value)
  host = _HOST.value or ('0.0.0.0' if keys else '127.0.0.1')
  if not keys and host not in LOOPBACK:
    raise KilnError(f'--host={host} without API keys would expose the model to the network '
                    f'unauthenticated: give --api_keys_file or ${app_lib.API_KEYS_ENV}')
  for flag, low in ((_PORT, 0), (_WORKERS, 1), (_MAX_QUEUE, 1), (_MAX_BODY, 1),
                    (_BATCH_THREADS, 1)):
    if flag.value < low:
      raise KilnError(f'--{flag.name}={flag.value} must be at least {low}')
  if _TIMEOUT.value < 0 or _DRAIN.value < 0 or _POLL.value < 0:
    raise KilnError('--batch_timeout_ms, --drain_seconds and --poll_seconds must be >= 0')
  model_lib.buckets(_MAX_BATCH.value)
  settings = app_lib.Settings(
      path=os.path.abspath(_WORKDIR.value), name=_NAME.value, max_batch_size=_MAX_BATCH.value,
      batch_timeout_ms=_TIMEOUT.value, batching=_BATCHING.value,
      batch_threads=_BATCH_THREADS.value, max_queue=_MAX_QUEUE.value,
      api_keys=keys, max_body_bytes=_MAX_BODY.value, drain_seconds=_DRAIN.value,
      poll_seconds=_POLL.value,
      defaults_json=base.get_base_config().to_json())
  return settings, host


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  if not _WORKDIR.value:
    sys.exit('error: --workdir is required: pass the folder of a trained run or a jax export')
  app_lib.configure_logging()
  import uvicorn
  try:
    settings, host = settings_and_host()
    model = None
    if _WORKERS.value == 1:  # Loads here, so that a bad folder fails with one line.
      model = model_lib.load(settings.path, settings.model_name, settings.max_batch_size,
                             base.get_base_config())
    elif not model_lib.is_export(settings.path) and not model_lib.version_folders(settings.path):
      trained.read_config(settings.path, base.get_base_config())  # Checked once, not per worker.
  except KilnError as e:
    sys.exit(f'error: {e}')
  if not settings.api_keys:
    logging.getLogger('kiln.serve').warning(
        'No API keys configured: anyone who reaches the port may call the model, so it '
        'listens on %s only. Give --api_keys_file or $%s to serve other hosts.', host,
        app_lib.API_KEYS_ENV)
  options = dict(host=host, port=_PORT.value, timeout_graceful_shutdown=60,
                 log_level='info', access_log=False)  # serve/app.py logs JSON lines instead.
  if model is not None:
    uvicorn.run(app_lib.create_app(settings, model), **options)
  else:
    os.environ[app_lib.SETTINGS_ENV] = settings.to_json()
    # Each worker imports JAX and TensorFlow before it can answer the supervisor's pings.
    uvicorn.run('serve.app:create_app_from_env', factory=True, workers=_WORKERS.value,
                timeout_worker_healthcheck=120, **options)


if __name__ == '__main__':
  app.run(main)
