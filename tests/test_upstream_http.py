"""
The upstream client protocol's guards, driven in memory: the head scanner fed
bytes, and the guarded protocol on a StringTransport (is a connection handed
back to the pool or closed?).  Also the canary for the private Twisted names
fenced in twisted_forward/_compat.py.
"""

from __future__ import annotations

import gc
import types

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool, Request, ResponseNeverReceived
from twisted.web.http_headers import Headers

from twisted_forward import _compat
from twisted_forward.upstream_http import (
    GuardedClientFactory,
    GuardedClientProtocol,
    HeadScanner,
    UpstreamHeadRefused,
    guard_pool,
    head_refusal,
)

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"


def scan(data: bytes, max_head: int = 1024, max_headers: int = 10, piece: int = 0):
    """Feed ``data`` to a fresh scanner (in ``piece``-byte reads if given)."""
    scanner = HeadScanner(max_head, max_headers)
    scanner.start()
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)] if piece else [data]
    for chunk in pieces:
        refusal = scanner.feed(chunk)
        if refusal is not None:
            return scanner, refusal
    return scanner, None


class HeadScannerTests(SynchronousTestCase):
    """What the head scanner lets through and what it refuses."""

    def test_ordinary_head(self):
        """A normal head passes, whole or a byte at a time, and the body after
        it is not scanned."""
        for piece in (0, 1, 7, len(HEAD) - 1):
            scanner, refusal = scan(HEAD + b"\x00\x01 body", piece=piece)
            self.assertIsNone(refusal)
            self.assertFalse(scanner.scanning)

    def test_interim_heads_then_the_answer(self):
        """1xx heads are scanned through to the final head."""
        scanner, refusal = scan(b"HTTP/1.1 100 Continue\r\n\r\n" + HEAD)
        self.assertIsNone(refusal)
        self.assertFalse(scanner.scanning)

    def test_too_many_lines(self):
        """One header line over the cap is refused."""
        lines = b"".join(b"X-%d: v\r\n" % i for i in range(11))
        for piece in (0, 1):
            _, refusal = scan(b"HTTP/1.1 200 OK\r\n" + lines + b"\r\n", piece=piece)
            self.assertEqual(refusal.code, "upstream_head_too_large")
            scanner, refusal = scan(
                b"HTTP/1.1 200 OK\r\n" + lines[: lines.index(b"X-10")] + b"\r\n", piece=piece
            )
            self.assertIsNone(refusal)
            self.assertFalse(scanner.scanning)

    def test_size_cap_in_one_read(self):
        """A whole head over the size cap in one read is refused too."""
        _, refusal = scan(b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 2000 + b"\r\n\r\n")
        self.assertEqual(refusal.code, "upstream_head_too_large")

    def test_too_large_without_a_newline(self):
        """A head over the size cap is refused before any line ends."""
        scanner, refusal = scan(b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 2000, piece=100)
        self.assertEqual(refusal.code, "upstream_head_too_large")
        self.assertLess(len(scanner._partial), 1024)

    def test_interim_heads_count_towards_the_caps(self):
        """Endless 1xx heads are refused by the size cap."""
        _, refusal = scan(b"HTTP/1.1 100 Continue\r\n\r\n" * 100)
        self.assertEqual(refusal.code, "upstream_head_too_large")

    def test_bad_lines(self):
        """Control bytes (not HTAB), a bare CR, a name that is not a token,
        a folded line: refused."""
        for line in (b"X: a\x01b", b"X: a\x00b", b"X: a\x7fb", b"X: a\rb", b"X Y: 1",
                     b": v", b"X(: 1", b" folded", b"\tfolded", b"no colon"):
            for piece in (0, 1):  # the one-read fast path and line by line
                _, refusal = scan(b"HTTP/1.1 200 OK\r\nA: 1\r\n" + line + b"\r\n\r\n", piece=piece)
                self.assertIsNotNone(refusal, line)
                self.assertEqual(refusal.code, "upstream_bad_head")

    def test_good_lines(self):
        """HTAB, obs-text, an empty value and LF-only line ends pass."""
        for line in (b"X: a\tb", b"X: caf\xe9", b"X:", b"X-A.b_c~1: v"):
            _, refusal = scan(b"HTTP/1.1 200 OK\n" + line + b"\n\n")
            self.assertIsNone(refusal, line)


class GuardedProtocolTests(SynchronousTestCase):
    """The guarded client protocol on a StringTransport."""

    def setUp(self) -> None:
        self.pooled: list = []
        factory = GuardedClientFactory(self.pooled.append, "test", 1024, 10)
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, method: bytes) -> Deferred:
        headers = Headers({b"host": [b"upstream.test"]})
        d = self.protocol.request(Request(method, b"/x", headers, None, persistent=True))
        self.answers: list = []
        d.addBoth(self.answers.append)
        return d

    def test_body_answer_is_pooled(self):
        """An answer with a body goes back to the pool once read."""
        self.send(b"GET")
        self.protocol.dataReceived(HEAD)
        [response] = self.answers
        response.deliverBody(_Sink())
        self.protocol.dataReceived(b"{}")
        self.assertEqual(self.pooled, [self.protocol])
        self.assertFalse(self.transport.disconnecting)

    def test_head_answer_is_not_pooled(self):
        """After an answer to HEAD, the connection is closed, not pooled."""
        self.send(b"HEAD")
        self.protocol.dataReceived(HEAD)
        self.assertEqual(self.answers[0].code, 200)
        self.assertEqual(self.pooled, [])
        self.assertTrue(self.transport.disconnecting)

    def test_204_is_not_pooled(self):
        """Nor after a 204."""
        self.send(b"GET")
        self.protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.answers[0].code, 204)
        self.assertEqual(self.pooled, [])
        self.assertTrue(self.transport.disconnecting)

    def test_refused_head_fails_the_request(self):
        """A refused head aborts the connection; the request fails with the
        refusal, which :func:`head_refusal` finds."""
        self.send(b"GET")
        self.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nX: \x01\r\n\r\n")
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)
        self.protocol.connectionLost(Failure(Exception("aborted")))
        [failure] = self.answers
        self.assertIsInstance(failure, Failure)
        self.assertIsInstance(head_refusal(failure), UpstreamHeadRefused)
        self.assertEqual(head_refusal(failure).code, "upstream_bad_head")

    def test_mid_answer_state_is_slotted(self):
        """Reading an answer's body, the protocol keeps Twisted's state and
        ours in slots: its instance dict stays empty, and the factory's
        (started, as an endpoint starts it) and the scanner's too."""
        self.send(b"GET")
        self.protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\ndata:\r\n"
        )
        [response] = self.answers
        response.deliverBody(_Sink())
        self.assertEqual(self.protocol.state, "WAITING")
        self.assertEqual(vars(self.protocol), {})
        factory = GuardedClientFactory(self.pooled.append, "test", 1024, 10)
        factory.doStart()
        self.assertEqual(factory.numPorts, 1)
        self.assertEqual(vars(factory), {})
        self.assertFalse(hasattr(self.protocol.scanner, "__dict__"))

    def test_connection_keeps_no_extras(self):
        """The factory keeps neither the endpoint description the pool makes
        for each connection nor a method bound to itself; each protocol's
        quiescent callback is one shared function, not a bound method."""
        metadata = f"HostnameEndpoint(upstream.test:443) {id(self)}"
        factory = GuardedClientFactory(self.pooled.append, metadata, 1024, 10)
        referents = gc.get_referents(factory)
        self.assertFalse(any(r is metadata for r in referents))
        self.assertFalse(any(isinstance(r, types.MethodType) for r in referents))
        protocol = factory.buildProtocol(None)
        self.assertFalse(
            any(isinstance(r, types.MethodType) for r in gc.get_referents(protocol))
        )
        self.assertIs(protocol.pool_callback.__self__, self.pooled)

    def test_starts_with_twisted_defaults(self):
        """A new protocol has the values Twisted's class attributes give
        (each slot hides one), and the factory's repr names its limits
        instead of recursing through its bound callback."""
        protocol = GuardedClientProtocol(self.pooled.append, 1024, 10)
        self.assertEqual(protocol.state, "QUIESCENT")
        self.assertIsNone(protocol.transport)
        self.assertEqual(protocol.connected, 0)
        self.assertFalse(protocol.awaiting_head)
        factory = GuardedClientFactory(self.pooled.append, "test", 1024, 10)
        self.assertEqual(factory.numPorts, 0)
        self.assertEqual(repr(factory), "<GuardedClientFactory max_head=1024 max_headers=10>")

    def test_head_refusal_ignores_other_failures(self):
        """Other failures are not refusals."""
        failure = Failure(ResponseNeverReceived([Failure(Exception("reset"))]))
        self.assertIsNone(head_refusal(failure))
        self.assertIsNone(head_refusal(Failure(Exception("x"))))


class _Sink:
    def makeConnection(self, transport) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason) -> None:
        pass


class _Endpoint:
    """Records the protocol factory a pool connects with."""

    def __init__(self) -> None:
        self.factories: list = []

    def connect(self, factory) -> Deferred:
        self.factories.append(factory)
        return Deferred()


class CompatCanaryTests(SynchronousTestCase):
    """The private Twisted names in _compat.py still mean what we rely on."""

    def test_factory_builds_the_protocol_with_the_callback(self):
        """``_HTTP11ClientFactory(callback, metadata).buildProtocol`` gives an
        ``HTTP11ClientProtocol`` that calls ``callback`` when quiescent."""
        called: list = []
        protocol = _compat.HTTP11ClientFactory(called.append, "m").buildProtocol(None)
        self.assertIsInstance(protocol, _compat.HTTP11ClientProtocol)

    def test_pool_connects_with_our_factory(self):
        """A pool given a factory through set_pool_factory connects with it."""
        pool = HTTPConnectionPool(MemoryReactorClock(), persistent=True)
        guard_pool(pool, 1024, 10)
        endpoint = _Endpoint()
        pool.getConnection(("k",), endpoint)
        [factory] = endpoint.factories
        self.assertIsInstance(factory, GuardedClientFactory)
        self.assertIsInstance(factory.buildProtocol(None), GuardedClientProtocol)
