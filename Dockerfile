# syntax=docker/dockerfile:1
# BIMIP: one image for messaging, awareness and sync (choose with the command: `run messaging`, …)
# and for the migration step (`migrate`). See deploy/README.md.
#
#   docker build -t bimip:dev .

# ---- builder: the locked dependencies and the project, installed into /app/.venv with uv ------------
FROM python:3.11-slim AS builder

# The uv version the Makefile pins (UV_VERSION).
RUN pip install --no-cache-dir --disable-pip-version-check uv==0.13.9

# The interpreter is the image's own (/usr/local/bin/python3.11, the same path in the runtime stage);
# bytecode is compiled here because the runtime's root filesystem is read-only.
ENV UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_CACHE_DIR=/root/.cache/uv

WORKDIR /src

# Dependencies first: this layer is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project --no-editable

# Then the project itself, installed as a wheel (not editable: the runtime stage has no /src).
# The generated protobuf code is committed under bimip/*/v1 and the Alembic migrations live in
# bimip/migrations, so protos/ is not needed.
COPY bimip ./bimip
COPY services ./services
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

# ---- runtime: the virtual environment only, run as a non-root user ------------------------------
FROM python:3.11-slim AS runtime

ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BIMIP_HOST=0.0.0.0

# A fixed numeric UID/GID so Kubernetes' runAsNonRoot can check it (runAsUser: 10001).
# /data is the working directory: `docker run bimip:dev` alone (embedded SQLite under ./var) can write
# there. Deployments use PostgreSQL and point BIMIP_VAR_DIR at a tmpfs, so nothing is written to it.
RUN groupadd --system --gid 10001 bimip \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin bimip \
    && install --directory --owner 10001 --group 10001 --mode 0750 /data

# Owned by root and so read-only to the service user.
COPY --from=builder /app/.venv /app/.venv

WORKDIR /data
USER 10001:10001

# messaging, awareness, sync (gRPC), Prometheus metrics
EXPOSE 50051 50052 50053 9464

# Healthy when one of the services in this container answers SERVING (whichever `run` started).
# Docker and Compose use this; Kubernetes ignores it and uses the gRPC probes in deploy/k8s.
HEALTHCHECK --interval=10s --timeout=10s --start-period=20s --retries=3 \
    CMD ["sh", "-c", "for port in 50051 50052 50053; do bimip health --timeout 2 --address 127.0.0.1:$port && exit 0; done; exit 1"]

ENTRYPOINT ["bimip"]
CMD ["run"]
