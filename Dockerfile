# syntax=docker/dockerfile:1
# One image, three roles:
#   querywarden serve --config /etc/querywarden/gateway.yaml   the gateway (the sidecar)
#   querywarden operator                                       the operator and its webhook
#   querywarden mcp --transport http ...                       the MCP server for agents
#     (its SDK and uvicorn are dependencies in pyproject.toml, installed below)
# Non-root (uid 65532) and read-only-root-filesystem friendly: nothing is written outside
# the mounted volumes (/tmp, the audit directory), bytecode is compiled at build time.
#
# `make image` builds it (scripts/build-image.sh). BASE_IMAGE is python:3.11-slim where a
# registry serves it; elsewhere the script makes an equivalent base from Debian's packages.
# pip's configuration (index, CA bundle) may come in as the build secret `pip.conf`, as
# behind a corporate proxy; a secret is never stored in a layer.
ARG BASE_IMAGE=python:3.11-slim
#
# The compiled row masker (native/, querywarden_native) is not compiled here (Debian
# bookworm's Rust is older than PyO3 needs, and no crates registry is reachable from the
# build): scripts/build-image.sh builds its wheel on the host, a bookworm machine like the
# base, into build/native-wheel/, and it is installed below. The build fails if it does
# not load, rather than ship an image that masks ten times slower.

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first (the project's own, pinned by constraints.txt), so that a code change
# reuses the layer. They are read from pyproject.toml rather than installed through a stub
# package: a stub's build/ copy once outlived it and the image shipped an empty package.
COPY pyproject.toml constraints.txt ./
RUN --mount=type=secret,id=pip.conf,required=false \
    --mount=type=secret,id=pip-ca.pem,required=false \
    if [ -f /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi \
 && python -m venv /opt/querywarden \
 && python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > requirements.txt \
 && /opt/querywarden/bin/pip install -c constraints.txt -r requirements.txt
COPY README.md LICENSE ./
COPY proxy ./proxy
COPY operator ./operator
# A wheel built from these sources alone (no build/ directory exists in the context), then
# installed without touching the dependencies.
RUN --mount=type=secret,id=pip.conf,required=false \
    --mount=type=secret,id=pip-ca.pem,required=false \
    if [ -f /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi \
 && /opt/querywarden/bin/pip wheel --no-deps --wheel-dir /tmp/wheels . \
 && /opt/querywarden/bin/pip install --no-deps --no-index /tmp/wheels/querywarden-*.whl \
 && /opt/querywarden/bin/python -m compileall -q /opt/querywarden/lib \
 && /opt/querywarden/bin/querywarden --version
COPY build/native-wheel/ /tmp/native-wheel/
RUN /opt/querywarden/bin/pip install --no-deps --no-index /tmp/native-wheel/querywarden_native-*.whl \
 && /opt/querywarden/bin/python -c \
      'from querywarden.masking import compiled; compiled.select("on"); print(compiled.describe())'

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="querywarden" \
      org.opencontainers.image.description="PostgreSQL wire-protocol gateway and its Kubernetes operator" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 65532 querywarden \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin querywarden \
 && mkdir -p /etc/querywarden/policy /var/lib/querywarden/audit \
 && chown 65532:65532 /var/lib/querywarden/audit
COPY --from=build /opt/querywarden /opt/querywarden
ENV PATH=/opt/querywarden/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so that runAsNonRoot can verify it.
USER 65532:65532
# 6432: the gateway; 9443: the operator's webhook; 8080: the operator's health endpoint;
# 8765: the MCP server (as the chart runs it).
EXPOSE 6432 9443 8080 8765
ENTRYPOINT ["querywarden"]
CMD ["serve", "--config", "/etc/querywarden/gateway.yaml"]
