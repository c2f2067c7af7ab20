"""
End-to-end: hostile framing and oversized bodies, as raw bytes on a real
socket to the real plugin in front of the fake upstream.

The upstream must see nothing of a refused request, and the proxy must keep
serving every other connection.
"""

from __future__ import annotations

import json
from typing import Optional

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from .fake_upstream import chat_chunks
from .harness import ProxyTestCase
from .test_framing import ADDED, CHUNKED_HELLO, TWISTED, parse_answer

#: How long a raw exchange may take before the test fails (not a sleep: the
#: test goes on as soon as the connection closes).
EXCHANGE_TIMEOUT = 10


class RawClient(Protocol):
    """Writes bytes when asked; collects everything until the connection
    closes, and keeps how it closed (``reason``: ``ConnectionDone`` for the
    peer's clean FIN, ``ConnectionLost`` for a reset)."""

    def __init__(self) -> None:
        self.received = b""
        self.reason: Optional[Failure] = None
        self.closed: defer.Deferred = defer.Deferred()
        self.got_data: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        d, self.got_data = self.got_data, defer.Deferred()
        d.callback(data)

    def connectionLost(self, reason=None) -> None:
        self.reason = reason
        self.closed.callback(self.received)


class RawTestCase(ProxyTestCase):
    """Raw TCP connections to the proxy."""

    @defer.inlineCallbacks
    def connect(self):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port)
        client = yield connectProtocol(endpoint, RawClient())
        self.addCleanup(client.transport.abortConnection)
        return client

    @defer.inlineCallbacks
    def exchange(self, data: bytes, clean: bool = True):
        """Write ``data``; return all the proxy sent once it closed.

        :param clean: assert the proxy closed with a FIN (a graceful close,
            after which the client can read the whole answer), not a reset;
            every refusal here does, so it is the default.
        """
        client = yield self.connect()
        client.transport.write(data)
        received = yield client.closed.addTimeout(EXCHANGE_TIMEOUT, reactor)
        if clean:
            self.assert_clean_close(client)
        return received

    def assert_clean_close(self, client: RawClient) -> None:
        """The proxy closed ``client``'s connection with a FIN, not a reset."""
        self.assertIsNotNone(client.reason)
        assert client.reason is not None
        self.assertIsInstance(
            client.reason.value, ConnectionDone,
            f"the proxy reset the connection instead of closing it: {client.reason.value!r}",
        )

    @defer.inlineCallbacks
    def assert_still_serving(self):
        response = yield self.client.get(self.url("/v1/models"))
        body = json.loads((yield response.content()))
        self.assertEqual(body["data"][0]["id"], "gpt-4o-mini")


SMUGGLING = [s for s in ADDED if s.status != 413] + TWISTED


class SmugglingTests(RawTestCase):
    """Each hostile shape: its JSON refusal, the connection closed, nothing upstream."""

    @defer.inlineCallbacks
    def test_every_shape_refused_nothing_upstream(self):
        """Every request-smuggling shape gets its own status and JSON error code, none
        reaches the upstream, and the proxy keeps serving afterwards."""
        yield self.start_proxy()
        for shape in SMUGGLING:
            # Closed gracefully after the answer (exchange checks it): a
            # reset could destroy the answer before the client read it.
            received = yield self.exchange(shape.raw)
            answer = parse_answer(received)
            self.assertEqual(
                (answer.status, answer.json()["error"]["code"]),
                (shape.status, shape.code),
                shape.name,
            )
            self.assertEqual(self.fake.seen, [], shape.name)
        yield self.assert_still_serving()
        self.assertEqual(len(self.fake.seen), 1)

    @defer.inlineCallbacks
    def test_smuggled_request_never_reaches_upstream(self):
        """``Transfer-Encoding: identity`` would make Twisted read the body
        as the next request on the connection."""
        yield self.start_proxy()
        smuggled = b"GET /echo?smuggled HTTP/1.1\r\nHost: proxy\r\n\r\n"
        received = yield self.exchange(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
            b"Transfer-Encoding: identity\r\n\r\n" + smuggled
        )
        self.assertEqual(received.count(b"HTTP/1.1 "), 1)
        self.assertEqual(parse_answer(received).status, 400)
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_bad_connection_does_not_disturb_a_stream(self):
        """A parser error on one connection leaves another's stream intact."""
        yield self.start_proxy()
        self.fake.hold_at = 2
        response, collector = yield self.open_stream("/v1/chat/completions")
        yield collector.got_data
        for shape in SMUGGLING[:5]:
            received = yield self.exchange(shape.raw)
            self.assertEqual(parse_answer(received).status, shape.status)
        self.fake.release.callback(None)
        yield collector.done
        self.assertEqual(collector.body, b"".join(chat_chunks(self.fake.answer_text, "m")))
        self.assertEqual(len(self.fake.seen), 1)

    @defer.inlineCallbacks
    def test_valid_chunked_body_forwarded(self):
        """The refusals leave valid chunked requests alone; the upstream gets
        the decoded body with a Content-Length."""
        yield self.start_proxy()
        client = yield self.connect()
        client.transport.write(
            b"POST /echo HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + b"3;x=y\r\nhel\r\n2\r\nlo\r\n0\r\nX-T: 1\r\n\r\n"
        )
        received = yield client.closed.addTimeout(EXCHANGE_TIMEOUT, reactor)
        self.assertEqual(parse_answer(received).status, 200)
        [seen] = self.fake.seen
        self.assertEqual(seen.body, b"hello")
        self.assertEqual(seen.header(b"content-length"), b"5")
        self.assertIsNone(seen.header(b"transfer-encoding"))


class BodyCapTests(RawTestCase):
    """MAX_REQUEST_BODY: 413 before anything goes upstream."""

    cap = 1000

    @defer.inlineCallbacks
    def test_content_length_over_cap_answered_before_the_body(self):
        """Only the head is sent: the 413 comes without waiting for a body."""
        yield self.start_proxy(MAX_REQUEST_BODY=str(self.cap))
        received = yield self.exchange(
            b"POST /v1/files HTTP/1.1\r\nHost: proxy\r\n"
            b"Content-Length: %d\r\n\r\n" % (self.cap + 1)
        )
        answer = parse_answer(received)
        self.assertEqual(answer.status, 413)
        self.assertEqual(answer.json()["error"]["code"], "request_too_large")
        self.assertEqual(self.fake.seen, [])
        yield self.assert_still_serving()

    @defer.inlineCallbacks
    def test_expect_100_continue_over_cap(self):
        """A declared body ten times MAX_REQUEST_BODY with Expect: 100-continue gets 413
        straight away, before the client sends it, and nothing goes upstream."""
        yield self.start_proxy(MAX_REQUEST_BODY=str(self.cap))
        received = yield self.exchange(
            b"POST /v1/files HTTP/1.1\r\nHost: proxy\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % (self.cap * 10)
        )
        self.assertTrue(received.startswith(b"HTTP/1.1 413 "), received)
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_chunked_body_over_cap(self):
        """Chunks past the cap: 413, and the body never goes upstream."""
        yield self.start_proxy(MAX_REQUEST_BODY=str(self.cap))
        client = yield self.connect()
        client.transport.write(
            b"POST /v1/files HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"190\r\n" + b"a" * 400 + b"\r\n"
        client.transport.write(piece * 3)
        received = yield client.closed.addTimeout(EXCHANGE_TIMEOUT, reactor)
        self.assertEqual(parse_answer(received).status, 413)
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_body_at_cap_forwarded(self):
        """A body of exactly MAX_REQUEST_BODY bytes is forwarded whole: the cap is
        inclusive."""
        yield self.start_proxy(MAX_REQUEST_BODY=str(self.cap))
        response = yield self.client.post(self.url("/echo"), data=b"a" * self.cap)
        yield response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(self.fake.seen[0].body, b"a" * self.cap)

    @defer.inlineCallbacks
    def test_http_client_sending_large_body_reads_413(self):
        """An HTTP client that sends its whole body regardless gets the 413."""
        yield self.start_proxy(MAX_REQUEST_BODY=str(self.cap))
        response = yield self.client.post(self.url("/v1/files"), data=b"a" * 2_000_000)
        body = json.loads((yield response.content()))
        self.assertEqual(response.code, 413)
        self.assertEqual(body["error"]["code"], "request_too_large")
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_default_cap_allows_chunked_uploads(self):
        """With the default cap a chunked upload is decoded and forwarded with its body."""
        yield self.start_proxy()
        received = yield self.exchange(
            b"POST /echo HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + CHUNKED_HELLO
        )
        self.assertEqual(parse_answer(received).status, 200)
        self.assertEqual(self.fake.seen[0].body, b"hello")


class GateBeforeBodyTests(RawTestCase):
    """A refused address is answered 403 as soon as the head is in: it
    does not get to upload a body first."""

    @defer.inlineCallbacks
    def test_refused_before_the_body(self):
        """A refused address gets 403 ip_not_allowed as soon as its head is in, without the
        proxy waiting for a 10 MB body, and /metrics is refused to it too."""
        yield self.start_proxy(IP_BLACKLIST="127.0.0.1")
        # Only the head of a 10 MB upload is sent: the answer comes anyway.
        received = yield self.exchange(
            b"POST /v1/files HTTP/1.1\r\nHost: proxy\r\nContent-Length: 10000000\r\n\r\n"
        )
        answer = parse_answer(received)
        self.assertEqual(answer.status, 403)
        self.assertEqual(answer.json()["error"]["code"], "ip_not_allowed")
        self.assertEqual(self.fake.seen, [])
        response = yield self.client.get(self.url("/metrics"))
        yield response.content()  # (refused too: the gate covers /metrics)
        self.assertEqual(response.code, 403)

    @defer.inlineCallbacks
    def test_allowed_address_uploads(self):
        """A whitelisted address uploads its body through the early gate, unchanged."""
        yield self.start_proxy(IP_WHITELIST="127.0.0.0/8")
        response = yield self.client.post(self.url("/echo"), data=b"x" * 5000)
        yield response.content()
        self.assertEqual(self.fake.seen[0].body, b"x" * 5000)
