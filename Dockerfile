# invoisx-proxy as a container (docs/docker.md).
#   docker build -t invoisx-proxy .
# The builder installs the package from this source tree into a venv; the final image gets
# only that venv, so no build tools, sources or pip caches ship.

# Both stages must use the same image: the venv's python links to the base image's interpreter.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/invoisx-proxy
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
# A regular (not editable) install, so the venv does not need /src at run time.
RUN /opt/invoisx-proxy/bin/pip install --no-cache-dir .

FROM ${PYTHON_IMAGE}
# A fixed numeric id, so `USER` below passes Kubernetes' runAsNonRoot check and a host secret
# file can be given to it (`chown 10001`).
RUN groupadd --system --gid 10001 invoisx \
    && useradd --system --uid 10001 --gid invoisx --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin invoisx
COPY --from=builder /opt/invoisx-proxy /opt/invoisx-proxy
# Listening on 0.0.0.0 is what makes the proxy reachable from other containers; without client
# keys the proxy also needs INVOISX_PROXY_ALLOW_ANONYMOUS=true to agree (docker-compose.yml).
ENV PATH="/opt/invoisx-proxy/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    INVOISX_PROXY_HOST=0.0.0.0 \
    INVOISX_PROXY_PORT=8080
# DL3064 flags any variable named like a token; this one holds only the path of the secret file
# (what the rule recommends instead of the token itself), so it is ignored for this line alone.
# hadolint ignore=DL3064
ENV INVOISX_API_TOKEN_FILE=/run/secrets/invoisx_token
USER 10001:10001
EXPOSE 8080
# Liveness without curl (the slim image has none): the standard library calls /healthz on the
# configured port; any error or non-2xx answer raises, and exit status 1 means unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:' + os.environ.get('INVOISX_PROXY_PORT', '8080') + '/healthz', timeout=4)"]
ENTRYPOINT ["invoisx-proxy"]
CMD ["serve"]
