"""
End to end: what an upstream (or a client steering it) must not be able to
do through the real plugin (issue 10, items 1, 3 and 5; items 6 and 7 are
in test_e2e_upstream_framing).

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

    #: They scrape /metrics on the proxy's port, without the admin key.
    proxy_settings = {"METRICS": "public"}

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
            from io import BytesIO

            from twisted.web.client import FileBodyProducer

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
            factory = ClientFactory.forProtocol(lambda client=client: client)
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
