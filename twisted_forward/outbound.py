"""
Reaching the upstream through an outbound HTTP proxy (PROXY), and the TLS
trust the upstream connections use (SSL_CERT_FILE).

Plain ``http://`` upstreams go through the proxy as ordinary requests with
an absolute-form target (Twisted's ``ProxyAgent``).  ``https://`` upstreams
go through a ``CONNECT host:port`` tunnel, which Twisted's ``ProxyAgent``
cannot open: :class:`TunnelEndpoint` connects to the proxy, sends the
CONNECT, waits for a 2xx answer and only then hands the raw connection on,
so that ``wrapClientTLS`` runs TLS *through* the tunnel, verified against
the upstream's own host name.  An :class:`~twisted.web.client.Agent` built
on these endpoints pools the tunnelled connections per upstream host.

The proxy's credentials (PROXY's user info) go in a ``Proxy-Authorization``
header to the proxy only: on the CONNECT request, or on each plain-HTTP
request (which the proxy strips).  Inside a tunnel the upstream never sees
them, and no log line or exception text holds them.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from typing import Any, Optional
from urllib.parse import urlsplit

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ProxyAgent,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IPolicyForHTTPS,
    IResponse,
)
from zope.interface import implementer

from .config import ProxyURL
from .relay import discard
from .trust import load_trust_root, read_ca_file  # noqa: F401 (read_ca_file: the tests')

#: The longest CONNECT answer head accepted from the proxy.
MAX_CONNECT_HEAD = 16 * 1024

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?\Z")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


class OutboundProxyError(error.ConnectError):
    """The outbound proxy did not open a CONNECT tunnel, or asked for
    credentials (407) on a plain request.

    :ivar status: the proxy's answer status (407, 403, 502, ...), or None
        when it gave no readable answer.
    """

    MESSAGE = "The outbound proxy refused the request"

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(string=message)
        self.status = status


def proxy_authorization(proxy: ProxyURL) -> Optional[bytes]:
    """The ``Proxy-Authorization`` value for PROXY's user info, if any (Basic)."""
    if proxy.credentials is None:
        return None
    user, password = proxy.credentials
    token = base64.b64encode(f"{user}:{password}".encode())
    return b"Basic " + token


def tls_policy(ssl_cert_file: Optional[str] = None) -> IPolicyForHTTPS:
    """Browser-like upstream TLS: the system's CAs, or those in ``ssl_cert_file``."""
    if ssl_cert_file is None:
        return BrowserLikePolicyForHTTPS()
    return BrowserLikePolicyForHTTPS(trustRoot=load_trust_root(ssl_cert_file))


def _authority(host: bytes, port: int) -> bytes:
    if b":" in host and not host.startswith(b"["):
        host = b"[" + host + b"]"
    return host + b":%d" % port


def _printable(data: bytes, limit: int = 80) -> str:
    return _UNPRINTABLE.sub("?", data[:limit].decode("latin-1"))


class _Tunnel(Protocol):
    """One CONNECT exchange on a fresh proxy connection, then a byte pipe.

    Until the proxy's 2xx answer it speaks HTTP to the proxy; afterwards
    every byte in either direction belongs to the protocol built from the
    endpoint's factory (the TLS layer, in practice).
    """

    #: The proxy connection (a TCP connection, set before connectionMade).
    transport: ITCPTransport

    def __init__(
        self,
        clock: IReactorTime,
        target: bytes,
        authorization: Optional[bytes],
        factory: IProtocolFactory,
        timeout: float,
    ) -> None:
        self._target = target
        self._authorization = authorization
        self._factory = factory
        self._buffer = b""
        self._wrapped: Optional[IProtocol] = None
        self._connecting: Optional[Deferred[Protocol]] = None
        #: Whether ``ready`` has its outcome (or will: it was cancelled).
        self._settled = False
        self.ready: Deferred[IProtocol] = Deferred(self._cancel)
        self._timer: Optional[IDelayedCall] = clock.callLater(timeout, self._timed_out)

    def start(self, proxy: IStreamClientEndpoint) -> "Deferred[IProtocol]":
        """Connect to the proxy; the result fires once the tunnel is open."""
        self._connecting = connectProtocol(proxy, self)
        self._connecting.addErrback(self._fail)
        return self.ready

    # ------------------------------------------------------------ set-up

    def connectionMade(self) -> None:
        self._connecting = None
        lines = [
            b"CONNECT " + self._target + b" HTTP/1.1",
            b"Host: " + self._target,
        ]
        if self._authorization is not None:
            lines.append(b"Proxy-Authorization: " + self._authorization)
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        if self._wrapped is not None:
            self._wrapped.dataReceived(data)
            return
        if self._settled:
            return  # failed; the connection is being aborted
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_CONNECT_HEAD:
                self._refuse("its answer to CONNECT is too long")
            return
        head, rest = self._buffer[:end], self._buffer[end + 4 :]
        self._buffer = b""
        status_line = head.split(b"\r\n", 1)[0]
        match = _STATUS_LINE.match(status_line)
        if match is None:
            self._refuse(f"it gave no HTTP answer to CONNECT: {_printable(status_line)!r}")
            return
        status = int(match.group(1))
        if not 200 <= status < 300:
            reason = _printable(match.group(2) or b"")
            self._refuse(f"it answered CONNECT with {status} {reason}".rstrip(), status)
            return
        self._open(rest)

    def _open(self, rest: bytes) -> None:
        """The tunnel is up: hand the connection to the wrapped protocol."""
        self._stop_timer()
        wrapped = self._factory.buildProtocol(self.transport.getPeer())
        if wrapped is None:
            self._refuse("the tunnel's protocol factory refused the connection")
            return
        self._wrapped = wrapped
        self._settled = True
        wrapped.makeConnection(self.transport)
        self.ready.callback(wrapped)
        if rest:
            wrapped.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._wrapped is not None:
            self._wrapped.connectionLost(reason)
            return
        self._fail(
            Failure(OutboundProxyError("it closed the connection before answering CONNECT"))
        )

    # ------------------------------------------------------------ failure

    def _refuse(self, message: str, status: Optional[int] = None) -> None:
        self._fail(Failure(OutboundProxyError(message, status)))
        self.transport.abortConnection()

    def _fail(self, failure: Failure) -> None:
        self._stop_timer()
        if not self._settled:
            self._settled = True
            self.ready.errback(failure)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _abandon(self) -> None:
        """Stop whatever is under way: the connection attempt or the CONNECT."""
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        elif self.transport is not None:
            self.transport.abortConnection()

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(Failure(error.TimeoutError("opening a tunnel through the outbound proxy")))
        self._abandon()

    def _cancel(self, ready: "Deferred[IProtocol]") -> None:
        # Left unfired here, ``ready`` fails with CancelledError.
        self._stop_timer()
        self._settled = True
        self._abandon()


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """A raw connection to ``host:port`` through an HTTP proxy's CONNECT.

    :param proxy: how to reach the proxy itself.
    :param authorization: the ``Proxy-Authorization`` value, or None.
    :param timeout: seconds for connecting to the proxy and getting its
        answer to CONNECT together; past it the attempt fails with
        :class:`twisted.internet.error.TimeoutError`.
    """

    def __init__(
        self,
        clock: IReactorTime,
        proxy: IStreamClientEndpoint,
        host: bytes,
        port: int,
        authorization: Optional[bytes],
        timeout: float,
    ) -> None:
        self._clock = clock
        self._proxy = proxy
        self._target = _authority(host, port)
        self._authorization = authorization
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> "Deferred[IProtocol]":
        """Open the tunnel, then connect ``protocolFactory``'s protocol to it."""
        tunnel = _Tunnel(
            self._clock, self._target, self._authorization, protocolFactory, self._timeout
        )
        return tunnel.start(self._proxy)


@implementer(IAgentEndpointFactory)
class TunnelEndpointFactory:
    """Endpoints for ``https://`` URIs: TLS, verified for the URI's host,
    inside a CONNECT tunnel through the proxy."""

    def __init__(
        self,
        clock: IReactorTime,
        proxy: IStreamClientEndpoint,
        authorization: Optional[bytes],
        timeout: float,
        policy: IPolicyForHTTPS,
    ) -> None:
        self._clock = clock
        self._proxy = proxy
        self._authorization = authorization
        self._timeout = timeout
        self._policy = policy

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme != b"https":
            raise ValueError("only https:// URIs go through a CONNECT tunnel")
        tunnel = TunnelEndpoint(
            self._clock, self._proxy, uri.host, uri.port, self._authorization, self._timeout
        )
        return wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), tunnel)


@implementer(IAgent)
class OutboundProxyAgent:
    """An agent that reaches every upstream through one HTTP proxy.

    ``http://`` URLs: a request to the proxy with the absolute URL as its
    target, the proxy's connections pooled together.  ``https://`` URLs: a
    CONNECT tunnel with TLS inside, pooled per upstream host and port.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        proxy: ProxyURL,
        pool: HTTPConnectionPool,
        connect_timeout: float,
        policy: IPolicyForHTTPS,
        proxy_endpoint: Optional[IStreamClientEndpoint] = None,
    ) -> None:
        if proxy_endpoint is None:
            parts = urlsplit("//" + proxy.netloc)
            assert parts.hostname is not None  # a ProxyURL always names a host
            proxy_endpoint = HostnameEndpoint(
                reactor, parts.hostname, parts.port or 80, timeout=connect_timeout
            )
        self._authorization = proxy_authorization(proxy)
        self._plain = ProxyAgent(proxy_endpoint, reactor, pool)
        self._tunnelled = Agent.usingEndpointFactory(
            reactor,
            TunnelEndpointFactory(
                reactor, proxy_endpoint, self._authorization, connect_timeout, policy
            ),
            pool,
        )

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> "Deferred[IResponse]":
        if uri[:8].lower() == b"https://":
            return self._tunnelled.request(method, uri, headers, bodyProducer)
        if self._authorization is not None:
            headers = headers.copy() if headers is not None else Headers()
            headers.setRawHeaders(b"proxy-authorization", [self._authorization])
        d = self._plain.request(method, uri, headers, bodyProducer)
        d.addCallback(_refuse_407)
        return d


def _refuse_407(response: IResponse) -> IResponse:
    """A 407 is the outbound proxy's, never an upstream's (RFC 9110 §15.5.8):
    a failure of ours, not an answer for the client."""
    if response.code != 407:
        return response
    discard(response)
    raise OutboundProxyError(
        "it answered 407 Proxy Authentication Required (check PROXY's user info)", 407
    )


@implementer(IAgentEndpointFactory)
class _CachedEndpoints:
    """One endpoint per upstream origin, made once.

    Twisted's Agent builds a new endpoint for every request, IDNA-encoding
    the host each time (a few percent of the proxy's time per request); the
    set of upstreams is fixed at start-up.
    """

    def __init__(self, factory: IAgentEndpointFactory) -> None:
        self._factory = factory
        self._endpoints: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: URI) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._factory.endpointForURI(uri)
        return endpoint


@implementer(IAgentEndpointFactory)
class DirectEndpoints:
    """Endpoints straight to an upstream: TLS for ``https``, verified by
    ``policy``.

    An IP-literal upstream gets a plain TCP endpoint: ``HostnameEndpoint``
    would "resolve" it through the thread pool on every new connection.
    """

    def __init__(self, reactor: Any, policy: IPolicyForHTTPS, connect_timeout: float) -> None:
        self._reactor = reactor
        self._policy = policy
        self._timeout = connect_timeout

    def endpointForURI(self, uri: URI) -> Any:
        host = uri.host.decode("ascii").strip("[]")
        version: int
        try:
            version = ipaddress.ip_address(host).version
        except ValueError:
            version = 0
        if version == 4:
            endpoint: Any = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        elif version == 6:
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            creator = self._policy.creatorForNetloc(uri.host, uri.port)
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint


def upstream_agent(
    reactor: IReactorTime,
    pool: HTTPConnectionPool,
    connect_timeout: float,
    proxy: Optional[ProxyURL] = None,
    ssl_cert_file: Optional[str] = None,
) -> IAgent:
    """The agent the proxy reaches its upstreams with: direct, or through
    PROXY; TLS verified against the system's CAs or SSL_CERT_FILE's."""
    policy = tls_policy(ssl_cert_file)
    if proxy is None:
        endpoints = _CachedEndpoints(DirectEndpoints(reactor, policy, connect_timeout))
        return Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    return OutboundProxyAgent(reactor, proxy, pool, connect_timeout, policy)
