# Kiln's model server: serve.py on a trained run or (recommended) a `jax` export folder.
#
#   docker build -t kiln-serve .
#   docker run -p 8501:8501 -e KILN_API_KEYS=change-me -v "$PWD/exports/mnist_jax:/models/model:ro" \
#       kiln-serve
#   curl -H 'Authorization: Bearer change-me' localhost:8501/v1/models/model/metadata
#
# A jax export (export.py --format=jax) is self-contained; a trained workdir also needs its data
# (the run rebuilds its tokenizer and sizes from it). Without API keys serve.py listens on
# 127.0.0.1 only, so a container without KILN_API_KEYS (or --api_keys_file) is unreachable by
# design. To bake a model in: FROM kiln-serve, then COPY exports/mnist_jax /models/model.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: dependencies into a virtualenv, versions pinned by deploy/constraints.txt ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The whole context less .dockerignore's list: a package added to the repository is in the image
# without an edit here (tests/test_deploy.py checks that everything imported is copied).
COPY . .
RUN pip install --constraint deploy/constraints.txt .

# --- runtime: the virtualenv and the entry points, as a non-root user ---
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 \
    KILN_CACHE_DIR=/tmp/kiln-cache HOME=/tmp MPLCONFIGDIR=/tmp/matplotlib
RUN groupadd --system --gid 10001 kiln \
    && useradd --system --uid 10001 --gid kiln --no-create-home --home-dir /app kiln
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --from=build --chown=root:root /src /app
USER 10001:10001
EXPOSE 8501
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/v2/health/ready', timeout=2)"]
ENTRYPOINT ["python", "serve.py"]
CMD ["--workdir=/models/model", "--port=8501", "--drain_seconds=5"]
