# One image for every party of the grid (server, device bots, relay, billing, watchdog, console,
# dashboard, the field's web gate, scenario player); docker-compose.yml runs each as a container of its own.
#
# Behind a TLS-intercepting proxy, give the build the proxy's CA as a BuildKit secret; it is
# mounted only while pip runs in the build stage and never lands in an image:
#   DOCKER_BUILDKIT=1 docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt -t gridpresence .
# Proxy variables go in as --build-arg http_proxy=... (Docker's predefined proxy arguments reach
# every RUN and, undeclared here, are kept out of the image's history).

# --- build stage: the Python dependencies in a virtualenv ---------------------------------
FROM debian:bookworm-slim AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml /app/pyproject.toml
# Dependencies only (from pyproject.toml), so editing the source does not reinstall them. The
# bytecode pip compiles stays: the runtime user cannot write /opt/venv, and without it every
# container start would compile slixmpp, pydantic, aiohttp... again (seconds of CPU each).
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/app/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /app/requirements.txt \
 && python3 -m venv /opt/venv
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -q -r /app/requirements.txt \
 && rm -rf /opt/venv/lib/python3.11/site-packages/pip /opt/venv/lib/python3.11/site-packages/setuptools

# --- runtime: Python, Prosody, the virtualenv and the source ------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 prosody \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc /usr/share/man /etc/prosody/certs/* \
 && useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin grid \
 && install -d -o grid -g grid -m 0750 /data
COPY --from=build /opt/venv /opt/venv
# The checkout's layout: the server config template and the demo's bots/ are found beside src/.
COPY server_config /app/server_config
COPY bots /app/bots
COPY src /app/src
RUN printf '#!/bin/sh\nexec /opt/venv/bin/python -m gridpresence "$@"\n' > /usr/local/bin/gridpresence \
 && chmod 0755 /usr/local/bin/gridpresence \
 && /opt/venv/bin/python -m compileall -q /app/src
ENV PYTHONPATH=/app/src \
    PYTHONUNBUFFERED=1 \
    GRIDPRESENCE_CONNECTION=/data/connection.json
WORKDIR /data
USER grid
# The server's probe; docker-compose.yml gives each bot service a check of its own.
HEALTHCHECK --interval=5s --timeout=5s --start-period=10s --retries=5 CMD ["/opt/venv/bin/python", "-m", "gridpresence.host.health", "server"]
CMD ["gridpresence", "--help"]
