"""
Upstream faults end to end, through the real plugin: a stalled head, a
stream that goes silent, a connection reset mid-body, a key the upstream
refuses.  (The timers themselves are tested on a MemoryReactorClock in
test_proxy_unit; these short real timeouts only prove the wiring.)
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.web.client import ResponseFailed

from .harness import Collector, ProxyTestCase
from .test_metrics import _sample


class FaultTests(ProxyTestCase):
    #: They scrape /metrics on the proxy's port, without the admin key.
    proxy_settings = {"METRICS": "public"}

    @defer.inlineCallbacks
    def metrics(self) -> defer.Deferred:
        response = yield self.client.get(self.url("/metrics"))
        return (yield response.content()).decode()

    @defer.inlineCallbacks
    def test_stalled_head_is_504_and_upstream_request_dropped(self):
        """An upstream that never sends its answer head gives the client a 504
        upstream_timeout after READ_TIMEOUT, and the proxy serves the next request
        normally."""
        yield self.start_proxy(READ_TIMEOUT="0.2")
        response = yield self.client.get(self.url("/stall"))
        body = json.loads((yield response.content()))
        self.assertEqual(response.code, 504)
        self.assertEqual(body["error"]["code"], "upstream_timeout")
        # The proxy keeps serving.
        response = yield self.client.get(self.url("/v1/models"))
        self.assertEqual(response.code, 200)
        yield response.content()

    @defer.inlineCallbacks
    def test_stream_gone_silent_is_cut_and_counted(self):
        """A stream that goes silent for IDLE_TIMEOUT is cut: the client sees a failed
        response (not a hang, nor a clean end without [DONE]) and the cut is counted as
        outcome idle_timeout."""
        yield self.start_proxy(IDLE_TIMEOUT="0.2")
        self.fake.hold_at = 2  # two events, then silence
        response, collector = yield self.open_stream()
        yield collector.done
        # The client sees its stream broken off, not a hang nor a clean end.
        self.assertIsInstance(collector.reason.value, ResponseFailed)
        self.assertIn(b"data: ", collector.body)
        self.assertNotIn(b"[DONE]", collector.body)
        text = yield self.metrics()
        self.assertEqual(
            _sample(text, "openai_forward_requests_total", outcome="idle_timeout"), 1
        )
        self.fake.release.callback(None)  # let the fake finish its side

    @defer.inlineCallbacks
    def test_reset_mid_body_breaks_the_client_stream(self):
        """The upstream drops after half its declared body: the client must
        not take the half for a whole answer."""
        yield self.start_proxy()
        response = yield self.client.get(self.url("/drop"), unbuffered=True)
        collector = Collector()
        response.deliverBody(collector)
        yield collector.done
        self.assertIsInstance(collector.reason.value, ResponseFailed)
        self.assertEqual(len(collector.body), 500)
        text = yield self.metrics()
        self.assertEqual(
            _sample(text, "openai_forward_requests_total", outcome="upstream_error"), 1
        )

    @defer.inlineCallbacks
    def test_reset_mid_stream(self):
        """An upstream reset mid-stream reaches the client as a failed response after the
        data already relayed, never as a clean end, and the proxy serves on."""
        yield self.start_proxy()
        response = yield self.client.get(self.url("/reset"), unbuffered=True)
        collector = Collector()
        response.deliverBody(collector)
        yield collector.got_data
        self.fake.reset.callback(None)
        yield collector.done
        self.assertIsInstance(collector.reason.value, ResponseFailed)
        self.assertEqual(collector.body, b'data: {"n": 1}\n\n')
        # And the proxy serves on.
        response = yield self.client.get(self.url("/v1/models"))
        self.assertEqual(response.code, 200)
        yield response.content()

    @defer.inlineCallbacks
    def test_refused_key_leaves_the_rotation(self):
        """A default key answered 401 is not used again; the request that
        found out was served by the next key."""
        yield self.start_proxy(OPENAI_API_KEY="sk-revoked-key-000 sk-good-key-0001")
        bad = b"Bearer sk-revoked-key-000"

        def override(request):
            auth = request.requestHeaders.getRawHeaders(b"authorization")[0]
            request.setHeader(b"content-type", b"application/json")
            if auth == bad:
                request.setResponseCode(401)
                return json.dumps({"error": {"message": "Incorrect API key provided: "
                                             + auth[7:].decode(),
                                             "code": "invalid_api_key"}}).encode()
            return b'{"ok": true}'

        self.fake.override = override
        for _ in range(3):
            response = yield self.client.get(self.url("/v1/models"))
            self.assertEqual(json.loads((yield response.content())), {"ok": True})
        self.assertEqual(
            [s.header(b"authorization") for s in self.fake.seen],
            [bad, b"Bearer sk-good-key-0001", b"Bearer sk-good-key-0001", b"Bearer sk-good-key-0001"],
        )
        text = yield self.metrics()
        self.assertEqual(_sample(text, "openai_forward_default_keys", state="revoked"), 1)
        self.assertEqual(_sample(text, "openai_forward_default_keys", state="active"), 1)
        self.assertNotIn("sk-revoked", text)
