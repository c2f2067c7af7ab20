"""
End to end, raw sockets to the real plugin: one client cannot take the
gateway from everyone.  Keyless uploads are refused from the head, the
connection caps (total, per client address) and the upstream cap answer
with OpenAI-shaped errors and are counted, a bare-LF head gets its 400 at
once, ``OPTIONS *`` passes the IP gate, and no answer names the server
software.
"""

from __future__ import annotations

import json
import re

from twisted.internet import defer, reactor

from .test_e2e_framing import EXCHANGE_TIMEOUT, RawTestCase
from .test_framing import parse_answer

FK = "fk-limits-e2e-00001"
GET = b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer " + FK.encode() + b"\r\n\r\n"


class LimitTestCase(RawTestCase):
    #: They scrape /metrics on the proxy's port, without the admin key.
    proxy_settings = {"METRICS": "public"}

    @defer.inlineCallbacks
    def held_connection(self):
        """A raw connection that got one answer and stays open (keep-alive):
        from then on the proxy surely counts it."""
        client = yield self.connect()
        got = client.got_data
        client.transport.write(GET)
        yield got.addTimeout(EXCHANGE_TIMEOUT, reactor)
        while b"\r\n\r\n" not in client.received:
            yield client.got_data.addTimeout(EXCHANGE_TIMEOUT, reactor)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "), client.received[:100])
        return client

    @defer.inlineCallbacks
    def metric(self, name: str, labels: str = "") -> defer.Deferred:
        response = yield self.client.get(self.url("/metrics"))
        text = (yield response.content()).decode()
        match = re.search(
            r"^" + re.escape(name + labels) + r" ([0-9.e+]+)$", text, re.MULTILINE
        )
        return float(match.group(1)) if match else 0.0


class KeyBeforeBodyTests(LimitTestCase):
    @defer.inlineCallbacks
    def test_keyless_upload_never_gets_100_continue(self):
        """Keyless, 100 MiB announced, ``Expect: 100-continue``: 401 at once,
        no ``100 Continue``, the connection closed, nothing upstream."""
        yield self.start_proxy(FORWARD_KEY=FK, OPENAI_API_KEY="sk-limits-real-0001")
        client = yield self.connect()
        client.transport.write(
            b"POST /v1/files HTTP/1.1\r\nHost: proxy\r\nExpect: 100-continue\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % (100 << 20)
        )
        received = yield client.closed.addTimeout(EXCHANGE_TIMEOUT, reactor)
        self.assert_clean_close(client)
        self.assertNotIn(b"100 Continue", received)
        answer = parse_answer(received)
        self.assertEqual((answer.status, answer.json()["error"]["code"]),
                         (401, "invalid_api_key"))
        self.assertEqual(self.fake.seen, [])


class ConnectionCapTests(LimitTestCase):
    @defer.inlineCallbacks
    def test_per_client_cap(self):
        """MAX_CONNECTIONS_PER_CLIENT=2: a third connection from the same
        address gets 429 and is closed; once one closes, a new one serves."""
        yield self.start_proxy(
            FORWARD_KEY=FK, OPENAI_API_KEY="sk-limits-real-0001", MAX_CONNECTIONS_PER_CLIENT="2"
        )
        first = yield self.held_connection()
        yield self.held_connection()
        received = yield self.exchange(GET)
        answer = parse_answer(received)
        self.assertEqual((answer.status, answer.json()["error"]["code"]),
                         (429, "too_many_connections"))
        self.assertEqual(len(self.fake.seen), 2)
        # The proxy closes the first connection itself: it has let go of
        # the slot before the client sees the close.
        first.transport.write(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        yield first.closed.addTimeout(EXCHANGE_TIMEOUT, reactor)
        yield self.held_connection()
        self.assertEqual(self.refusals("too_many_connections"), 1)

    @defer.inlineCallbacks
    def test_total_cap(self):
        """MAX_CONNECTIONS=2: a third connection gets 503 and is closed."""
        yield self.start_proxy(
            FORWARD_KEY=FK, OPENAI_API_KEY="sk-limits-real-0001", MAX_CONNECTIONS="2",
            MAX_CONNECTIONS_PER_CLIENT="0",
        )
        yield self.held_connection()
        yield self.held_connection()
        received = yield self.exchange(GET)
        answer = parse_answer(received)
        self.assertEqual((answer.status, answer.json()["error"]["code"]),
                         (503, "server_busy"))
        self.assertEqual(len(self.fake.seen), 2)
        self.assertEqual(self.refusals("server_busy"), 1)

    def refusals(self, reason: str) -> float:
        value = self.site.metrics.registry.get_sample_value(
            "openai_forward_refusals_total", {"reason": reason}
        )
        return value or 0.0


class UpstreamCapTests(LimitTestCase):
    @defer.inlineCallbacks
    def test_upstream_cap_answers_503_and_counts(self):
        """MAX_UPSTREAM_CONNECTIONS=1: while one stream is open upstream, a
        second request gets 503 ``upstream_busy`` and never goes upstream;
        once the stream ends, requests go through again."""
        yield self.start_proxy(MAX_UPSTREAM_CONNECTIONS="1")
        self.fake.hold_at = 2
        response, collector = yield self.open_stream()
        yield collector.got_data
        busy = yield self.client.get(self.url("/v1/models"))
        body = json.loads((yield busy.content()))
        self.assertEqual((busy.code, body["error"]["code"]), (503, "upstream_busy"))
        self.assertEqual(len(self.fake.seen), 1)
        self.fake.release.callback(None)
        yield collector.done
        again = yield self.client.get(self.url("/v1/models"))
        yield again.content()
        self.assertEqual(again.code, 200)
        count = yield self.metric("openai_forward_refusals_total", '{reason="upstream_busy"}')
        self.assertEqual(count, 1)


class DeadlineEndToEndTests(LimitTestCase):
    @defer.inlineCallbacks
    def test_head_deadline_through_the_plugin(self):
        """REQUEST_HEAD_TIMEOUT=1 reaches the listening site: a head that
        stops half way gets its 408 after a second, not the 60 s idle close."""
        yield self.start_proxy(REQUEST_HEAD_TIMEOUT="1")
        received = yield self.exchange(b"GET /v1/models HTTP/1.1\r\nHost: pro")
        answer = parse_answer(received)
        self.assertEqual((answer.status, answer.json()["error"]["code"]),
                         (408, "request_head_timeout"))
        self.assertEqual(self.fake.seen, [])


class SmallerTests(LimitTestCase):
    @defer.inlineCallbacks
    def test_bare_lf_head_answered_at_once(self):
        """An LF-only head: 400 and closed within seconds, not a 60 s idle close."""
        yield self.start_proxy()
        received = yield self.exchange(b"GET /v1/models HTTP/1.1\nHost: proxy\n\n")
        answer = parse_answer(received)
        self.assertEqual((answer.status, answer.json()["error"]["code"]),
                         (400, "bare_line_feed"))
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_options_star_behind_the_ip_gate(self):
        """``OPTIONS *`` from a refused address: 403, OpenAI-shaped."""
        yield self.start_proxy(IP_BLACKLIST="127.0.0.1")
        received = yield self.exchange(
            b"OPTIONS * HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
        )
        answer = parse_answer(received)
        self.assertEqual((answer.status, answer.json()["error"]["code"]),
                         (403, "ip_not_allowed"))

    @defer.inlineCallbacks
    def test_no_server_header_anywhere(self):
        """No ``Server: TwistedWeb`` on the proxy's own answers nor added to
        relayed ones (``/bare``'s upstream sends no Server header)."""
        yield self.start_proxy()
        for raw in (
            b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n",
            b"GET /bare HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n",
        ):
            received = yield self.exchange(raw)
            self.assertNotIn(b"twistedweb", received.lower(), raw)
            self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received[:200])
