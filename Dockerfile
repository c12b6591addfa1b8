# syntax=docker/dockerfile:1
# One image, two roles:
#   querywarden serve --config /etc/querywarden/gateway.yaml   the gateway (the sidecar)
#   querywarden operator                                       the operator and its webhook
# Non-root (uid 65532) and read-only-root-filesystem friendly: nothing is written outside
# the mounted volumes (/tmp, the audit directory), bytecode is compiled at build time.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first (pinned by constraints.txt), so that a code change reuses the layer.
COPY pyproject.toml constraints.txt README.md LICENSE ./
RUN python -m venv /opt/querywarden \
 && mkdir -p proxy/querywarden operator/querywarden_operator \
 && touch proxy/querywarden/__init__.py operator/querywarden_operator/__init__.py \
 && /opt/querywarden/bin/pip install -c constraints.txt . \
 && /opt/querywarden/bin/pip uninstall -y querywarden
COPY proxy ./proxy
COPY operator ./operator
RUN /opt/querywarden/bin/pip install --no-deps -c constraints.txt . \
 && /opt/querywarden/bin/python -m compileall -q /opt/querywarden/lib

FROM python:${PYTHON_VERSION}-slim
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
# 6432: the gateway; 9443: the operator's webhook; 8080: the operator's health endpoint.
EXPOSE 6432 9443 8080
ENTRYPOINT ["querywarden"]
CMD ["serve", "--config", "/etc/querywarden/gateway.yaml"]
