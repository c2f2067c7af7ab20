"""FORWARD_CONFIG: several upstreams under several routes, general routes."""

from __future__ import annotations

import json

from twisted.internet import defer

from .fake_upstream import FakeOpenAI, chat_chunks, fake_site
from .harness import Collector, ProxyTestCase, listen_tracked


class RouteTests(ProxyTestCase):
    def setUp(self):
        super().setUp()
        self.other = FakeOpenAI()
        self.other_port, tracker = listen_tracked(fake_site(self.other))

        @defer.inlineCallbacks
        def stop():
            yield self.other_port.stopListening()
            yield tracker.closed()

        self.addCleanup(stop)

    def forward_config(self) -> str:
        return json.dumps(
            [
                {"base_url": f"http://127.0.0.1:{self.upstream_port}", "route": "/", "type": "openai"},
                {"base_url": f"http://127.0.0.1:{self.other_port.getHost().port}/api",
                 "route": "/gemini", "type": "general"},
            ]
        )

    @defer.inlineCallbacks
    def test_two_upstreams(self):
        """FORWARD_CONFIG routes /v1 to the OpenAI upstream with the default key and /gemini
        to the general upstream under its base path, where the client's own credentials
        pass untouched and no default key is added."""
        yield self.start_proxy(FORWARD_CONFIG=self.forward_config(), OPENAI_API_KEY="sk-route-default")
        response = yield self.client.get(self.url("/v1/models"))
        yield response.content()
        response = yield self.client.get(
            self.url("/gemini/v1beta/models?key=client-own"),
            headers={b"x-goog-api-key": b"client-own-key"},
        )
        yield response.content()
        self.assertEqual([s.uri for s in self.fake.seen], [b"/v1/models"])
        self.assertEqual(self.fake.seen[0].header(b"authorization"), b"Bearer sk-route-default")
        [seen] = self.other.seen
        self.assertEqual(seen.uri, b"/api/v1beta/models?key=client-own")
        # A general route is a byte pipe: no default key is put in.
        self.assertIsNone(seen.header(b"authorization"))
        self.assertEqual(seen.header(b"x-goog-api-key"), b"client-own-key")

    @defer.inlineCallbacks
    def test_general_route_sse_event_by_event(self):
        """A general route relays an event stream as it arrives: the client has the first
        two events while the upstream still holds the rest."""
        config = json.dumps(
            [{"base_url": f"http://127.0.0.1:{self.other_port.getHost().port}",
              "route": "/local", "type": "general"}]
        )
        yield self.start_proxy(FORWARD_CONFIG=config)
        self.other.hold_at = 2
        response = yield self.client.post(
            self.url("/local/v1/chat/completions"),
            data=json.dumps({"model": "m", "stream": True}).encode(),
            unbuffered=True,
        )
        collector = Collector()
        response.deliverBody(collector)
        events = chat_chunks(self.other.answer_text, "m")
        while len(collector.body) < len(events[0] + events[1]):
            yield collector.got_data
        self.assertFalse(self.other.release.called)
        self.other.release.callback(None)
        yield collector.done
        self.assertEqual(collector.body, b"".join(events))

    @defer.inlineCallbacks
    def test_unrouted_path_404_and_health_under_prefixes(self):
        """A path under no route gets a 404 unknown_route error, the health check answers at
        the root and under every route prefix, and none of these reach an upstream."""
        config = json.dumps(
            [{"base_url": f"http://127.0.0.1:{self.upstream_port}", "route": "/openai", "type": "openai"},
             {"base_url": f"http://127.0.0.1:{self.other_port.getHost().port}", "route": "/local",
              "type": "general"}]
        )
        yield self.start_proxy(FORWARD_CONFIG=config)
        response = yield self.client.get(self.url("/other/v1/models"))
        self.assertEqual(json.loads((yield response.content()))["error"]["code"], "unknown_route")
        for path in ("/healthz", "/openai/healthz", "/local/healthz"):
            response = yield self.client.get(self.url(path))
            self.assertEqual(json.loads((yield response.content())), {"status": "ok"})
        self.assertEqual(self.fake.seen + self.other.seen, [])

    @defer.inlineCallbacks
    def test_health_path_configurable(self):
        """HEALTHZ_PATH moves the health check (also under ROUTE_PREFIX), and /healthz then
        becomes an ordinary path forwarded upstream."""
        yield self.start_proxy(HEALTHZ_PATH="/ping", ROUTE_PREFIX="/openai")
        for path in ("/ping", "/openai/ping"):
            response = yield self.client.get(self.url(path))
            self.assertEqual(json.loads((yield response.content())), {"status": "ok"})
        # The default path is now an ordinary one: forwarded under the prefix.
        response = yield self.client.get(self.url("/openai/healthz"))
        yield response.content()
        self.assertEqual([s.uri for s in self.fake.seen], [b"/healthz"])
