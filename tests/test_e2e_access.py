"""
End-to-end: keys and access through the real plugin in front of the fake
upstream.  Refusals never reach the upstream; no configured key reaches a
client or a log (the secrets watch in tests/secrets_watch.py checks that for
every end-to-end test; the last class here proves the watch can fail).
"""

from __future__ import annotations

import gzip
import json
import zlib

from twisted.internet import defer, reactor
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.web.client import readBody
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET

from twisted_forward.headers import CLIENT_IDENTIFYING
from twisted_forward.keys import DefaultKeys, SecretMask

from .fake_upstream import Seen, chat_chunks
from .harness import Collector, ProxyTestCase

DEFAULT = "sk-e2e-default-7f3a9c1d5e"
SECOND = "sk-e2e-second-0b8e2f6a4c"
ALICE = "fk-e2e-alice-5c2d8e1f9a"
BOB = "fk-e2e-bob-3e7a1c9d2b"


def _json(body: bytes) -> dict:
    return json.loads(body.decode("utf-8"))


class KeyRulesE2E(ProxyTestCase):
    def start(self, **env):
        env.setdefault("OPENAI_API_KEY", DEFAULT)
        env.setdefault("FORWARD_KEY", f"alice:{ALICE} {BOB}")
        return self.start_proxy(**env)

    @defer.inlineCallbacks
    def get(self, path="/echo", **headers):
        h = Headers()
        for name, value in headers.items():
            h.addRawHeader(name.replace("_", "-").encode(), value.encode())
        response = yield self.agent.request(b"GET", self.url(path).encode(), h)
        body = yield readBody(response)
        return response, body

    @defer.inlineCallbacks
    def test_forward_key_swapped_for_default_key(self):
        """Through the real plugin a forward key reaches the upstream as "Bearer <default
        key>", and when the upstream echoes that key back the client gets it masked, with
        Content-Length still right."""
        yield self.start()
        response, body = yield self.get(authorization="Bearer " + ALICE)
        self.assertEqual(response.code, 200)
        [seen] = self.fake.seen
        self.assertEqual(seen.header(b"authorization"), b"Bearer " + DEFAULT.encode())
        # The fake echoes what it got; the default key is masked on the way back.
        echoed = _json(body)["headers"]["authorization"]
        self.assertEqual(echoed, ["Bearer sk-" + "*" * (len(DEFAULT) - 3)])
        self.assertEqual(len(body), response.length)

    @defer.inlineCallbacks
    def test_api_key_headers(self):
        """Forward keys in api-key and x-api-key reach the upstream as the default key in
        the same header, with no Authorization added."""
        yield self.start()
        yield self.get(api_key=ALICE)
        yield self.get(x_api_key=BOB)
        first, second = self.fake.seen
        self.assertEqual(first.header(b"api-key"), DEFAULT.encode())
        self.assertIsNone(first.header(b"authorization"))
        self.assertEqual(second.header(b"x-api-key"), DEFAULT.encode())

    @defer.inlineCallbacks
    def test_refusals_never_reach_upstream(self):
        """No key, an empty Bearer, an unknown, truncated or wrongly-schemed forward key, a
        forward key beside another credential, or an upper-case FK- key: each gets a 401
        invalid_api_key JSON error and none reaches the upstream."""
        yield self.start()
        for headers in (
            {},
            {"authorization": "Bearer"},
            {"authorization": "Bearer fk-e2e-unknown-000000"},
            {"authorization": "Bearer " + ALICE[:-1]},
            {"authorization": ALICE},
            {"authorization": "Basic " + ALICE},
            {"authorization": "Bearer " + ALICE, "api_key": "sk-own"},
            {"api_key": "fk-e2e-unknown-000000"},
            {"x_api_key": "FK-" + ALICE[3:]},
        ):
            response, body = yield self.get("/v1/models", **headers)
            self.assertEqual(response.code, 401, headers)
            error = _json(body)["error"]
            self.assertEqual(error["code"], "invalid_api_key")
            self.assertEqual(error["type"], "invalid_request_error")
            self.assertEqual(
                response.headers.getRawHeaders(b"content-type"), [b"application/json"]
            )
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_official_sdk(self):
        """The official client works with a forward key and raises
        AuthenticationError / PermissionDeniedError for the refusals."""
        try:
            import openai
        except ImportError:
            raise self.skipTest("the openai package is not installed") from None
        from twisted.internet.threads import deferToThread

        yield self.start()

        def call(api_key):
            client = openai.OpenAI(base_url=self.url("/v1"), api_key=api_key, max_retries=0)
            try:
                return client.models.list().data[0].id
            except openai.APIStatusError as e:
                return type(e).__name__
            finally:
                client.close()

        self.assertEqual((yield deferToThread(call, ALICE)), "gpt-4o-mini")
        self.assertEqual((yield deferToThread(call, "fk-e2e-wrong-0000000")), "AuthenticationError")
        self.assertEqual(len(self.fake.seen), 1)

    @defer.inlineCallbacks
    def test_client_own_key_untouched_with_forward_keys_set(self):
        """With forward keys configured, a client's own sk- key is still passed through
        untouched."""
        yield self.start()
        response, _ = yield self.get(authorization="Bearer sk-client-own-key")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.fake.seen[0].header(b"authorization"), b"Bearer sk-client-own-key")

    @defer.inlineCallbacks
    def test_open_relay(self):
        """Only default keys: a keyless request gets one, and start-up warned."""
        yield self.start(FORWARD_KEY="")
        response, _ = yield self.get()
        self.assertEqual(self.fake.seen[0].header(b"authorization"), b"Bearer " + DEFAULT.encode())
        warnings = [
            formatEvent(e) for e in self.secrets_watch.events if e["log_level"] >= LogLevel.warn
        ]
        self.assertTrue(
            any("anyone who can reach this port spends your OpenAI keys" in w for w in warnings),
            warnings,
        )

    @defer.inlineCallbacks
    def test_no_open_relay_warning_with_forward_keys(self):
        """With forward keys configured the plugin does not log the open-relay warning."""
        yield self.start()
        self.assertFalse(
            [e for e in self.secrets_watch.events if "anyone who can reach" in formatEvent(e)]
        )


class IPGateE2E(ProxyTestCase):
    """The client here is 127.0.0.1, the proxy's loopback peer."""

    @defer.inlineCallbacks
    def status(self, path="/v1/models", method=b"GET", headers=None, body=None):
        from io import BytesIO

        from twisted.web.client import FileBodyProducer

        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        response = yield self.agent.request(
            method, self.url(path).encode(), Headers(headers or {}), producer
        )
        content = yield readBody(response)
        return response.code, content

    @defer.inlineCallbacks
    def test_blacklisted_refused_before_upstream(self):
        """A blacklisted client gets a 403 ip_not_allowed JSON error for GET and POST alike,
        and nothing reaches the upstream."""
        yield self.start_proxy(IP_BLACKLIST="127.0.0.0/8")
        code, body = yield self.status()
        self.assertEqual(code, 403)
        self.assertEqual(_json(body)["error"]["code"], "ip_not_allowed")
        code, _ = yield self.status("/v1/chat/completions", b"POST", body=b'{"model": "m"}')
        self.assertEqual(code, 403)
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_health_check_reachable_when_refused(self):
        """A client outside IP_WHITELIST still gets {"status": "ok"} from the health check
        (also under ROUTE_PREFIX), while API paths are refused and nothing goes upstream."""
        yield self.start_proxy(IP_WHITELIST="10.0.0.0/8", ROUTE_PREFIX="/openai")
        for path in ("/healthz", "/openai/healthz"):
            code, body = yield self.status(path)
            self.assertEqual((code, _json(body)), (200, {"status": "ok"}))
        code, _ = yield self.status("/openai/v1/models")
        self.assertEqual(code, 403)
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_whitelist(self):
        """IP_WHITELIST refuses the loopback client when neither 127.0.0.1 nor its network
        is listed (::1 does not cover it) and serves it once 127.0.0.1 is."""
        yield self.start_proxy(IP_WHITELIST="10.0.0.0/8, ::1")
        code, _ = yield self.status()
        self.assertEqual(code, 403)
        yield self.service.stopService()
        yield self.start_proxy(IP_WHITELIST="192.0.2.1 127.0.0.1")
        code, _ = yield self.status()
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_spoofed_forwarding_headers_ignored(self):
        """With no trusted proxy, X-Forwarded-For, Forwarded, X-Real-IP and True-Client-IP
        claiming a whitelisted address do not get the request past the gate."""
        yield self.start_proxy(IP_WHITELIST="198.51.100.0/24")
        spoof = {
            b"x-forwarded-for": [b"198.51.100.7"],
            b"forwarded": [b"for=198.51.100.7"],
            b"x-real-ip": [b"198.51.100.7"],
            b"true-client-ip": [b"198.51.100.7"],
        }
        code, _ = yield self.status(headers=spoof)
        self.assertEqual(code, 403)
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_behind_trusted_proxy(self):
        """127.0.0.1 plays nginx: its X-Forwarded-For is believed, and still
        never sent upstream."""
        yield self.start_proxy(IP_WHITELIST="198.51.100.0/24", TRUSTED_PROXIES="127.0.0.1")
        code, _ = yield self.status(headers={b"x-forwarded-for": [b"10.0.0.1, 198.51.100.7"]})
        self.assertEqual(code, 200)
        code, _ = yield self.status(headers={b"x-forwarded-for": [b"198.51.100.7, 203.0.113.1"]})
        self.assertEqual(code, 403)
        code, _ = yield self.status(headers={b"x-forwarded-for": [b"198.51.100.7 nonsense"]})
        self.assertEqual(code, 403)
        [seen] = self.fake.seen
        self.assertIsNone(seen.header(b"x-forwarded-for"))


class NothingLeaksE2E(ProxyTestCase):
    @defer.inlineCallbacks
    def get(self, path, headers=None):
        response = yield self.agent.request(b"GET", self.url(path).encode(), Headers(headers or {}))
        body = yield readBody(response)
        return response, body

    @defer.inlineCallbacks
    def test_no_client_identifying_header_upstream(self):
        """Client-identifying headers (forwarding headers, cookies) never reach the
        upstream, nor does the client's address anywhere in the headers; other headers
        pass."""
        yield self.start_proxy(OPENAI_API_KEY=DEFAULT)
        headers = {name: [b"203.0.113.9"] for name in CLIENT_IDENTIFYING}
        headers[b"cookie"] = [b"session=1"]
        headers[b"cookie2"] = [b"$Version=1"]
        headers[b"x-custom"] = [b"kept"]
        yield self.get("/echo", headers)
        [seen] = self.fake.seen
        names = {name.lower() for name, _ in seen.headers.getAllRawHeaders()}
        self.assertEqual(names & (CLIENT_IDENTIFYING | {b"cookie", b"cookie2"}), set())
        self.assertEqual(seen.header(b"x-custom"), b"kept")
        self.assertNotIn(b"203.0.113.9", repr(list(seen.headers.getAllRawHeaders())).encode())

    @defer.inlineCallbacks
    def test_upstream_error_echo_masked(self):
        """The fake's /status/<code> echoes the key it got."""
        yield self.start_proxy(OPENAI_API_KEY=DEFAULT, FORWARD_KEY=ALICE)
        for code in (400, 404, 500):
            response, body = yield self.get(
                f"/status/{code}", {b"authorization": [b"Bearer " + ALICE.encode()]}
            )
            self.assertEqual(response.code, code)
            message = _json(body)["error"]["message"]
            self.assertEqual(message, f"status {code}; key used: sk-***")
            self.assertEqual(response.length, len(body))

    @defer.inlineCallbacks
    def test_failover_then_echo_masked(self):
        """Both default keys refused (401): the last answer is relayed, masked,
        and the revocation warnings name the keys by position only."""
        yield self.start_proxy(OPENAI_API_KEY=f"{DEFAULT} {SECOND}")
        response, body = yield self.get("/status/401")
        self.assertEqual(response.code, 401)
        self.assertEqual(len(self.fake.seen), 2)
        self.assertIn(b"sk-***", body)
        texts = [formatEvent(e) for e in self.secrets_watch.events]
        self.assertTrue(any("default#0" in t for t in texts), texts)

    def echo_key(self, encode, encoding: bytes):
        def answer(request):
            auth = request.requestHeaders.getRawHeaders(b"authorization")[0]
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-encoding", encoding)
            return encode(b'{"error": {"message": "Incorrect API key provided: ' + auth[7:] + b'"}}')

        self.fake.override = answer

    @defer.inlineCallbacks
    def check_error_echo(self, encode, encoding: bytes, expected_message: str):
        yield self.start_proxy(OPENAI_API_KEY=DEFAULT)
        self.echo_key(encode, encoding)
        response, body = yield self.get("/v1/models", {b"accept-encoding": [b"gzip, deflate, br"]})
        self.assertEqual(response.code, 401)
        self.assertIsNone(response.headers.getRawHeaders(b"content-encoding"))
        self.assertEqual(response.length, len(body))
        self.assertEqual(_json(body)["error"]["message"], expected_message)

    def test_gzip_error_echo_decoded_and_masked(self):
        """A gzip-encoded upstream error that echoes the key is decoded and the key masked
        before the client gets it."""
        return self.check_error_echo(gzip.compress, b"gzip", "Incorrect API key provided: sk-***")

    def test_deflate_error_echo_decoded_and_masked(self):
        """A zlib-deflate upstream error that echoes the key is decoded and the key masked
        before the client gets it."""
        return self.check_error_echo(zlib.compress, b"deflate", "Incorrect API key provided: sk-***")

    def test_raw_deflate_error_echo_decoded_and_masked(self):
        """A raw-deflate upstream error that echoes the key is decoded and the key masked
        before the client gets it."""
        def raw(data):
            c = zlib.compressobj(wbits=-15)
            return c.compress(data) + c.flush()

        return self.check_error_echo(raw, b"deflate", "Incorrect API key provided: sk-***")

    def test_unknown_coding_withheld(self):
        """An upstream error in a coding the proxy cannot decode (br) is withheld and
        replaced by "unreadable", since a key inside it could not be masked."""
        return self.check_error_echo(
            gzip.compress, b"br", "The upstream's error answer was unreadable."
        )

    def test_stacked_codings_withheld(self):
        """An upstream error with stacked codings (gzip, gzip) is withheld rather than
        passed on unmasked."""
        return self.check_error_echo(
            lambda b: gzip.compress(gzip.compress(b)), b"gzip, gzip",
            "The upstream's error answer was unreadable.",
        )

    def test_gzip_bomb_withheld(self):
        """An upstream error that inflates to 8 MiB is withheld rather than decompressed
        whole to mask it."""
        big = b" " * (8 << 20)
        return self.check_error_echo(
            lambda b: gzip.compress(b[:-2] + big + b[-2:]), b"gzip",
            "The upstream's error answer was unreadable.",
        )

    @defer.inlineCallbacks
    def test_header_echo_masked(self):
        """A key the upstream echoes in a response header is masked before the client sees
        it."""
        yield self.start_proxy(OPENAI_API_KEY=DEFAULT)

        def answer(request):
            auth = request.requestHeaders.getRawHeaders(b"authorization")[0]
            request.setHeader(b"x-debug-authorization", auth)
            request.setHeader(b"content-type", b"text/plain")
            return b"ok"

        self.fake.override = answer
        response, body = yield self.get("/v1/models")
        self.assertEqual(body, b"ok")
        self.assertEqual(
            response.headers.getRawHeaders(b"x-debug-authorization"), [b"Bearer sk-***"]
        )

    @defer.inlineCallbacks
    def test_stream_echo_masked_across_chunks(self):
        """A key split across two writes of a stream is still masked, and
        events before it are not held back."""
        yield self.start_proxy(OPENAI_API_KEY=DEFAULT)
        events = chat_chunks("hi")
        key = DEFAULT.encode()
        cut = 9
        release = defer.Deferred()

        def answer(request):
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(events[0] + b'data: {"echo": "' + key[:cut])

            def rest(_):
                request.write(key[cut:] + b'"}\n\n' + b"".join(events[1:]))
                request.finish()

            release.addCallback(rest)
            return NOT_DONE_YET

        self.fake.override = answer
        response = yield self.agent.request(b"GET", self.url("/v1/chat/completions").encode())
        collector = Collector()
        response.deliverBody(collector)
        before = events[0] + b'data: {"echo": "'
        while len(collector.body) < len(before):
            yield collector.got_data
        # All but the possible start of a key arrived before the rest was sent.
        self.assertEqual(collector.body, before)
        self.assertFalse(release.called)
        reactor.callLater(0, release.callback, None)
        yield collector.done
        masked = b"sk-" + b"*" * (len(key) - 3)
        self.assertEqual(
            collector.body,
            events[0] + b'data: {"echo": "' + masked + b'"}\n\n' + b"".join(events[1:]),
        )


    @defer.inlineCallbacks
    def test_unreachable_upstream_error_and_logs_keyless(self):
        """The proxy's own 502 and its log line hold no key (the watch
        checks the log line and the bytes)."""
        yield self.start_proxy(
            ["--base-url", "http://127.0.0.1:1"], OPENAI_API_KEY=DEFAULT, FORWARD_KEY=ALICE
        )
        response, body = yield self.get(
            "/v1/models", {b"authorization": [b"Bearer " + ALICE.encode()]}
        )
        self.assertEqual(response.code, 502)
        self.assertEqual(_json(body)["error"]["code"], "upstream_unreachable")
        texts = [formatEvent(e) for e in self.secrets_watch.events]
        self.assertTrue(any("upstream unreachable" in t for t in texts), texts)

    @defer.inlineCallbacks
    def test_body_ending_like_a_key_delivered_whole(self):
        """What the mask held back as a possible key start is sent at the end."""
        yield self.start_proxy(OPENAI_API_KEY=DEFAULT)
        self.fake.override = lambda request: b"no key here, just sk-e2e"
        response, body = yield self.get("/v1/models")
        self.assertEqual(body, b"no key here, just sk-e2e")


class SecretsWatchE2E(ProxyTestCase):
    """The watch over every end-to-end test can fail."""

    @defer.inlineCallbacks
    def test_watch_catches_leaks(self):
        """The secrets watch reports a key in the bytes sent to a client, a key in a log
        event, a client-identifying header and a forward key reaching the upstream: it
        can fail, so its silence in other tests means something."""
        yield self.start_proxy(OPENAI_API_KEY=DEFAULT, FORWARD_KEY=ALICE)
        watch = self.secrets_watch
        self.assertEqual(watch.leaks(self), [])
        # Turn the mask off: the fake's echo now carries the key back.
        self.patch(DefaultKeys, "mask", lambda keys: SecretMask(()))
        response = yield self.agent.request(
            b"GET", self.url("/echo").encode(), Headers({b"authorization": [b"Bearer " + ALICE.encode()]})
        )
        body = yield readBody(response)
        self.assertIn(DEFAULT.encode(), body)
        self.assertIn("default key #0 in the bytes sent to a client", watch.leaks(self))
        Logger().info("careless {value}", value=b"Bearer " + DEFAULT[3:].encode())
        self.assertIn("default key #0 in a log event ('careless {value}')", watch.leaks(self))
        self.fake.seen.append(
            Seen(b"GET", b"/", Headers({b"x-real-ip": [b"1.2.3.4"], b"x-k": [ALICE.encode()]}), b"")
        )
        leaks = watch.leaks(self)
        self.assertIn("header b'X-Real-Ip' reached the upstream", leaks)
        self.assertIn("forward key #0 reached the upstream", leaks)
        # Clean up what this test put there, so the watch's own check passes.
        del watch.written[:], watch.events[:], self.fake.seen[:]
        self.assertEqual(watch.leaks(self), [])
