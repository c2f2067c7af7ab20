"""
The HTTP server side: the Site, its Request class, and the router.

``build_root`` assembles the resource tree the design describes::

    AccessGate -> Router -> /healthz, ProxyResource per route
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from .access import AccessGate
from .chatlog import Recorder
from .config import Config
from .errors import write_error
from .keys import DefaultKeys, ForwardKeys, KeyRules
from .proxy import ProxyResource
from .upstream import BadTarget, Upstream, split_target


class ForwardRequest(Request):
    """A request whose answers carry no Twisted defaults.

    Relayed answers must have the upstream's headers only, so there is no
    default ``text/html`` content type.
    """

    defaultContentType = None


@dataclass
class Health:
    """Whether the proxy is serving or draining, for ``/healthz``."""

    draining: bool = False
    extra: dict = field(default_factory=dict)


class Router(Resource):
    """Dispatches on the raw request path: health check, then route prefixes.

    Works on the raw target (not Twisted's unquoted segments) so what is
    forwarded is byte for byte what the client sent.  The longest matching
    prefix wins.
    """

    isLeaf = True

    def __init__(
        self,
        routes: Sequence[tuple[str, ProxyResource]],
        health: Health,
        healthz_path: str = "/healthz",
    ) -> None:
        super().__init__()
        self._routes = sorted(
            ((prefix.encode("ascii"), res) for prefix, res in routes),
            key=lambda item: len(item[0]),
            reverse=True,
        )
        self.health = health
        healthz = healthz_path.encode("ascii")
        self._health_paths = frozenset(
            [healthz] + [prefix + healthz for prefix, _ in self._routes if prefix]
        )

    def render(self, request: IRequest) -> bytes | int:
        try:
            path, query = split_target(request.uri)
        except BadTarget as e:
            return write_error(request, 400, "invalid_request_target", str(e))
        if path in self._health_paths:
            return self._health(request)
        for prefix, resource in self._routes:
            if not prefix:
                rest = path
            elif path == prefix or path.startswith(prefix + b"/"):
                rest = path[len(prefix):]
            else:
                continue
            request.forward_target = (rest or b"/") + query
            return resource.render(request)
        return write_error(
            request, 404, "unknown_route", "No route on this proxy matches the request path."
        )

    def _health(self, request: IRequest) -> bytes:
        draining = self.health.draining
        body = json.dumps(
            {"status": "draining" if draining else "ok", **self.health.extra}
        ).encode()
        request.setResponseCode(503 if draining else 200)
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        return body


class ForwardSite(Site):
    """The proxy's HTTP server factory: logs one structured line a request."""

    requestFactory = ForwardRequest
    displayTracebacks = False
    log_requests = Logger(namespace="twisted_forward.access")

    def log(self, request: Request) -> None:  # type: ignore[override]
        self.log_requests.info(
            "{method} {path} {status} {length}",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            status=request.code,
            length=request.sentLength,
        )


@dataclass
class Built:
    """What :func:`build_root` made, for the service to manage."""

    root: IResource
    proxies: list[ProxyResource]
    upstream: Upstream
    health: Health
    keys: KeyRules


def build_root(
    config: Config,
    reactor: IReactorTime,
    recorder: Optional[Recorder] = None,
    upstream: Optional[Upstream] = None,
) -> Built:
    """Build the resource tree for ``config``."""
    if upstream is None:
        upstream = Upstream(reactor, config.connect_timeout)
    openai_keys = KeyRules(
        DefaultKeys(config.default_keys, reactor.seconds),
        ForwardKeys(config.forward_keys),
    )
    passthrough = KeyRules(DefaultKeys((), reactor.seconds), ForwardKeys(()))
    proxies = [
        ProxyResource(
            route,
            upstream,
            openai_keys if route.kind == "openai" else passthrough,
            reactor,
            config.read_timeout,
            config.idle_timeout,
            recorder,
        )
        for route in config.routes
    ]
    health = Health()
    router = Router(
        [(p.route.prefix, p) for p in proxies], health, config.healthz_path
    )
    root = AccessGate(
        router, config.ip_whitelist, config.ip_blacklist, config.trusted_proxies,
        exempt_paths=router._health_paths,
    )
    return Built(root, proxies, upstream, health, openai_keys)
