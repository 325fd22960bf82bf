# The metering sidecar. Build from the repository root:
#   docker build -f deploy/docker/sidecar.Dockerfile -t vllm-metering-sidecar .
# It listens on 127.0.0.1:9600 only: vLLM reaches it over the task's shared loopback (awsvpc on ECS,
# `network_mode: service:sidecar` in docker-compose.yml). Nothing outside the task can.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY server ./server
COPY schema ./schema
# A regular (non-editable) wheel of the project with its fleet extra (psycopg, for SIDECAR_FLEET_URL),
# dependencies included, for the runtime stage.
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[fleet]'

FROM python:3.11-slim
ARG UID=10001
RUN groupadd --system --gid "${UID}" sidecar \
 && useradd --system --uid "${UID}" --gid sidecar --home-dir /data --no-create-home --shell /usr/sbin/nologin sidecar \
 && mkdir -p /data \
 && chown sidecar:sidecar /data
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels 'vllm-marketplace-sidecar[fleet]' \
 && sidecar --help >/dev/null

# The database lives on a volume. A new named volume takes /data's owner from the image, so the
# non-root user can write it; see deploy/README.md for what task-local storage means on ECS.
ENV SIDECAR_DB=/data/sidecar.db \
    SIDECAR_LISTEN=127.0.0.1:9600 \
    SIDECAR_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/data"]
WORKDIR /data
USER sidecar

# SIGTERM starts the shutdown flush: seal the open hour, send within SIDECAR_SHUTDOWN_DEADLINE_S
# (25 s). Give the container longer than that to stop (ECS stopTimeout, compose stop_grace_period).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["sidecar", "check"]
CMD ["sidecar", "serve"]
