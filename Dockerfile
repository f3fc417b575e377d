# nnfabric images, one multi-stage file:
#   docker build --target control -t nnfabric/control .        # api and scheduler (no torch)
#   docker build --target worker  -t nnfabric/worker .         # Ray + torch + the model runtime (CUDA)
#   docker build --target worker --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t nnfabric/worker:cpu .
# Secrets (Redis password, API keys) come from the environment at run time, never from the image.

ARG PYTHON_IMAGE=python:3.11-slim
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu

# --- api + scheduler: the gateway never imports torch, so neither image layer carries it ------
FROM ${PYTHON_IMAGE} AS control
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin nnfabric
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY client ./client
COPY services ./services
# The control plane's dependencies are the project's own (pyproject.toml), under the same constraints.
RUN pip install -c constraints.txt .
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
# --ws-max-size: a job on the job socket may be as large as NNFABRIC_MAX_ENVELOPE_BYTES (96 MiB).
CMD ["uvicorn", "services.api.app:create_app", "--factory", "--ws-per-message-deflate", "false", "--no-proxy-headers", "--ws-max-size", "100663296", "--host", "0.0.0.0", "--port", "8000"]

# --- worker: Ray's own image (the user "ray", uid 1000) plus torch and nnfabric -----------------
FROM ${RAY_IMAGE} AS worker
ARG TORCH_INDEX=https://pypi.org/simple
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 NNFABRIC_CACHE_DIR=/models/cache
WORKDIR /home/ray/nnfabric
COPY --chown=1000:100 pyproject.toml constraints.txt README.md ./
COPY --chown=1000:100 client ./client
COPY --chown=1000:100 services ./services
RUN pip install --index-url ${TORCH_INDEX} torch==2.13.0 \
 && pip install -c constraints.txt ".[worker]"
USER 1000
HEALTHCHECK --interval=15s --timeout=5s --retries=3 CMD ray health-check || exit 1
