"""
The test harness's own promises: the connection tracker tells a clean close
from an abort and leaves the real transport to the protocol it watches, and
the secrets watch sees the bytes the proxy sends.  A harness that cannot
see these would let the end-to-end tests pass whatever the proxy does.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.tcp import Server
from twisted.trial.unittest import TestCase

from .harness import ProxyTestCase, listen_tracked


class _Server(Protocol):
    """Records the transport it was given; ends when told to."""

    transports: list[Any] = []

    def connectionMade(self) -> None:
        self.transports.append(self.transport)


class ConnectionTrackerTests(TestCase):
    """``ConnectionTracker`` over a plain TCP server."""

    def setUp(self) -> None:
        _Server.transports = []
        self.port, self.tracker = listen_tracked(Factory.forProtocol(_Server))
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def connect(self) -> Any:
        accepted: defer.Deferred[None] = defer.Deferred()
        self.tracker.on_connect[:] = [lambda transport: accepted.callback(None)]
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        client = yield connectProtocol(endpoint, Protocol())
        yield accepted  # the server's side may accept a turn later
        return client

    @defer.inlineCallbacks
    def test_clean_close_and_abort_told_apart(self) -> Any:
        """A client that closes (FIN) counts as a clean close and one that
        aborts (RST) as an abort, and ``closed()`` fires only once both
        connections are gone: tests that promise a graceful close rely on
        this difference."""
        clean = yield self.connect()
        abort = yield self.connect()
        self.assertEqual(self.tracker.open, 2)
        waiting = self.tracker.closed()
        clean.transport.loseConnection()
        abort.transport.abortConnection()
        yield waiting
        self.assertEqual((self.tracker.clean_closes(), self.tracker.aborts()), (1, 1))

    @defer.inlineCallbacks
    def test_protocol_keeps_the_real_transport(self) -> Any:
        """The watched protocol writes to the TCP transport itself, not to
        a wrapper: the proxy under test runs on what production runs."""
        client = yield self.connect()
        self.assertIsInstance(_Server.transports[0], Server)
        client.transport.loseConnection()
        yield self.tracker.closed()


class SecretsWatchTapTests(ProxyTestCase):
    """The secrets watch reads what the proxy sends to its clients."""

    @defer.inlineCallbacks
    def test_watch_sees_sent_bytes_and_flags_a_key_in_them(self) -> Any:
        """The bytes of an answer reach the watch, and a key among them
        would be reported: without the tap, a key echoed to a client would
        go unnoticed by every end-to-end test."""
        yield self.start_proxy(OPENAI_API_KEY="sk-harness-secret-0123456789")
        response = yield self.client.get(self.url("/v1/models"))
        body = yield response.content()
        self.assertEqual(json.loads(body)["object"], "list")
        watch = self.secrets_watch
        self.assertIn(body, b"".join(watch.written))
        self.assertEqual(watch.leaks(self), [])
        watch.written.append(b"echo: Bearer sk-harness-secret-0123456789")
        self.assertIn("default key #0 in the bytes sent to a client", watch.leaks(self))
        watch.written.pop()
