"""
End to end: what an upstream (or a client steering it) must not be able to
do through the real plugin (issue 10, items 1, 3, 5, 6 and 7).

The upstream here is tests/raw_upstream.py, which writes bytes by hand: a
key in the reason phrase or a header name, a HEAD answered with a whole
second response, 5,000 header lines, control bytes, an error body that
stops half-way.  Key revocation uses the twisted.web fake where a
well-formed answer is enough.
"""

from __future__ import annotations

import json

from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.web.client import readBody
from twisted.web.http_headers import Headers

from .harness import ProxyTestCase
from .raw_upstream import RawConnection, RawRequest, RawUpstream, answer, stop_raw
from .test_metrics import _sample

DEFAULT = "sk-hostile-default-4b1e9d7c2a"
SECOND = "sk-hostile-second-8c3f0a6e1d"
ALICE = "fk-hostile-alice-2d7b5e9c1f"


def _json(body: bytes) -> dict:
    return json.loads(body.decode("utf-8"))


def openai_error(code, message: str) -> bytes:
    """An error body as the real API writes it."""
    return json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None,
                   "code": code}}
    ).encode()


class HostileCase(ProxyTestCase):
    """Starts the raw upstream beside the twisted.web fake."""

    def setUp(self) -> None:
        super().setUp()
        self.raw = RawUpstream()
        self.raw_port = self.raw.listen(reactor)
        self.addCleanup(stop_raw, self.raw, self.raw_port)

    def start_raw(self, **env: str) -> defer.Deferred:
        """The proxy in front of the raw upstream, with a default key."""
        env.setdefault("OPENAI_API_KEY", DEFAULT)
        env.setdefault("OPENAI_BASE_URL", f"http://127.0.0.1:{self.raw_port.getHost().port}")
        return self.start_proxy(**env)

    @defer.inlineCallbacks
    def request(self, method: bytes, path: str, headers=None, body: bytes = None):
        h = Headers()
        for name, value in (headers or {}).items():
            h.addRawHeader(name, value)
        producer = None
        if body is not None:
            from twisted.web.client import FileBodyProducer
            from io import BytesIO

            producer = FileBodyProducer(BytesIO(body))
        response = yield self.agent.request(method, self.url(path).encode(), h, producer)
        content = yield readBody(response)
        return response, content

    @defer.inlineCallbacks
    def metrics(self) -> defer.Deferred:
        response = yield self.client.get(self.url("/metrics"))
        return (yield response.content()).decode()


# ------------------------------------------------------------------ item 1


class KeyRevocation(HostileCase):
    """Only a 401 that says the key itself is bad takes a default key out."""

    def answer_401(self, code, message: str) -> None:
        def handler(request):
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"application/json")
            return openai_error(code, message)

        self.fake.override = handler

    @defer.inlineCallbacks
    def check_not_revoked(self, code, message: str):
        yield self.start_proxy(
            OPENAI_API_KEY=f"{DEFAULT} {SECOND}", FORWARD_KEY=f"alice:{ALICE}"
        )
        self.answer_401(code, message)
        response, body = yield self.request(
            b"GET", "/v1/models", {b"authorization": b"Bearer " + ALICE.encode()}
        )
        # Relayed to this client, as the upstream said it.
        self.assertEqual(response.code, 401)
        self.assertEqual(_json(body)["error"]["code"], code)
        # No failover: one upstream request, with the first key.
        self.assertEqual(len(self.fake.seen), 1)
        text = yield self.metrics()
        self.assertEqual(_sample(text, "openai_forward_default_keys", state="revoked"), 0)
        self.assertEqual(_sample(text, "openai_forward_default_keys", state="active"), 2)
        # Both keys still serve the next requests, in turn.
        self.fake.override = None
        for _ in range(2):
            response, _ = yield self.request(
                b"GET", "/v1/models", {b"authorization": b"Bearer " + ALICE.encode()}
            )
            self.assertEqual(response.code, 200)
        self.assertEqual(
            {s.header(b"authorization") for s in self.fake.seen[1:]},
            {b"Bearer " + DEFAULT.encode(), b"Bearer " + SECOND.encode()},
        )

    def test_mismatched_organization_revokes_nothing(self):
        """A 401 for a mismatched OpenAI-Organization is the request's fault:
        relayed to its client, no failover, no key taken out."""
        return self.check_not_revoked(
            "mismatched_organization",
            "OpenAI-Organization header should match organization for API key",
        )

    def test_missing_scope_revokes_nothing(self):
        """A restricted key's missing scope (401, no code) revokes nothing."""
        return self.check_not_revoked(
            None,
            "You have insufficient permissions for this operation. "
            "Missing scopes: model.request.",
        )

    @defer.inlineCallbacks
    def test_invalid_key_revoked_then_503_never_keyless(self):
        """``invalid_api_key`` revokes the key; once no default key is left,
        requests get 503 and nothing more goes upstream (never without a key)."""
        yield self.start_proxy(OPENAI_API_KEY=DEFAULT)

        def handler(request):
            auth = request.requestHeaders.getRawHeaders(b"authorization", [b""])[0]
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"application/json")
            return openai_error(
                "invalid_api_key", "Incorrect API key provided: " + auth[7:].decode()
            )

        self.fake.override = handler
        response, body = yield self.request(b"GET", "/v1/models")
        self.assertEqual(response.code, 401)
        self.assertIn(b"sk-***", body)
        for _ in range(2):
            response, body = yield self.request(b"GET", "/v1/models")
            self.assertEqual(response.code, 503)
            self.assertEqual(_json(body)["error"]["code"], "no_default_key")
        self.assertEqual(len(self.fake.seen), 1)
        for seen in self.fake.seen:
            self.assertEqual(seen.header(b"authorization"), b"Bearer " + DEFAULT.encode())

    @defer.inlineCallbacks
    def test_deactivated_account_fails_over(self):
        """``account_deactivated`` revokes the key and the next one serves."""
        yield self.start_proxy(OPENAI_API_KEY=f"{DEFAULT} {SECOND}")
        bad = b"Bearer " + DEFAULT.encode()

        def handler(request):
            if request.requestHeaders.getRawHeaders(b"authorization")[0] == bad:
                request.setResponseCode(401)
                return openai_error(
                    "account_deactivated", "This key is associated with a deactivated account."
                )
            return b'{"ok": true}'

        self.fake.override = handler
        response, body = yield self.request(b"GET", "/v1/models")
        self.assertEqual((response.code, _json(body)), (200, {"ok": True}))
        text = yield self.metrics()
        self.assertEqual(_sample(text, "openai_forward_default_keys", state="revoked"), 1)

    @defer.inlineCallbacks
    def test_account_headers_dropped_with_a_default_key(self):
        """OpenAI-Organization / OpenAI-Project are the client's to choose only
        with its own key: with a default key they are not sent upstream."""
        yield self.start_proxy(OPENAI_API_KEY=DEFAULT, FORWARD_KEY=f"alice:{ALICE}")
        account = {b"openai-organization": b"org-client", b"openai-project": b"proj_client"}
        yield self.request(
            b"GET", "/echo", {b"authorization": b"Bearer " + ALICE.encode(), **account}
        )
        yield self.request(
            b"GET", "/echo", {b"authorization": b"Bearer sk-client-own-key-1", **account}
        )
        substituted, own = self.fake.seen
        self.assertIsNone(substituted.header(b"openai-organization"))
        self.assertIsNone(substituted.header(b"openai-project"))
        self.assertEqual(own.header(b"openai-organization"), b"org-client")
        self.assertEqual(own.header(b"openai-project"), b"proj_client")


# ------------------------------------------------------------------ item 3


class _HangUp(Protocol):
    """A raw client: sends one request, hangs up when told."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


class ScrubbingPath(HostileCase):
    """Error answers to default-key requests are buffered (to mask the key)
    but timed and stopped like any other answer."""

    def stalled_error(self, connection: RawConnection, request: RawRequest) -> None:
        connection.write(
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"error":'
        )

    @defer.inlineCallbacks
    def test_silent_error_body_is_ended_by_the_idle_timer(self):
        """400, Content-Length 1000, 9 bytes, silence: the client gets an
        answer within IDLE_TIMEOUT and the upstream connection is closed."""
        self.timeout = 10
        yield self.start_raw(IDLE_TIMEOUT="0.3")
        self.raw.handler = self.stalled_error
        response, body = yield self.request(b"GET", "/v1/models")
        self.assertEqual(response.code, 400)
        self.assertEqual(_json(body)["error"]["type"], "upstream_error")
        yield self.raw.all_closed()
        text = yield self.metrics()
        self.assertEqual(
            _sample(text, "openai_forward_requests_total", outcome="idle_timeout"), 1
        )

    @defer.inlineCallbacks
    def test_clients_leaving_mid_error_close_upstream_connections(self):
        """Clients that hang up while an error answer is being read leave no
        upstream connection open."""
        yield self.start_raw()
        self.raw.handler = self.stalled_error
        for _ in range(5):
            client = _HangUp(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            factory = ClientFactory.forProtocol(lambda: client)
            reactor.connectTCP("127.0.0.1", self.proxy_port, factory)
            yield self.raw.arrived
            # A round trip through the proxy: by its end the proxy has read
            # the upstream's partial answer (written before it started).
            response = yield self.client.get(self.url("/healthz"))
            yield response.content()
            client.transport.loseConnection()
            yield client.lost
        yield self.raw.all_closed()
        self.assertEqual(self.raw.open, 0)
        text = yield self.metrics()
        self.assertEqual(_sample(text, "openai_forward_open_exchanges", route="/"), 0)


# ------------------------------------------------------------------ item 5


class WhatTheUpstreamSays(HostileCase):
    """Nothing the upstream writes carries a default key to the client."""

    @defer.inlineCallbacks
    def test_reason_phrase_is_the_standard_one(self):
        """The upstream's reason phrase is never relayed (it could hold a key)."""
        yield self.start_raw()

        def handler(connection, request):
            key = request.header(b"authorization")
            connection.write(answer(b"200 Key " + key, [], b"{}"))

        self.raw.handler = handler
        response, body = yield self.request(b"GET", "/v1/models")
        self.assertEqual((response.code, response.phrase), (200, b"OK"))

    @defer.inlineCallbacks
    def test_key_in_a_header_name_is_masked(self):
        """A default key echoed in a header *name* is masked."""
        yield self.start_raw()

        def handler(connection, request):
            key = request.header(b"authorization")[7:]
            connection.write(answer(b"200 OK", [(b"X-Echo-" + key, b"1")], b"{}"))

        self.raw.handler = handler
        response, body = yield self.request(b"GET", "/v1/models")
        self.assertEqual(response.code, 200)
        names = [name.lower() for name, _ in response.headers.getAllRawHeaders()]
        self.assertTrue(any(name.startswith(b"x-echo-sk-") for name in names), names)
        self.assertFalse([name for name in names if DEFAULT[3:].encode() in name])


# ------------------------------------------------------------------ item 6


class BodilessAnswers(HostileCase):
    """A connection is not reused after an answer that ends with its head."""

    @defer.inlineCallbacks
    def check_no_smuggling(self, method: bytes, status: bytes):
        yield self.start_raw()
        smuggled = answer(b"200 OK", [(b"X-Smuggled", b"1")], b"smuggled")

        def handler(connection, request):
            if request.method == method and request.target == b"/first":
                # The answer, then a whole second one "in its body" (sent
                # late, as a later TCP segment would arrive).
                connection.write(answer(status, [(b"Content-Length", b"%d" % len(smuggled))]))
                connection.smuggle = True
                return
            if getattr(connection, "smuggle", False):
                connection.smuggle = False
                connection.write(smuggled)
                return
            connection.write(answer(b"200 OK", [(b"X-Honest", b"1")], b"honest"))

        self.raw.handler = handler
        response, _ = yield self.request(method, "/first")
        self.assertEqual(response.code, int(status[:3]))
        for _ in range(3):
            response, body = yield self.request(b"GET", "/second")
            self.assertIsNone(response.headers.getRawHeaders(b"x-smuggled"))
            self.assertEqual(body, b"honest")
        first = [s.connection for s in self.raw.seen if s.target == b"/first"]
        later = [s.connection for s in self.raw.seen if s.target == b"/second"]
        self.assertNotIn(first[0], later)

    def test_head_answer_does_not_reach_the_next_request(self):
        """HEAD answered with a body forming a second response: the next
        request does not get it (the connection was not pooled)."""
        return self.check_no_smuggling(b"HEAD", b"200 OK")

    def test_204_answer_does_not_reach_the_next_request(self):
        """The same after a 204, which has no body either."""
        return self.check_no_smuggling(b"GET", b"204 No Content")

    def test_304_answer_does_not_reach_the_next_request(self):
        """The same after a 304."""
        return self.check_no_smuggling(b"GET", b"304 Not Modified")


# ------------------------------------------------------------------ item 7


class AnswerHeadLimits(HostileCase):
    """The upstream's answer head is bounded and clean, or the client gets 502."""

    @defer.inlineCallbacks
    def check_502(self, head_lines: list[tuple[bytes, bytes]], code: str, **env: str):
        yield self.start_raw(**env)
        self.raw.handler = lambda connection, request: connection.write(
            answer(b"200 OK", head_lines, b"{}")
        )
        response, body = yield self.request(b"GET", "/v1/models")
        self.assertEqual(response.code, 502)
        self.assertEqual(_json(body)["error"]["code"], code)
        yield self.raw.all_closed()
        # And the proxy serves on.
        self.raw.handler = lambda connection, request: connection.write(
            answer(b"200 OK", [], b"{}")
        )
        response, body = yield self.request(b"GET", "/v1/models")
        self.assertEqual(response.code, 200)

    def test_too_many_header_lines(self):
        """5,000 header lines (default cap: 100) are a 502."""
        return self.check_502(
            [(b"X-Many-%d" % i, b"v") for i in range(5000)], "upstream_head_too_large"
        )

    def test_header_lines_cap_is_a_setting(self):
        """MAX_UPSTREAM_HEADERS lowers the line cap."""
        return self.check_502(
            [(b"X-Some-%d" % i, b"v") for i in range(20)], "upstream_head_too_large",
            MAX_UPSTREAM_HEADERS="10",
        )

    def test_head_too_large(self):
        """A head over MAX_UPSTREAM_HEAD bytes (in few lines) is a 502."""
        return self.check_502(
            [(b"X-Big-%d" % i, b"v" * 8000) for i in range(4)], "upstream_head_too_large",
            MAX_UPSTREAM_HEAD="16KiB",
        )

    def test_control_byte_in_a_header_value(self):
        """A control byte in a header value is a 502, not relayed."""
        return self.check_502([(b"X-Bad", b"a\x01b")], "upstream_bad_head")

    def test_nul_in_a_header_value(self):
        """So is a NUL."""
        return self.check_502([(b"X-Bad", b"a\x00b")], "upstream_bad_head")

    def test_bad_header_name(self):
        """A header name that is not a token is a 502."""
        return self.check_502([(b"X Bad", b"1")], "upstream_bad_head")

    @defer.inlineCallbacks
    def test_ordinary_head_passes(self):
        """Tabs, obs-text and 90 headers are fine."""
        yield self.start_raw()
        lines = [(b"X-Ok-%d" % i, b"v\tw\xe9") for i in range(90)]
        self.raw.handler = lambda connection, request: connection.write(
            answer(b"200 OK", lines, b"{}")
        )
        response, body = yield self.request(b"GET", "/v1/models")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-ok-3"), [b"v\tw\xe9"])
