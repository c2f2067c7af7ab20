"""
Reaching the upstream: URL joining, the client (an ``IAgent``, not treq), request bodies.
(What a client may ask for, the incoming target, is :mod:`.target`.)

The upstream URL is always the configured origin followed by the client's
path, so nothing a client sends (``//evil.com/x``, ``@evil.com``, an
absolute-form target) can change the host the proxy talks to.

The requests go straight through a Twisted ``IAgent`` (public API) and come
back as a plain ``IResponse``.  treq's ``HTTPClient.request`` stacks a
``CookieAgent`` (one jar shared by every user of the proxy), a
``RedirectAgent`` and a ``ContentDecoderAgent`` (which adds
``Accept-Encoding: gzip`` and gunzips answers) on every call and re-parses
the URL with hyperlink: a proxy wants none of it (no cookies kept, redirects
relayed, bodies byte for byte), and it cost about 30% of the proxy's CPU per
request.  Calling the agent directly gives exactly what the proxy needs
without reaching into treq's private ``_agent``/``_cookiejar``/``_Response``;
the relay only ever uses ``IResponse`` (code, headers, length,
``deliverBody``).
"""

from __future__ import annotations

import re
from typing import Optional

from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.web.client import URI, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import Interface, implementer

from .config import ProxyURL, UpstreamURL
from .outbound import upstream_agent
from .upstream_http import MAX_HEAD, MAX_HEADERS, guard_pool

_UNSAFE = re.compile(rb"[^\x21-\x7e]|#")


def _escape(match: "re.Match[bytes]") -> bytes:
    return b"%%%02X" % match.group(0)[0]


def join_url(base: UpstreamURL, path: bytes, query: bytes) -> bytes:
    """The upstream URL for a client path under ``base``.

    :param path: the raw path after any route prefix, starting with ``/``
        (or empty, for the base itself).
    :param query: ``b""`` or the raw query with its leading ``?``.
    """
    from .loops import join_path

    tail = _UNSAFE.sub(_escape, path + query)
    return base.origin.encode("ascii") + join_path(base.path, tail)


def host_value(url: bytes) -> bytes:
    """The ``Host`` header Twisted's ``Agent`` would send for ``url``: its
    host (bracketed when IPv6) and its port unless the scheme's default."""
    parsed = URI.fromBytes(url)
    host = parsed.host
    if isIPv6Address(host.decode("ascii")):
        host = b"[" + host + b"]"
    if (parsed.scheme, parsed.port) in ((b"http", 80), (b"https", 443)):
        return host
    return b"%b:%d" % (host, parsed.port)


def host_header(base: UpstreamURL) -> bytes:
    """The ``Host`` value for requests to ``base``, as ``Agent`` writes it
    (``host``, ``host:port`` off the scheme's default port, IPv6 literals in
    brackets).

    Computed once per route: a request whose headers carry a Host is sent as
    given, while one without gets a copy of all its headers from ``Agent``
    (held for the whole answer: about 800 bytes an open stream).
    """
    uri = URI.fromBytes(base.origin.encode("ascii"))
    host = b"[%s]" % uri.host if b":" in uri.host else uri.host
    if (uri.scheme, uri.port) in ((b"http", 80), (b"https", 443)):
        return host
    return b"%s:%d" % (host, uri.port)


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one go."""

    __slots__ = ("_body", "length")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> "Deferred[None]":
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class IUpstream(Interface):
    """What an exchange sends its request upstream through (the extension
    point for another HTTP client: a recording double, a different pool).

    :class:`Upstream` is the proxy's; :func:`~twisted_forward.site.build_root`
    takes any provider and hands it to every route's
    :class:`~twisted_forward.exchange.ProxyResource`.
    """

    def request(
        method: bytes, url: bytes, headers: Headers, body: Optional[IBodyProducer]
    ) -> "Deferred[IResponse]":
        """Send one request exactly as given (no redirects followed, no
        cookies kept, the body untouched); fire with the answer's head, its
        body unread (``IResponse.deliverBody``).  Cancelling the Deferred
        abandons the request.

        :param url: an absolute URI, already encoded (see :func:`join_url`).
        """

    def close() -> "Deferred[None]":
        """Let go of idle connections (at shutdown, or when a reload
        replaces this client); requests in flight are not cut."""


@implementer(IUpstream)
class Upstream:
    """The proxy's HTTP client: one connection pool, no cookies, no redirects.

    :param proxy: the outbound proxy (PROXY) to reach upstreams through.
    :param ssl_cert_file: a PEM file of the CAs trusted for upstream TLS
        instead of the system's (SSL_CERT_FILE).
    :param max_head: the largest answer head accepted, in bytes
        (MAX_UPSTREAM_HEAD).
    :param max_headers: the most header lines accepted in an answer head
        (MAX_UPSTREAM_HEADERS).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        connect_timeout: float,
        agent: Optional[IAgent] = None,
        max_persistent_per_host: int = 256,
        proxy: Optional[ProxyURL] = None,
        ssl_cert_file: Optional[str] = None,
        max_head: int = MAX_HEAD,
        max_headers: int = MAX_HEADERS,
    ) -> None:
        if agent is None:
            pool = HTTPConnectionPool(reactor, persistent=True)
            # Our client protocol: bounded answer heads, no reuse after an
            # answer that ends with its head (twisted_forward.upstream_http).
            guard_pool(pool, max_head, max_headers)
            pool.maxPersistentPerHost = max_persistent_per_host
            pool.cachedConnectionTimeout = 60
            self.pool: Optional[HTTPConnectionPool] = pool
            agent = upstream_agent(reactor, pool, connect_timeout, proxy, ssl_cert_file)
        else:
            self.pool = None
        self._reactor = reactor
        self._agent = agent
        #: Host header values by origin; the origins are the configured ones.
        self._host_values: dict[bytes, bytes] = {}

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: Optional[IBodyProducer],
    ) -> "Deferred[IResponse]":
        """Send a request exactly as given; the Deferred fires with the head.

        :param url: an absolute URI, already encoded (see :func:`join_url`).
        :param headers: this request's own headers: a ``Host`` is added to
            them (the value ``Agent`` would add to a copy of them).
        """
        if not headers.hasHeader(b"host"):
            # One Host value per origin (scheme://authority), worked out once:
            # the agent otherwise copies every request's headers to add it.
            slash = url.find(b"/", url.find(b"//") + 2)
            origin = url if slash < 0 else url[:slash]
            value = self._host_values.get(origin)
            if value is None:
                value = self._host_values[origin] = host_value(origin)
            headers.addRawHeader(b"host", value)
        return self._agent.request(method, url, headers, body)

    def close(self) -> "Deferred[None]":
        """Close idle pooled connections (at shutdown)."""
        if self.pool is None:
            return succeed(None)
        return self.pool.closeCachedConnections()


def response_length(response: IResponse) -> Optional[int]:
    """The upstream body's length when its framing says, else None."""
    length = response.length
    return None if length is UNKNOWN_LENGTH else int(length)
