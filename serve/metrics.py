"""Prometheus metrics of one server process, in a registry of its own (several apps in one
process, as in the tests, never collide)."""

import prometheus_client as prom

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)


class Metrics:

  def __init__(self, max_batch_size: int):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter('kiln_requests', 'HTTP requests answered, by route and status '
                                 'code.', ['route', 'code'], registry=r)
    self.errors = prom.Counter('kiln_request_errors', 'Requests answered 4xx or 5xx, by status '
                               'code.', ['code'], registry=r)
    self.latency = prom.Histogram('kiln_request_latency_seconds', 'Time from request to answer, '
                                  'by route.', ['route'], buckets=LATENCY_BUCKETS, registry=r)
    sizes, size = [], 1
    while size < max_batch_size:
      sizes.append(size)
      size *= 2
    self.batch_size = prom.Histogram('kiln_batch_size', 'Examples per model call (dynamic '
                                     'batching merges requests).',
                                     buckets=(*sizes, max_batch_size), registry=r)
    self.queue_depth = prom.Gauge('kiln_queue_depth', 'Examples queued or running.', registry=r)
    self.ready = prom.Gauge('kiln_ready', '1 when the model is compiled and the server is not '
                            'draining.', registry=r)

  def observe(self, route: str, code: int, seconds: float) -> None:
    self.requests.labels(route, str(code)).inc()
    if code >= 400:
      self.errors.labels(str(code)).inc()
    self.latency.labels(route).observe(seconds)

  def render(self) -> tuple[bytes, str]:
    return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
