# twisted-forward: docker build -t twisted-forward .
#                  docker run -p 9999:8000 -e OPENAI_API_KEY=sk-... twisted-forward
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY twisted_forward ./twisted_forward
COPY twisted ./twisted
# Install, then regenerate Twisted's plugin cache while we may still write
# to site-packages: the non-root user below cannot.
RUN pip install --no-cache-dir . \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && rm -rf /src

RUN useradd --create-home --uid 10001 forward \
    && mkdir -p /data \
    && chown forward /data
USER forward
# Chat records go to /data/Log (mount a volume there to keep them).
WORKDIR /data

EXPOSE 8000
# Settings come from the environment (docker run -e ...); --pidfile= because
# a container needs none.
CMD ["twistd", "-n", "--pidfile=", "openai-forward", "--port", "8000"]
