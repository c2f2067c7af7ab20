"""
End-to-end: the real plugin service forwarding to the fake upstream.
"""

from __future__ import annotations

import json
import os
from io import BytesIO

from twisted.internet import defer
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from .fake_upstream import chat_answer, chat_chunks
from .harness import ProxyTestCase


def _json(body: bytes) -> dict:
    return json.loads(body.decode("utf-8"))


class ForwardingTests(ProxyTestCase):
    """Method, path, query and body reach the upstream; the answer comes back."""

    @defer.inlineCallbacks
    def test_chat_completion(self):
        """A chat completion through the real plugin reaches the upstream with its method,
        path, body and content type unchanged, and the client gets the upstream's answer,
        content type and x-request-id."""
        yield self.start_proxy()
        body = json.dumps(
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        ).encode()
        response = yield self.client.post(
            self.url("/v1/chat/completions"),
            data=body,
            headers={b"content-type": b"application/json"},
        )
        answer = yield response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(_json(answer), chat_answer(self.fake.answer_text, "gpt-4o-mini"))
        [seen] = self.fake.seen
        self.assertEqual(seen.method, b"POST")
        self.assertEqual(seen.uri, b"/v1/chat/completions")
        self.assertEqual(seen.body, body)
        self.assertEqual(seen.header(b"content-type"), b"application/json")
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"application/json"]
        )
        self.assertEqual(response.headers.getRawHeaders(b"x-request-id"), [b"req-fake"])

    @defer.inlineCallbacks
    def test_sse_arrives_event_by_event(self):
        """The first events reach the client while the upstream still holds
        the rest back: nothing waits for the end of the answer."""
        yield self.start_proxy()
        self.fake.hold_at = 2
        response, collector = yield self.open_stream("/v1/chat/completions")
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"]
        )
        events = chat_chunks(self.fake.answer_text, "m")
        while len(b"".join(collector.chunks)) < len(events[0] + events[1]):
            yield collector.got_data
        self.assertEqual(b"".join(collector.chunks), events[0] + events[1])
        self.assertFalse(self.fake.release.called)
        self.assertFalse(collector.done.called)
        self.fake.release.callback(None)
        yield collector.done
        self.assertEqual(collector.body, b"".join(events))

    @defer.inlineCallbacks
    def test_multipart_upload_byte_for_byte(self):
        """A 300 kB multipart upload (above Twisted's in-memory threshold) reaches the
        upstream byte for byte with its boundary and Content-Length: file uploads are not
        re-encoded or parsed."""
        yield self.start_proxy()
        payload = os.urandom(300_000)  # above Twisted's in-memory threshold
        boundary = b"----tfboundary7MA4YWxkTrZu0gW"
        body = (
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
            b"fine-tune\r\n--" + boundary
            + b'\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + payload
            + b"\r\n--" + boundary + b"--\r\n"
        )
        ctype = b"multipart/form-data; boundary=" + boundary
        response = yield self.client.post(
            self.url("/v1/files"), data=body, headers={b"content-type": ctype}
        )
        answer = _json((yield response.content()))
        import base64

        self.assertEqual(answer["content_type"], ctype.decode())
        self.assertEqual(base64.b64decode(answer["body_b64"]), body)
        [seen] = self.fake.seen
        self.assertEqual(seen.header(b"content-length"), b"%d" % len(body))

    @defer.inlineCallbacks
    def test_listen_backlog(self):
        """A burst of connections does not overflow Twisted's default 50."""
        yield self.start_proxy()
        self.assertEqual(self.listening_port.backlog, 1024)

    @defer.inlineCallbacks
    def test_delete_and_get(self):
        """DELETE and GET requests are forwarded with their methods and the upstream's
        answers come back."""
        yield self.start_proxy()
        response = yield self.client.delete(self.url("/v1/files/file-abc"))
        self.assertEqual(
            _json((yield response.content())),
            {"id": "file-abc", "object": "file", "deleted": True},
        )
        response = yield self.client.get(self.url("/v1/models"))
        self.assertEqual(_json((yield response.content()))["data"][0]["id"], "gpt-4o-mini")
        self.assertEqual([s.method for s in self.fake.seen], [b"DELETE", b"GET"])

    @defer.inlineCallbacks
    def test_query_string_raw(self):
        """The query string reaches the upstream exactly as sent (empty pairs, +, %20, %2F,
        a bare flag): nothing is decoded or re-encoded."""
        yield self.start_proxy()
        target = "/echo?limit=2&&order=desc&a+b=%20c&flag&x=%2F"
        response = yield self.client.get(self.url(target))
        yield response.content()
        self.assertEqual(self.fake.seen[0].uri, target.encode())

    @defer.inlineCallbacks
    def test_upstream_errors_pass_through(self):
        """Upstream 400, 404, 429, 500 and 503 answers reach the client with their status
        and the upstream's own error body, not replaced by the proxy's."""
        yield self.start_proxy()
        for code in (400, 404, 429, 500, 503):
            response = yield self.client.get(
                self.url(f"/status/{code}"), headers={b"authorization": b"Bearer sk-own"}
            )
            body = _json((yield response.content()))
            self.assertEqual(response.code, code)
            self.assertEqual(body["error"]["type"], "test")

    @defer.inlineCallbacks
    def test_gzip_relayed_verbatim(self):
        """Compressed answers are relayed as the upstream sent them, and the
        client's own Accept-Encoding is what the upstream sees."""
        yield self.start_proxy()
        import gzip

        # A bare Agent: treq's client would decode the answer itself.
        response = yield self.agent.request(
            b"GET", self.url("/gzip").encode(), Headers({b"accept-encoding": [b"gzip, br"]})
        )
        raw = yield readBody(response)

        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertEqual(gzip.decompress(raw), b'{"zipped": true}')
        self.assertEqual(self.fake.seen[0].headers.getRawHeaders(b"accept-encoding"), [b"gzip, br"])
        response = yield self.agent.request(b"GET", self.url("/echo").encode())
        yield readBody(response)
        self.assertIsNone(self.fake.seen[1].header(b"accept-encoding"))

    @defer.inlineCallbacks
    def test_large_answer_streams_whole(self):
        """A 5 MB answer reaches the client whole, with its Content-Length."""
        yield self.start_proxy()
        response = yield self.client.get(self.url("/big/5000000"))
        self.assertEqual(response.length, 5_000_000)
        body = yield response.content()
        self.assertEqual(len(body), 5_000_000)


class KeyTests(ProxyTestCase):
    """Default keys in turn; a client's own key overrides them."""

    @defer.inlineCallbacks
    def test_default_keys_in_turn(self):
        """Two default keys are used in turn, one request each, so the load is spread across
        them."""
        yield self.start_proxy(OPENAI_API_KEY="sk-test-one, sk-test-two")
        for _ in range(4):
            response = yield self.client.get(self.url("/echo"))
            yield response.content()
        self.assertEqual(
            [s.header(b"authorization") for s in self.fake.seen],
            [b"Bearer sk-test-one", b"Bearer sk-test-two"] * 2,
        )

    @defer.inlineCallbacks
    def test_client_key_untouched(self):
        """A client's own key is sent upstream instead of the default key, unchanged."""
        yield self.start_proxy(OPENAI_API_KEY="sk-test-one")
        response = yield self.client.get(
            self.url("/echo"), headers={b"authorization": b"Bearer sk-client-own"}
        )
        yield response.content()
        self.assertEqual(self.fake.seen[0].header(b"authorization"), b"Bearer sk-client-own")

    @defer.inlineCallbacks
    def test_no_keys_no_authorization(self):
        """With no keys configured and none sent, the upstream request has no Authorization
        header."""
        yield self.start_proxy()
        response = yield self.client.get(self.url("/echo"))
        yield response.content()
        self.assertIsNone(self.fake.seen[0].header(b"authorization"))


class RoutePrefixTests(ProxyTestCase):
    @defer.inlineCallbacks
    def test_prefix_stripped(self):
        """With ROUTE_PREFIX=/openai, /openai/v1/models?x=1 reaches the upstream as
        /v1/models?x=1."""
        yield self.start_proxy(ROUTE_PREFIX="/openai")
        response = yield self.client.get(self.url("/openai/v1/models?x=1"))
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertEqual(self.fake.seen[0].uri, b"/v1/models?x=1")

    @defer.inlineCallbacks
    def test_outside_prefix_is_404_json(self):
        """Paths outside ROUTE_PREFIX (no prefix, the prefix without its slash, the root)
        get a 404 unknown_route JSON error and never reach the upstream."""
        yield self.start_proxy(ROUTE_PREFIX="/openai")
        for path in ("/v1/models", "/openaiv1/models", "/"):
            response = yield self.client.get(self.url(path))
            body = _json((yield response.content()))
            self.assertEqual(response.code, 404)
            self.assertEqual(body["error"]["code"], "unknown_route")
            self.assertEqual(
                response.headers.getRawHeaders(b"content-type"), [b"application/json"]
            )
        self.assertEqual(self.fake.seen, [])


class HeaderHygieneTests(ProxyTestCase):
    @defer.inlineCallbacks
    def test_request_headers(self):
        """No hop-by-hop header, no client Host, cookie or origin reaches the
        upstream; ordinary headers do."""
        yield self.start_proxy()
        headers = Headers(
            {
                b"connection": [b"x-secret-hop"],
                b"x-secret-hop": [b"1"],
                b"keep-alive": [b"timeout=5"],
                b"te": [b"trailers"],
                b"upgrade": [b"h2c"],
                b"proxy-authorization": [b"Basic Zm9vOmJhcg=="],
                b"x-forwarded-for": [b"203.0.113.9"],
                b"x-real-ip": [b"203.0.113.9"],
                b"forwarded": [b"for=203.0.113.9"],
                b"via": [b"1.1 corp-proxy"],
                b"true-client-ip": [b"203.0.113.9"],
                b"cf-connecting-ip": [b"203.0.113.9"],
                b"cookie": [b"session=abc"],
                b"host": [b"proxy.example"],
                b"openai-organization": [b"org-1"],
                b"user-agent": [b"tf-test"],
            }
        )
        response = yield self.client.get(self.url("/echo"), headers=headers)
        yield response.content()
        seen = self.fake.seen[0]
        names = {name.lower() for name, _ in seen.headers.getAllRawHeaders()}
        for banned in (
            b"x-secret-hop", b"keep-alive", b"te", b"upgrade", b"proxy-authorization",
            b"x-forwarded-for", b"x-real-ip", b"forwarded", b"via", b"true-client-ip",
            b"cf-connecting-ip", b"cookie",
        ):
            self.assertNotIn(banned, names)
        self.assertEqual(seen.header(b"host"), b"127.0.0.1:%d" % self.upstream_port)
        self.assertEqual(seen.header(b"openai-organization"), b"org-1")
        self.assertEqual(seen.header(b"user-agent"), b"tf-test")

    @defer.inlineCallbacks
    def test_response_headers(self):
        """Upstream hop-by-hop headers are dropped; no Twisted Server or
        default content type leaks into relayed answers."""
        yield self.start_proxy()
        response = yield self.client.get(self.url("/hop"))
        yield response.content()
        h = response.headers
        self.assertEqual(h.getRawHeaders(b"x-custom"), [b"kept"])
        self.assertEqual(h.getRawHeaders(b"server"), [b"fake-openai"])
        # (Twisted's HTTP client keeps the upstream's Connection header to
        # itself, so headers the upstream lists there cannot be recognised;
        # the standard hop-by-hop ones always are.)
        for banned in (b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate"):
            self.assertIsNone(h.getRawHeaders(banned))
        response = yield self.client.get(self.url("/bare"))
        self.assertEqual((yield response.content()), b"ok")
        self.assertIsNone(response.headers.getRawHeaders(b"server"))
        self.assertIsNone(response.headers.getRawHeaders(b"content-type"))
        self.assertEqual(len(response.headers.getRawHeaders(b"date")), 1)

    @defer.inlineCallbacks
    def test_upstream_cookies_not_shared(self):
        """A cookie one client's request got is never sent upstream for
        another request."""
        yield self.start_proxy()
        response = yield self.client.get(self.url("/cookie"))
        yield response.content()
        self.assertTrue(response.headers.getRawHeaders(b"set-cookie"))
        response = yield self.client.get(self.url("/echo"))
        yield response.content()
        self.assertIsNone(self.fake.seen[1].header(b"cookie"))


class FailoverEndToEndTests(ProxyTestCase):
    @defer.inlineCallbacks
    def test_large_and_chunked_bodies_replayed_to_next_key(self):
        """A body spooled to disk (over 100 kB, or chunked) is sent whole to
        each default key tried."""
        yield self.start_proxy(OPENAI_API_KEY="sk-fail-one sk-fail-two")
        body = os.urandom(300_000)
        response = yield self.client.post(self.url("/status/429"), data=body)
        yield response.content()
        self.assertEqual(response.code, 429)
        self.assertEqual([s.body for s in self.fake.seen], [body, body])
        self.assertEqual(
            [s.header(b"authorization") for s in self.fake.seen],
            [b"Bearer sk-fail-one", b"Bearer sk-fail-two"],
        )
        # A chunked body (the Agent sends one when the length is unknown).
        self.fake.seen.clear()
        producer = FileBodyProducer(BytesIO(b"small chunked body"))
        producer.length = UNKNOWN_LENGTH
        response = yield self.agent.request(
            b"POST", self.url("/status/500").encode(), None, producer
        )
        yield readBody(response)
        self.assertEqual(response.code, 500)
        self.assertEqual([s.body for s in self.fake.seen], [b"small chunked body"] * 2)
