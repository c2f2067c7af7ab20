"""
End-to-end harness: the real plugin service on a loopback port, in front of
the fake upstream, with a real HTTP client, all cleaned up without sleeps.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, IServiceCollection
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from twisted_forward.listening import BoundEndpoint
from twisted_forward.tap import Options, makeService

from .fake_upstream import FakeOpenAI, listen_fake


def listeners(service: IService) -> list[StreamServerEndpointService]:
    """The listening services of a service tree built by makeService, in
    order (the proxy's port first); each one's ``endpoint`` is a
    :class:`~twisted_forward.listening.BoundEndpoint` whose ``port`` is
    already bound."""
    found = [s for s in IServiceCollection(service) if isinstance(s, StreamServerEndpointService)]
    assert all(isinstance(s.endpoint, BoundEndpoint) for s in found)
    return found

class ConnectionTracker:
    """Counts a factory's open connections; tells when all are closed."""

    def __init__(self, factory: Factory) -> None:
        self.open = 0
        self._waiters: list[defer.Deferred] = []
        original = factory.buildProtocol

        def build(addr):
            protocol = original(addr)
            if protocol is None:
                return None
            self.open += 1
            lost = protocol.connectionLost

            def connection_lost(reason, _lost=lost):
                try:
                    return _lost(reason)
                finally:
                    self.open -= 1
                    if not self.open:
                        waiters, self._waiters[:] = list(self._waiters), []
                        for d in waiters:
                            d.callback(None)

            protocol.connectionLost = connection_lost
            return protocol

        factory.buildProtocol = build

    def closed(self) -> defer.Deferred:
        if not self.open:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        return d


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
        from twisted.web.server import Site

        self.fake_port = listen_fake(self.fake)
        self.fake_tracker = ConnectionTracker(self.fake_port.factory)
        self.upstream_port = self.fake_port.getHost().port
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.agent = Agent(reactor, pool=self.pool)
        self.client = HTTPClient(self.agent)
        self.addCleanup(self._stop_upstream)
        self.addCleanup(self.pool.closeCachedConnections)
        del Site

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
        self.service = makeService(options, reactor=reactor, environ=environ)
        listener = listeners(self.service)[0]
        self.site = listener.factory
        self.proxy_tracker = ConnectionTracker(self.site)
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

ProxyTestCase.start_service = watch_secrets(ProxyTestCase.start_service)  # type: ignore[method-assign]
