"""
End-to-end harness: the real plugin service on a loopback port, in front of
the fake upstream, with a real HTTP client, all cleaned up without sleeps.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, IServiceCollection
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IProtocolNegotiationFactory,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import alsoProvides, implementer

from twisted_forward.config import ConfigError
from twisted_forward.listening import BoundEndpoint, endpoint_from_string
from twisted_forward.tap import Options, makeService

from .fake_upstream import FakeOpenAI, fake_site


def listeners(service: IService) -> list[StreamServerEndpointService]:
    """The listening services of a service tree built by makeService, in
    order (the proxy's port first); each one's ``endpoint`` is a
    :class:`~twisted_forward.listening.BoundEndpoint` whose ``port`` is
    already bound."""
    found = [s for s in IServiceCollection(service) if isinstance(s, StreamServerEndpointService)]
    assert all(isinstance(s.endpoint, BoundEndpoint) for s in found)
    return found

class _Observed(ProtocolWrapper):
    """Stands between a transport and one protocol to see the connection
    begin and end.

    Unlike :class:`~twisted.protocols.policies.ProtocolWrapper`, it hands
    the wrapped protocol the real transport: what the protocol writes goes
    straight to the socket, so the proxy under test runs on the same TCP
    (or TLS) transport as in production.
    """

    factory: "ConnectionTracker"

    def makeConnection(self, transport: ITransport) -> None:
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        for observe in self.factory.on_connect:
            observe(transport)
        self.wrappedProtocol.makeConnection(transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            self.wrappedProtocol.connectionLost(reason)
        finally:
            self.factory.connection_ended(self, reason)


class ConnectionTracker(WrappingFactory):
    """Wraps a server factory (listen on the tracker, not on the factory) to
    count its open connections, tell when all are closed, and keep how each
    one ended: a clean close (``ConnectionDone``, a FIN) or an abort
    (``ConnectionLost``: a reset, or the connection dropped).

    :ivar endings: the reason each closed connection ended, in order.
    :ivar on_connect: called with each new connection's transport before
        the wrapped protocol gets it.
    """

    protocol = _Observed

    def __init__(self, factory: IProtocolFactory) -> None:
        super().__init__(factory)
        if IProtocolNegotiationFactory.providedBy(factory):
            # TLS asks the factory it wraps for the ALPN protocols (a Site
            # offers http/1.1): without them it refuses clients that send ALPN.
            alsoProvides(self, IProtocolNegotiationFactory)
        self.endings: list[Failure] = []
        self.on_connect: list[Callable[[ITransport], object]] = []
        self._waiters: list[defer.Deferred[None]] = []

    def acceptableProtocols(self) -> list[bytes]:
        """The wrapped factory's ALPN protocols (when it has any)."""
        return list(IProtocolNegotiationFactory(self.wrappedFactory).acceptableProtocols())

    @property
    def open(self) -> int:
        """How many connections are open now."""
        return len(self.protocols)

    def buildProtocol(self, addr: IAddress) -> Optional[_Observed]:  # type: ignore[override]  # WrappingFactory declares its own wrapper class
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        return self.protocol(self, inner)

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        """Not used: :meth:`connection_ended` is called once the wrapped
        protocol has seen the loss."""

    def connection_ended(self, p: ProtocolWrapper, reason: Failure) -> None:
        """``p``'s connection ended for ``reason``."""
        del self.protocols[p]
        self.endings.append(reason)
        if not self.protocols:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def closed(self) -> defer.Deferred[None]:
        """Fires once no connection is open (at once if none is)."""
        if not self.protocols:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(d)
        return d

    def clean_closes(self) -> int:
        """How many connections ended with a clean close (a FIN)."""
        return sum(1 for r in self.endings if r.check(ConnectionDone) is not None)

    def aborts(self) -> int:
        """How many connections ended otherwise (a reset, or dropped)."""
        return len(self.endings) - self.clean_closes()


@implementer(IStreamServerEndpoint)
class TrackedEndpoint:
    """An endpoint that listens with a :class:`ConnectionTracker` around the
    factory it is given: how the harness watches the proxy's connections
    through ``makeService(..., endpoint=)``, a public parameter.

    :ivar tracker: the tracker, once ``listen`` was called.
    """

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self.endpoint = endpoint
        self.tracker: Optional[ConnectionTracker] = None

    def listen(self, factory: IProtocolFactory) -> "defer.Deferred[IListeningPort]":
        self.tracker = ConnectionTracker(factory)
        return self.endpoint.listen(self.tracker)


def listen_tracked(factory: IProtocolFactory) -> tuple[IListeningPort, ConnectionTracker]:
    """Listen on 127.0.0.1 (a port the OS picks) with ``factory`` inside a
    :class:`ConnectionTracker`; returns the port and the tracker."""
    tracker = ConnectionTracker(factory)
    return reactor.listenTCP(0, tracker, interface="127.0.0.1"), tracker


def proxy_env(upstream_port: int, **extra: str) -> dict[str, str]:
    """An environment pointing the proxy at the fake upstream."""
    env = {
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}",
        "LOG_CHAT": "false",
    }
    env.update(extra)
    return env


class ProxyTestCase(TestCase):
    """Starts the fake upstream; ``start_proxy`` starts the real plugin."""

    timeout = 30
    #: Settings every proxy of this test case starts with (a test's own win):
    #: e.g. ``{"METRICS": "public"}`` for tests that scrape /metrics on the
    #: public port without the admin key.
    proxy_settings: dict[str, str] = {}

    def setUp(self) -> None:
        self.fake = FakeOpenAI()
        self.fake_port, self.fake_tracker = listen_tracked(fake_site(self.fake))
        self.upstream_port = self.fake_port.getHost().port
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.agent = Agent(reactor, pool=self.pool)
        self.client = HTTPClient(self.agent)
        self.addCleanup(self._stop_upstream)
        self.addCleanup(self.pool.closeCachedConnections)

    @defer.inlineCallbacks
    def _stop_upstream(self):
        yield self.fake_port.stopListening()
        yield self.fake_tracker.closed()

    def start_service(
        self, port: str, args: Optional[list[str]] = None, **env: str
    ) -> defer.Deferred:
        """Start the plugin's service on the endpoint ``port``; returns the
        listening port.  Stopped (and its connections waited for) at cleanup."""
        options = Options()
        options.parseOptions(["--port", port, "--env-file", os.devnull] + list(args or []))
        environ = proxy_env(self.upstream_port, **{**self.proxy_settings, **env})
        try:
            endpoint: Optional[TrackedEndpoint] = TrackedEndpoint(
                endpoint_from_string(reactor, options["endpoint"], "--port")
            )
        except ConfigError:
            endpoint = None  # makeService says why, as it does for a user
        self.service = makeService(options, reactor=reactor, environ=environ, endpoint=endpoint)
        listener = listeners(self.service)[0]
        self.site = listener.factory
        assert endpoint is not None and endpoint.tracker is not None
        self.proxy_tracker = endpoint.tracker
        self.service.startService()
        self.addCleanup(self._stop_proxy)
        # Bound while the service was built (twisted_forward.listening).
        listening = listener.endpoint.port
        self.listening_port = listening
        return defer.succeed(listening)

    @defer.inlineCallbacks
    def start_proxy(
        self, args: Optional[list[str]] = None, **env: str
    ) -> defer.Deferred:
        """Start the plugin's service on loopback TCP; returns its base URL."""
        port = yield self.start_service("tcp:0:interface=127.0.0.1", args, **env)
        self.proxy_port = port.getHost().port
        self.base = f"http://127.0.0.1:{self.proxy_port}"
        return self.base

    @defer.inlineCallbacks
    def _stop_proxy(self):
        yield self.pool.closeCachedConnections()
        if self.service.running:
            yield self.service.stopService()
        yield self.proxy_tracker.closed()

    def url(self, path: str) -> str:
        return self.base + path

    @defer.inlineCallbacks
    def open_stream(self, path: str = "/v1/chat/completions") -> defer.Deferred:
        """POST a streamed chat request; returns (response, Collector) with
        the body flowing into the collector."""
        response = yield self.client.post(
            self.url(path),
            data=json.dumps({"model": "m", "stream": True, "messages": []}).encode(),
            headers={b"content-type": b"application/json"},
            unbuffered=True,
        )
        collector = Collector()
        response.deliverBody(collector)
        return response, collector


class Collector(Protocol):
    """Collects a streamed body; ``on_data`` lets a test react to each chunk."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: defer.Deferred = defer.Deferred()
        self.got_data: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        d, self.got_data = self.got_data, defer.Deferred()
        d.callback(data)

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.done.callback(None)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


# Every end-to-end test is watched for leaked keys and for client-identifying
# headers reaching the upstream (tests/secrets_watch.py).
from .secrets_watch import watch_secrets  # noqa: E402

ProxyTestCase.start_service = watch_secrets(ProxyTestCase.start_service)  # type: ignore[method-assign]  # wrapped once, for every subclass
