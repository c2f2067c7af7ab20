# twisted-forward:
#   docker build -t twisted-forward .
#   docker run -p 9999:8000 --stop-timeout 40 -e OPENAI_API_KEY=sk-... -e FORWARD_KEY=fk-... \
#       -v twisted-forward-log:/data/Log twisted-forward
# BASE: any Debian-like image with python3 and its venv module (CI builds on a
# stand-in made with debootstrap: --build-arg BASE=twisted-forward-base:bookworm).
ARG BASE=python:3.12-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# Where pip finds packages, if not PyPI (passed by CI from its own pip setup;
# build args are not kept in the image's environment).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
# PEM certificates pip must also trust (a TLS-inspecting proxy's CA, as CI
# passes from the host's /usr/local/share/ca-certificates): used for the
# install only, never added to the image's trust store.
ARG EXTRA_CA_CERTS=

# CA certificates for HTTPS to the upstream (python:3.12-slim lacks them).
RUN if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /src
COPY pyproject.toml README.md ./
COPY twisted_forward ./twisted_forward
COPY twisted ./twisted
# Install into a venv (Debian's own python3 refuses a system-wide pip install),
# then regenerate Twisted's plugin cache while we may still write to the venv:
# the non-root user below cannot.
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
        { cat /etc/ssl/certs/ca-certificates.crt; printf '%s\n' "$EXTRA_CA_CERTS"; } >/tmp/pip-ca.pem; \
        export PIP_CERT=/tmp/pip-ca.pem; \
    fi \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir . \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && rm -rf /src /tmp/pip-ca.pem

COPY docker/entrypoint.sh /usr/local/bin/twisted-forward-entrypoint
# /data/Log exists in the image, owned by the user, so a named volume mounted
# there starts with the right owner.
RUN chmod 755 /usr/local/bin/twisted-forward-entrypoint \
    && useradd --create-home --uid 10001 forward \
    && mkdir -p /data/Log \
    && chown -R forward /data
USER forward
# Chat records go to /data/Log (mount a named volume there to keep them).
WORKDIR /data

EXPOSE 8000
# docker stop's default 10 s is shorter than the 30 s drain (SHUTDOWN_GRACE):
# run with --stop-timeout 40 (compose: stop_grace_period: 40s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["twisted-forward-entrypoint"]
# Settings come from the environment (docker run -e ...); --pidfile= because
# a container needs none.
CMD ["twistd", "-n", "--pidfile=", "openai-forward", "--port", "8000"]
