"""Serving a trained run (or a `jax` export) over HTTP: TF Serving's REST contract, KServe v2
health, dynamic batching, Prometheus metrics and API keys (serve.py at the top starts it).

  model.py     the model compiled for batch-size buckets at start-up (no compile per request)
  codec.py     request JSON -> input arrays (row / columnar, base64 PNG, text), and back
  batching.py  the asyncio queue that merges concurrent requests into one bucket
  generation.py  GPT text generation on the compiled fixed-length logits function
  app.py       the FastAPI application: routes, errors, auth, limits, metrics, readiness
"""
