"""
The HTTP server side: the Site, its Request class, and the router.

``build_root`` assembles the resource tree the design describes::

    Router -> /healthz, /metrics, /_admin/, ProxyResource per route

and the head checks every request passes first, in the channel
(:mod:`twisted_forward.headcheck`): the IP gate
(:class:`~twisted_forward.access.AccessGate`), then the route's key check.
The side ports (METRICS_PORT, ADMIN_PORT) run the same IP gate the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Optional, Sequence

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import datetimeToString
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from ._compat import REQUEST_SLOTS, fill_slot_defaults, send_now, slot_defaults
from .access import AccessGate, TrustedProxies
from .admin.limits import IKeyLimits, PolicyLimits
from .admin.live import LiveTally
from .admin.resource import is_admin_path
from .admin.service import Admin, build_admin
from .cache.hook import ResponseCache, build_cache
from .cache.interfaces import ICacheStore
from .cache.metrics import CacheMetrics
from .chat.recorder import ChatRecorder, FanOut, IRecorder
from .config import Config
from .cors import Cors, is_preflight
from .errors import write_error
from .exchange import ProxyResource
from .framing import ChannelSettings, ForwardChannel, Refusal, body_too_large
from .headcheck import HeadChecks, IHeadCheck
from .keys import DefaultKeys, ForwardKeys, KeyRules
from .ledger import ILedger
from .ledger.service import LedgerCollector
from .limits import ConnectionLimits, UpstreamSlots, resolve_caps
from .loops import is_loop
from .metrics import Metrics, public_metrics
from .policies.failover import GuardedStore
from .policies.gate import PolicyGate
from .policies.health import KeyHealthLink
from .policies.service import build_gate
from .state import RequestState, state_of
from .target import BadTarget, split_target
from .upstream import IUpstream, Upstream

#: Seconds a client connection may sit idle between requests.
CLIENT_IDLE_TIMEOUT = 60
#: What ``OPTIONS *`` says the proxy serves.
ALLOWED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

#: The access line's status for a request whose client left before the
#: answer's head (nginx's "client closed request").
CLIENT_CLOSED_REQUEST = 499
#: The access line's error for a request whose client left unanswered.
CLIENT_LEFT = "client_left"

#: One line per answered request.  Module level: a Logger class attribute
#: would take the class's name as its namespace.
_access_log = Logger(namespace="twisted_forward.access")
#: The access log line's text, filled with % (see ForwardSite.access_line): client,
#: method, path, status, length, route, key label, upstream time, error.
_ACCESS_LINE = "%s %s %s %s %sB route=%s key=%s upstream=%s error=%s"
_ACCESS_SYSTEM = "twisted_forward.access#info"


def serve_channels(site: ForwardSite | SidePortSite, settings: ChannelSettings) -> None:
    """Make ``site`` serve each new connection with a
    :class:`~twisted_forward.framing.ForwardChannel` built with ``settings``
    (HTTP/1.1 only: its framing guards are HTTP/1.1's).

    ``Site.buildProtocol`` calls ``protocol()`` with no arguments, hence the
    partial.  Twisted declares ``protocol`` (and ``buildProtocol``'s result)
    as its HTTP/2-negotiating wrapper, but any ``HTTPChannel`` serves.
    """
    site.protocol = partial(ForwardChannel, settings)  # type: ignore[assignment]  # see docstring


#: The class-level values the slots of :class:`ForwardRequest` hide.
_REQUEST_DEFAULTS = slot_defaults(Request, REQUEST_SLOTS)


class ForwardRequest(Request):
    """A request whose answers carry no Twisted defaults, with a body cap.

    Relayed answers must have the upstream's headers only, so there is no
    default ``text/html`` content type.

    The body is counted as it arrives: past the channel's
    ``max_request_body`` the channel answers 413 and reads no further (a
    declared Content-Length over the cap is refused before the body, by
    :class:`~twisted_forward.framing.ForwardChannel`).  Twisted keeps bodies
    of 100 kB or more, and every chunked body, in a temporary file, not in
    memory.
    """

    # One pointer each instead of a hash table per request (see
    # twisted_forward._compat.REQUEST_SLOTS).
    __slots__ = REQUEST_SLOTS + ("state", "body_received", "head_refusal")

    defaultContentType = None
    #: The connection it came on.  Twisted declares it never None but sets
    #: None once the request is finished or its connection lost: checked
    #: where that can be so (:meth:`write`, :meth:`connectionLost`).
    channel: ForwardChannel
    #: Body bytes received so far.
    body_received: int
    #: Set by the channel when a head check refused this (bodiless) request:
    #: it is answered with this instead of being rendered.
    head_refusal: Optional[Refusal]

    def process(self) -> None:
        """Answer a head check's refusal, or ``OPTIONS *``, or render.

        Twisted's own ``process`` answers a ``*`` target itself (200, before
        any resource, so before the IP gate) and sets ``Server:
        TwistedWeb/<version>`` (removed in :meth:`ForwardSite.getResourceFor`).
        """
        if self.head_refusal is None and self.path != b"*":
            super().process()
            return
        site = self.channel.site
        # Processed by its channel as its head ends: a site's channel.
        assert site is not None
        self.site = site  # type: ignore[assignment, unused-ignore]  # Twisted 26.4 types Request.site as None
        self.setHeader(b"date", datetimeToString())
        self.prepath = []
        self.postpath = []
        refusal = self.head_refusal
        if refusal is not None:
            self.write(write_error(self, refusal.status, refusal.code, refusal.message))
            self.finish()
            return
        try:
            self.render(site.resource)
        except BaseException:
            self.processingFailed(Failure())

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fill_slot_defaults(self, _REQUEST_DEFAULTS)
        self.body_received = 0
        self.head_refusal = None
        super().__init__(*args, **kwargs)
        #: What the stages learn about this request (:mod:`.state`).
        self.state = RequestState()

    def write(self, data: bytes) -> None:
        """Every answer's head passes here first: the CORS headers of an
        answer to a cross-origin request (:mod:`twisted_forward.cors`) are
        set just before it is written."""
        channel = self.channel
        if not self.startedWriting and channel is not None and channel.site is not None:
            # The site's current settings: a reload replaces them for the
            # connections already open too.
            cors = channel.site.cors
            if (
                cors is not None
                and cors.enabled
                and not is_admin_path(self.uri.split(b"?", 1)[0])
            ):
                cors.apply(self.method, self.requestHeaders, self.responseHeaders)
        super().write(data)

    def connectionLost(self, reason: object) -> None:
        """The connection went before this request was finished: the
        exchange hears of it first (its ``notifyFinish`` errback stops the
        upstream and takes the upstream's time), then the request gets its
        one access line, which ``finish`` (never called now) would have
        written.  A request the channel refused (a slow head, a body over
        the cap, a bad head with a body) is logged with the refusal; any
        other is logged as the client having left.  (A side port's
        requests get no access line.)"""
        # Read before Twisted's connectionLost sets self.channel to None.
        channel = self.channel
        super().connectionLost(reason)
        if self.finished or channel is None or not isinstance(channel.site, ForwardSite):
            return
        site = channel.site
        refused = channel.refused
        state = self.state
        if refused is not None:
            self.code = refused.status
            # An error answer already begun keeps its own code.
            error = state.error or refused.code
        else:
            if not self.startedWriting:
                # nginx's "client closed request": no answer was sent.
                self.code = CLIENT_CLOSED_REQUEST
            error = CLIENT_LEFT
        state.error = error
        # Not site.log: a refusal was counted by the channel, and a client
        # that left is no refusal.
        site.access_line(self)

    def handleContentChunk(self, data: bytes) -> None:
        limit = self.channel.max_request_body
        if limit is not None:
            self.body_received += len(data)
            if self.body_received > limit:
                self.channel.refuse(body_too_large(limit))
                return
        super().handleContentChunk(data)


@dataclass
class Health:
    """Whether the proxy is serving or draining, for ``/healthz``."""

    draining: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@implementer(IHeadCheck)
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
        metrics: Optional[IResource] = None,
        metrics_path: str = "/metrics",
        admin: Optional[IResource] = None,
        cors: Optional[Cors] = None,
    ) -> None:
        super().__init__()
        #: Answers CORS preflights itself when on (:mod:`twisted_forward.cors`).
        self.cors = cors
        self._routes = sorted(
            ((prefix.encode("ascii"), res) for prefix, res in routes),
            key=lambda item: len(item[0]),
            reverse=True,
        )
        self.health = health
        healthz = healthz_path.encode("ascii")
        #: The health check's paths (also under each route prefix): served
        #: to everyone, past the IP gate and the keys.
        self.health_paths = frozenset(
            [healthz] + [prefix + healthz for prefix, _ in self._routes if prefix]
        )
        self._metrics = metrics
        self._metrics_path = metrics_path.encode("ascii")
        self._admin = admin

    def route_for(self, path: bytes) -> Optional[tuple[ProxyResource, bytes]]:
        """The route serving ``path`` and the rest of the path after its
        prefix, or None when no route matches."""
        for prefix, resource in self._routes:
            if not prefix:
                return resource, path
            if path == prefix or path.startswith(prefix + b"/"):
                return resource, path[len(prefix):]
        return None

    def check_head(self, request: IRequest) -> Optional[Refusal]:
        """The route's key check, made on the head (see
        :mod:`twisted_forward.headcheck`); the health check, the metrics,
        the admin paths (their own key), bad targets and unknown routes are
        left to :meth:`render`."""
        try:
            path, _ = split_target(request.uri)
        except BadTarget:
            return None
        if (
            path in self.health_paths
            or (self._metrics is not None and path == self._metrics_path)
            or is_admin_path(path)
            or self._answers_preflight(request, path)
        ):
            return None
        found = self.route_for(path)
        return found[0].check_head(request) if found is not None else None

    def render(self, request: Request) -> bytes | int:
        if request.uri == b"*":
            return self._asterisk(request)
        try:
            path, query = split_target(request.uri)
        except BadTarget as e:
            return write_error(request, 400, "invalid_request_target", str(e))
        if path in self.health_paths:
            return self._health(request)
        if self._answers_preflight(request, path):
            assert self.cors is not None
            request.setResponseCode(
                self.cors.preflight(request.requestHeaders, request.responseHeaders)
            )
            return b""
        if is_loop(request.requestHeaders):
            return write_error(
                request, 508, "loop_detected",
                "This request was forwarded by this proxy and came back to it: the "
                "upstream (OPENAI_BASE_URL or FORWARD_CONFIG) points at the proxy itself.",
            )
        if self._metrics is not None and path == self._metrics_path:
            return self._metrics.render(request)
        if is_admin_path(path):
            # Never forwarded, never through the key rules: the admin's own
            # resource and key, or nothing.
            if self._admin is None:
                return write_error(
                    request, 404, "admin_off",
                    "The admin page is off on this port.",
                )
            return self._admin.render(request)
        if self.health.draining:
            # A request on a connection kept alive from before the shutdown:
            # refuse it and close that connection after the answer.
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            if request.channel is not None:
                request.channel.persistent = False
            return write_error(
                request, 503, "shutting_down", "The proxy is shutting down; retry elsewhere."
            )
        found = self.route_for(path)
        if found is not None:
            resource, rest = found
            state = state_of(request)
            state.path = rest or b"/"
            state.query = query
            return resource.render(request)
        return write_error(
            request, 404, "unknown_route", "No route on this proxy matches the request path."
        )

    def _answers_preflight(self, request: IRequest, path: bytes) -> bool:
        """Whether ``request`` is a CORS preflight the proxy answers itself
        (never forwarded, never asking for a key; not for the admin API)."""
        return (
            self.cors is not None
            and self.cors.enabled
            and is_preflight(request.method, request.requestHeaders)
            and not is_admin_path(path)
        )

    @staticmethod
    def _asterisk(request: IRequest) -> bytes:
        """``OPTIONS *`` asks what the server supports (RFC 9110 §9.3.7):
        200 with an Allow header and no body.  ``*`` with any other method
        is an invalid target."""
        if request.method != b"OPTIONS":
            return write_error(
                request, 400, "invalid_request_target",
                "The request target '*' is for OPTIONS requests only.",
            )
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"allow", [ALLOWED_METHODS])
        request.responseHeaders.setRawHeaders(b"content-length", [b"0"])
        return b""

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
    """The proxy's HTTP server factory.

    Serves HTTP/1.1 through :class:`~twisted_forward.framing.ForwardChannel`
    (no HTTP/2: its framing guards are HTTP/1.1's), leaves request bodies
    unparsed, and logs one structured line a request.

    :param max_request_body: the largest request body accepted, in bytes;
        None for no limit.
    :param max_headers: the most header lines a request may have.
    :param max_header_bytes: the longest request head (request line and
        header lines), in bytes; also the longest single line.
    """

    requestFactory = ForwardRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        *args: Any,
        max_request_body: Optional[int] = None,
        max_headers: int = ForwardChannel.maxHeaders,
        max_header_bytes: int = ForwardChannel.totalHeadersSize,
        metrics: Optional[Metrics] = None,
        head_checks: Sequence[IHeadCheck] = (),
        limits: Optional[ConnectionLimits] = None,
        head_timeout: Optional[float] = None,
        body_timeout: Optional[float] = None,
        cors: Optional[Cors] = None,
        **kwargs: Any,
    ) -> None:
        # Bodies go upstream as sent: never parsed into request.args (which
        # would read a whole multipart upload into memory).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        # Idle keep-alive connections and slow request heads/bodies: 60 s
        # (Twisted's default is 12 hours).  Twisted suspends this while a
        # request is being answered, so long streams are not affected.
        kwargs.setdefault("timeout", CLIENT_IDLE_TIMEOUT)
        super().__init__(resource, *args, **kwargs)
        self.metrics = metrics
        #: The CORS headers every answer to a cross-origin request gets
        #: (read by the channels as each answer starts; see :meth:`serve`).
        self.cors: Optional[Cors] = cors
        #: Run on every request head, by every channel of this site.
        self.head_checks = HeadChecks(head_checks)
        self.limits = limits
        self._new_channels(ChannelSettings(
            max_request_body=max_request_body,
            max_headers=max_headers,
            max_header_bytes=max_header_bytes,
            head_checks=self.head_checks,
            head_timeout=head_timeout,
            body_timeout=body_timeout,
            count_refusal=self._count_refusal,
            seconds=self.reactor.seconds,
        ))

    def _new_channels(self, settings: ChannelSettings) -> None:
        """Build the channels of new connections with ``settings``."""
        self.channel_settings = settings
        serve_channels(self, settings)

    def _count_refusal(self, code: str) -> None:
        if self.metrics is not None:
            self.metrics.refusals.labels(code).inc()

    def buildProtocol(self, addr: Optional[IAddress]) -> ForwardChannel:  # type: ignore[override]  # see serve_channels
        channel: ForwardChannel = super().buildProtocol(addr)
        if self.limits is not None:
            channel.admit(self.limits, addr)
        return channel

    def serve(self, built: "Built", config: Config) -> None:
        """Answer new requests with ``built``'s tree (at a reload); a request
        already being answered keeps the tree it started with, and a
        kept-alive connection its body cap and deadlines; the head checks
        (IP gate, keys) and the CORS settings apply to the next request on
        every connection.
        Connection caps keep their counts (and their settings, until a
        restart)."""
        self.resource = built.root
        self.cors = Cors(config.cors_origins)
        self.metrics = built.metrics
        self.head_checks.replace(built.head_checks)
        self._new_channels(replace(
            self.channel_settings,
            max_request_body=config.max_request_body,
            head_timeout=config.request_head_timeout,
            body_timeout=config.request_body_timeout,
        ))

    def getResourceFor(self, request: IRequest) -> IResource:
        # Twisted's Request.process has just set "Server: TwistedWeb/<version>":
        # no answer names the software and its version (relayed answers
        # carry the upstream's headers only).
        request.responseHeaders.removeHeader(b"server")
        return super().getResourceFor(request)

    def log(self, request: http.Request) -> None:
        """One line per request: never a key, the key's label only.

        Called by ``Request.finish`` (and, for a request never finished, by
        :meth:`ForwardRequest.connectionLost`) once the answer's last bytes are
        written: they are sent first, so the client does not wait for the
        line (nor for what runs after it: the chat record, the ledger).
        """
        send_now(request.channel.transport if request.channel is not None else None)
        error = self.access_line(request)
        if error is not None and self.metrics is not None:
            self.metrics.refusals.labels(error).inc()

    def access_line(self, request: http.Request) -> Optional[str]:
        """Write ``request``'s access line; returns its error code."""
        state = state_of(request)
        error = state.error
        upstream = state.upstream_seconds
        upstream_ms = None if upstream is None else round(upstream * 1000, 1)
        # Twisted's class defaults until the request line is in:
        # "(no method yet)" and None.
        method = (request.method or b"-").decode("latin-1")
        path = (request.path or b"-").decode("latin-1")
        client = state.client or "-"
        # The text is made here with one %: twisted.logger's {}-formatting
        # of a nine-field template cost ~6% of a request.  JSON logs still
        # get every field as its own key.
        _access_log.info(
            "{line}",
            # Given, so text log observers need not build it per event.
            log_system=_ACCESS_SYSTEM,
            line=_ACCESS_LINE % (
                client, method, path, request.code, request.sentLength, state.route,
                state.key_label, "-" if upstream_ms is None else f"{upstream_ms}ms",
                error or "-",
            ),
            method=method,
            path=path,
            status=request.code,
            length=request.sentLength,
            client=client,
            route=state.route,
            key=state.key_label,
            upstream_ms=upstream_ms,
            error=error or "-",
        )
        return error


class SidePortSite(Site):
    """The Site of the proxy's side ports (METRICS_PORT, ADMIN_PORT): no
    connection log lines, no ``Server: TwistedWeb/<version>`` header (no
    answer of the proxy names its software and version), and the proxy's
    channel, so the same head checks (the IP gate) decide on the head of
    every request, as on the proxy's own port.

    :param head_checks: run on every request head, in order.
    """

    noisy = False
    requestFactory = ForwardRequest
    #: No CORS headers: the admin API is same-origin, the metrics for scrapers.
    cors: Optional[Cors] = None

    def __init__(
        self, resource: IResource, *args: Any, head_checks: Sequence[IHeadCheck] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, *args, **kwargs)
        #: Run on every request head, by every channel of this site.
        self.head_checks = HeadChecks(head_checks)
        serve_channels(
            self, ChannelSettings(head_checks=self.head_checks, seconds=self.reactor.seconds)
        )

    def serve(self, resource: IResource, head_checks: Sequence[IHeadCheck]) -> None:
        """Answer new requests with ``resource``, behind ``head_checks``,
        from the next request on (at a reload)."""
        self.resource = resource
        self.head_checks.replace(head_checks)

    def getResourceFor(self, request: IRequest) -> IResource:
        request.responseHeaders.removeHeader(b"server")
        return super().getResourceFor(request)


@dataclass
class Built:
    """What :func:`build_root` made, for the service to manage."""

    #: The resource tree (the :class:`Router`): reached only past the head
    #: checks, which every listener's channel runs.
    root: IResource
    proxies: list[ProxyResource]
    upstream: IUpstream
    health: Health
    keys: KeyRules
    metrics: Metrics
    #: The IP gate: the first head check, on the proxy's port and the side
    #: ports alike.
    gate: AccessGate
    #: The response cache, None when it is off.
    cache: Optional[ResponseCache] = None
    #: The policy gate, or None when no policy is set.
    policy: Optional[PolicyGate] = None
    #: The cache's series (registered whether or not the cache is on).
    cache_metrics: Optional[CacheMetrics] = None
    #: The usage ledger (None: LEDGER off), for the admin API to query.
    ledger: Optional[ILedger] = None
    #: The admin page and API, when ADMIN_KEY is set.
    admin: Optional["Admin"] = None
    #: Run on every request head, in order (see :mod:`twisted_forward.headcheck`).
    head_checks: tuple[IHeadCheck, ...] = ()
    #: The store shared with other processes (supervisor or Redis), or None.
    shared_store: Optional[GuardedStore] = None
    #: Keeps the default keys' health in step with the shared store.
    key_health: Optional[KeyHealthLink] = None


def build_root(
    config: Config,
    reactor: IReactorTime,
    recorder: Optional[IRecorder] = None,
    upstream: Optional[IUpstream] = None,
    metrics: Optional[Metrics] = None,
    cache_store: Optional[ICacheStore] = None,
    policy: Optional[PolicyGate] = None,
    ledger: Optional[ILedger] = None,
    limits: Optional[IKeyLimits] = None,
    cache_metrics: Optional[CacheMetrics] = None,
    health: Optional[Health] = None,
    store: Optional[GuardedStore] = None,
) -> Built:
    """Build the resource tree for ``config``.

    :param store: the policy store shared with other processes
        (:func:`twisted_forward.policies.shared.open_shared_store`); it also
        carries the default keys' health.  None: this process alone.

    Metrics are collected always; they are served at ``config.metrics_path``
    on this tree unless disabled or given their own port.  A reload builds
    a new tree with the long-lived parts of the old one passed in (the
    upstream pool when its settings are the same, the metrics, the health
    state, the policy gate built around the old counting store, the cache's
    store and series).

    :param cache_store: the response cache's store, instead of the one
        ``config.cache`` names.
    :param upstream: what every route sends its requests through (any
        :class:`~twisted_forward.upstream.IUpstream`); by default a new
        :class:`~twisted_forward.upstream.Upstream` pool for ``config``.
    """
    if metrics is None:
        metrics = Metrics()
    if upstream is None:
        upstream = Upstream(
            reactor,
            config.connect_timeout,
            proxy=config.proxy,
            ssl_cert_file=config.ssl_cert_file,
            max_head=config.max_upstream_head,
            max_headers=config.max_upstream_headers,
        )
    reserved = (config.admin_key,) if config.admin_key else ()
    openai_keys = KeyRules(
        DefaultKeys(config.default_keys, reactor.seconds, config.policy.key_levels),
        ForwardKeys(config.forward_keys),
        config.policy.policies.levels,
        reserved=reserved,
    )
    if policy is None:
        policy = build_gate(config.policy, reactor, metrics, store=store)
    key_health = None
    if store is not None and config.default_keys:
        key_health = KeyHealthLink(openai_keys.default, config.default_keys, store, reactor)
    metrics.watch_keys(openai_keys.default)
    for chat in recorder.recorders if isinstance(recorder, FanOut) else (recorder,):
        if isinstance(chat, ChatRecorder):
            metrics.watch_chat_records(chat.counts)
    if ledger is not None:
        metrics.watch("ledger", LedgerCollector(ledger.stats))
    passthrough = KeyRules(DefaultKeys((), reactor.seconds), ForwardKeys(()), reserved=reserved)
    if cache_metrics is None:
        # Registered once per registry: a reload hands the same one on.
        cache_metrics = CacheMetrics(metrics.registry)
    cache = build_cache(
        config.cache, config.forward_keys, reactor, cache_metrics, cache_store,
        config.ssl_cert_file,
    )
    _, _, upstream_cap = resolve_caps(config)
    slots = UpstreamSlots(upstream_cap)
    proxies = [
        ProxyResource(
            route,
            upstream,
            openai_keys if route.kind == "openai" else passthrough,
            reactor,
            config.read_timeout,
            config.idle_timeout,
            recorder,
            metrics,
            cache=cache,
            policy=policy if route.kind == "openai" else None,
            upstream_slots=slots,
        )
        for route in config.routes
    ]
    admin = None
    if config.admin_key is not None:
        if limits is None and policy is not None:
            limits = PolicyLimits(policy, reactor)
        admin = build_admin(
            config, reactor, openai_keys.default, metrics,
            ledger if isinstance(ledger, LiveTally) else LiveTally(ledger), limits
        )
    if health is None:
        health = Health()
    router = Router(
        [(p.route.prefix, p) for p in proxies],
        health,
        config.healthz_path,
        public_metrics(config, metrics),
        config.metrics_path,
        admin.resource if admin is not None and config.admin_port is None else None,
        Cors(config.cors_origins),
    )
    gate = AccessGate(
        config.ip_whitelist, config.ip_blacklist, config.trusted_proxies,
        exempt_paths=router.health_paths,
    )
    return Built(
        router, proxies, upstream, health, openai_keys, metrics, gate,
        cache=cache, policy=policy, ledger=ledger, admin=admin, head_checks=(gate, router),
        cache_metrics=cache_metrics, shared_store=store, key_health=key_health,
    )


def make_site(
    built: Built,
    config: Config,
    reactor: IReactorTime,
    timeout: Optional[float] = CLIENT_IDLE_TIMEOUT,
) -> ForwardSite:
    """The proxy's site for a built tree: its body cap, head checks,
    deadlines and connection caps from ``config``."""
    total, per_client, _ = resolve_caps(config)
    limits = ConnectionLimits(
        total, per_client, TrustedProxies(config.trusted_proxies), reactor.seconds
    )
    return ForwardSite(
        built.root,
        reactor=reactor,
        max_request_body=config.max_request_body,
        metrics=built.metrics,
        head_checks=built.head_checks,
        cors=Cors(config.cors_origins),
        limits=limits,
        head_timeout=config.request_head_timeout,
        body_timeout=config.request_body_timeout,
        timeout=timeout,
    )
