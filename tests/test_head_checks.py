"""
What the proxy decides when a request head arrives, before any body:
the forward key (401) and the IP gate (403) with no ``100 Continue`` and no
body read; the deadlines for a request head and for a stalled body; a bare
LF head; ``OPTIONS *``; no ``Server`` header on any answer.

The real HTTP parser is fed bytes on a StringTransport, on a
MemoryReactorClock, as twisted.web's own tests do.
"""

from __future__ import annotations

import json

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twisted_forward.config import load_config
from twisted_forward.headcheck import IHeadCheck
from twisted_forward.site import build_root, make_site

from .test_proxy_unit import FakeResponse, FakeUpstream

FK = "fk-head-check-0001"
PEER = "192.168.1.1"  # StringTransport's peer address


class HalfCloseTransport(StringTransport):
    """A StringTransport that, like a TCP socket, can close its write side."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class HeadHarness(SynchronousTestCase):
    """The proxy's site as the plugin builds it, on a memory clock."""

    env: dict = {"FORWARD_KEY": FK, "OPENAI_API_KEY": "sk-head-check-real-0001"}

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.upstream = FakeUpstream()
        env = {"OPENAI_BASE_URL": "http://upstream.test", "LOG_CHAT": "false", **self.env}
        self.config = load_config({}, env, None)
        self.built = build_root(self.config, self.clock, upstream=self.upstream)
        self.site = make_site(self.built, self.config, self.clock)

    def connect(self) -> tuple:
        channel = self.site.buildProtocol(None)
        transport = HalfCloseTransport()
        channel.makeConnection(transport)
        return channel, transport

    def send(self, raw: bytes) -> tuple:
        channel, transport = self.connect()
        channel.dataReceived(raw)
        return channel, transport

    @staticmethod
    def status(transport: StringTransport) -> int:
        return int(transport.value().split(b" ", 2)[1])

    @staticmethod
    def error_code(transport: StringTransport) -> str:
        body = transport.value().split(b"\r\n\r\n", 1)[1]
        return json.loads(body)["error"]["code"]

    def refusals(self, reason: str) -> float:
        value = self.built.metrics.registry.get_sample_value(
            "openai_forward_refusals_total", {"reason": reason}
        )
        return value or 0.0


def post_head(extra: bytes = b"", length: int = 1000, path: bytes = b"/v1/chat/completions") -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: proxy\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n" % length + extra + b"\r\n"
    )


class KeyAtHeadTests(HeadHarness):
    def test_keyless_expect_continue_refused_before_any_body(self):
        """A keyless upload with ``Expect: 100-continue`` gets 401 from the
        head alone: no ``100 Continue``, no body read, nothing upstream."""
        channel, transport = self.send(post_head(b"Expect: 100-continue\r\n", 10 << 20))
        raw = transport.value()
        self.assertNotIn(b"100 Continue", raw)
        self.assertTrue(raw.startswith(b"HTTP/1.1 401 "), raw)
        self.assertEqual(self.error_code(transport), "invalid_api_key")
        self.assertIn(b"connection: close", raw.lower())
        self.assertTrue(transport.write_closed)
        self.assertEqual(self.upstream.calls, [])
        # What the client still sends is dropped, never kept as a body.
        channel.dataReceived(b"x" * 65536)
        self.assertIsNone(channel.requests[0].content)  # no body file made
        self.assertEqual(self.refusals("invalid_api_key"), 1)

    def test_bad_forward_key_refused_at_head(self):
        """An unknown ``fk-`` key: 401 before the body."""
        channel, transport = self.send(
            post_head(b"Authorization: Bearer fk-not-a-known-key\r\n")
        )
        self.assertEqual(self.status(transport), 401)
        self.assertEqual(self.error_code(transport), "invalid_api_key")
        self.assertEqual(self.upstream.calls, [])

    def test_good_key_gets_100_continue_and_goes_upstream(self):
        """A valid forward key: ``100 Continue``, the body, then upstream."""
        channel, transport = self.send(
            post_head(b"Authorization: Bearer " + FK.encode() + b"\r\n"
                      b"Expect: 100-continue\r\n", 2)
        )
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        channel.dataReceived(b"{}")
        self.assertEqual(len(self.upstream.calls), 1)

    def test_bodiless_refusal_keeps_the_connection(self):
        """A keyless GET still gets its 401 from the resource, and the
        connection stays open for the next request."""
        channel, transport = self.send(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n")
        self.assertEqual(self.status(transport), 401)
        self.assertFalse(transport.disconnecting)

    def test_health_check_needs_no_key(self):
        """The health check's path is not behind the key, even with a body."""
        channel, transport = self.send(
            b"POST /healthz HTTP/1.1\r\nHost: proxy\r\nContent-Length: 2\r\n\r\n{}"
        )
        self.assertEqual(self.status(transport), 200)

    def test_head_checks_provide_the_interface(self):
        """Every head check the site runs is an IHeadCheck."""
        self.assertTrue(self.site.head_checks)
        for check in self.site.head_checks:
            self.assertTrue(verifyObject(IHeadCheck, check))


class GateAtHeadTests(HeadHarness):
    env = {"IP_BLACKLIST": PEER}

    def test_refused_address_gets_no_100_continue(self):
        """A refused address: 403 from the head, no ``100 Continue``."""
        channel, transport = self.send(post_head(b"Expect: 100-continue\r\n"))
        raw = transport.value()
        self.assertNotIn(b"100 Continue", raw)
        self.assertEqual(self.status(transport), 403)
        self.assertEqual(self.error_code(transport), "ip_not_allowed")

    def test_options_star_refused(self):
        """``OPTIONS *`` goes through the IP gate like every request."""
        channel, transport = self.send(b"OPTIONS * HTTP/1.1\r\nHost: proxy\r\n\r\n")
        self.assertEqual(self.status(transport), 403)
        self.assertEqual(self.error_code(transport), "ip_not_allowed")


class DeadlineTests(HeadHarness):
    env: dict = {}

    def test_trickled_head_cut_at_deadline(self):
        """A head sent one byte a second is answered 408 thirty seconds
        after its first byte, though no second is idle."""
        channel, transport = self.connect()
        head = b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\nX-Slow: " + b"a" * 100
        for i in range(29):
            channel.dataReceived(head[i:i + 1])
            self.clock.advance(1)
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(head[29:30])
        self.clock.advance(1)
        self.assertEqual(self.status(transport), 408)
        self.assertEqual(self.error_code(transport), "request_head_timeout")
        self.assertEqual(self.refusals("request_head_timeout"), 1)
        self.assertEqual(self.upstream.calls, [])

    def test_head_deadline_restarts_for_the_next_request(self):
        """A keep-alive connection's second head gets its own deadline."""
        channel, transport = self.send(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n")
        response = FakeResponse(200, {b"content-type": [b"application/json"]}, length=2)
        self.upstream.calls[0].deferred.callback(response)
        response.protocol.dataReceived(b"{}")
        response.finish()
        self.clock.advance(20)
        transport.clear()
        channel.dataReceived(b"GET /v1/models HTTP/1.1\r\n")
        self.clock.advance(29)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(self.status(transport), 408)

    def test_stalled_body_cut_after_60_seconds_of_silence(self):
        """A body that stops arriving: 408 after 60 s without a body byte
        (each byte restarts the wait), not a silent close."""
        channel, transport = self.send(post_head(length=100) + b"x" * 10)
        self.clock.advance(59)
        channel.dataReceived(b"y")
        self.clock.advance(59)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(self.status(transport), 408)
        self.assertEqual(self.error_code(transport), "request_body_timeout")
        self.assertEqual(self.refusals("request_body_timeout"), 1)
        self.assertEqual(self.upstream.calls, [])

    def test_settings_change_the_deadlines(self):
        """REQUEST_HEAD_TIMEOUT and REQUEST_BODY_TIMEOUT set the deadlines."""
        self.config = load_config(
            {}, {"OPENAI_BASE_URL": "http://upstream.test", "LOG_CHAT": "false",
                 "REQUEST_HEAD_TIMEOUT": "5", "REQUEST_BODY_TIMEOUT": "7"}, None)
        self.built = build_root(self.config, self.clock, upstream=self.upstream)
        self.site = make_site(self.built, self.config, self.clock)
        channel, transport = self.send(b"GET /v1/models HTTP/1.1\r\n")
        self.clock.advance(5)
        self.assertEqual(self.status(transport), 408)
        channel, transport = self.send(post_head(length=10))
        self.clock.advance(6.5)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.5)
        self.assertEqual(self.status(transport), 408)

    def test_whole_request_leaves_no_deadline_behind(self):
        """Once a request is in, its head and body deadlines are gone."""
        channel, transport = self.send(post_head(length=2) + b"{}")
        self.assertEqual(len(self.upstream.calls), 1)
        # Only the proxy's own upstream head timer remains.
        self.assertEqual(
            [c.getTime() for c in self.clock.getDelayedCalls()], [self.config.read_timeout]
        )


class BareLineFeedTests(HeadHarness):
    env: dict = {}

    def test_bare_lf_head_refused_at_once(self):
        """A head with LF line ends (no CR) gets 400 now, not an idle close."""
        channel, transport = self.send(b"GET /v1/models HTTP/1.1\nHost: proxy\n\n")
        self.assertEqual(self.status(transport), 400)
        self.assertEqual(self.error_code(transport), "bare_line_feed")
        self.assertEqual(self.upstream.calls, [])

    def test_one_bare_lf_among_crlf_lines_refused(self):
        """One LF-terminated header line among CRLF lines: 400."""
        channel, transport = self.send(
            b"GET /v1/models HTTP/1.1\r\nHost: proxy\nX-A: 1\r\n\r\n"
        )
        self.assertEqual(self.status(transport), 400)
        self.assertEqual(self.upstream.calls, [])

    def test_line_feeds_in_a_body_are_data(self):
        """LFs in a body are the body's business."""
        channel, transport = self.send(post_head(length=7) + b"{\n\"a\"\n}")
        self.assertEqual(len(self.upstream.calls), 1)
        self.assertEqual(transport.value(), b"")

    def test_split_crlf_across_reads_is_fine(self):
        """A CR at the end of one read and its LF at the start of the next."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /v1/models HTTP/1.1\r")
        channel.dataReceived(b"\nHost: proxy\r")
        channel.dataReceived(b"\n\r\n")
        self.assertEqual(len(self.upstream.calls), 1)


class AsteriskAndServerHeaderTests(HeadHarness):
    env: dict = {}

    def test_options_star_answered_with_allow(self):
        """``OPTIONS *``: 200, an Allow header, an empty body, no Server."""
        channel, transport = self.send(b"OPTIONS * HTTP/1.1\r\nHost: proxy\r\n\r\n")
        raw = transport.value()
        self.assertEqual(self.status(transport), 200)
        head = raw.split(b"\r\n\r\n", 1)[0].lower()
        self.assertIn(b"\r\nallow: ", head)
        self.assertIn(b"\r\ncontent-length: 0", head)
        self.assertNotIn(b"\r\nserver:", head)
        self.assertEqual(self.upstream.calls, [])

    def test_other_methods_on_star_are_400(self):
        """``*`` is a target for OPTIONS only: anything else is an OpenAI-shaped 400."""
        channel, transport = self.send(b"GET * HTTP/1.1\r\nHost: proxy\r\n\r\n")
        self.assertEqual(self.status(transport), 400)
        self.assertEqual(self.error_code(transport), "invalid_request_target")

    def test_no_server_header_on_the_proxys_own_answers(self):
        """Health, 404, 401-from-render and relayed answers carry no Server header."""
        for raw in (
            b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: proxy\r\n\r\n",
            b"GET /../x HTTP/1.1\r\nHost: proxy\r\n\r\n",
        ):
            channel, transport = self.send(raw)
            head = transport.value().split(b"\r\n\r\n", 1)[0].lower()
            self.assertNotIn(b"\r\nserver:", head, raw)
            self.assertNotIn(b"twistedweb", transport.value().lower(), raw)

    def test_no_server_header_on_relayed_answers(self):
        """A relayed answer has the upstream's headers only."""
        channel, transport = self.send(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n")
        response = FakeResponse(200, {b"content-type": [b"application/json"]}, length=2)
        self.upstream.calls[0].deferred.callback(response)
        response.protocol.dataReceived(b"{}")
        response.finish()
        self.assertNotIn(b"server:", transport.value().lower())
