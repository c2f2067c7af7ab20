"""Prometheus metrics and the access log line, end to end."""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.logger import globalLogPublisher

from .harness import ProxyTestCase, listeners

KEYS = "sk-metrics-secret-one sk-metrics-secret-two"
FORWARD = "alice:fk-alice-metrics-1"


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output (0 if absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return 0.0


class MetricsTests(ProxyTestCase):
    """What the metrics count (scraped on the proxy's port, METRICS=public;
    who may scrape where: tests/test_metrics_access.py)."""

    proxy_settings = {"METRICS": "public"}

    @defer.inlineCallbacks
    def scrape(self, url=None) -> defer.Deferred:
        response = yield self.client.get(url or self.url("/metrics"))
        self.assertEqual(response.code, 200)
        self.assertTrue(
            response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        )
        return (yield response.content()).decode()

    @defer.inlineCallbacks
    def test_counts_what_was_done_and_holds_no_secret(self):
        """After a chat, a refused key and a 429 failover, /metrics counts each by route,
        status, key label and outcome, plus refusals, failovers, first-byte times and
        relayed bytes, and holds no key nor client address."""
        yield self.start_proxy(OPENAI_API_KEY=KEYS, FORWARD_KEY=FORWARD)
        ok = {b"authorization": b"Bearer fk-alice-metrics-1"}
        response = yield self.client.post(
            self.url("/v1/chat/completions"),
            data=json.dumps({"model": "m", "messages": []}).encode(),
            headers=ok,
        )
        body = yield response.content()
        response = yield self.client.get(
            self.url("/v1/models"), headers={b"authorization": b"Bearer fk-wrong-123456"}
        )
        yield response.content()
        self.assertEqual(response.code, 401)
        # Both default keys answer 429: one failover, then the 429 relayed.
        response = yield self.client.get(self.url("/status/429"), headers=ok)
        yield response.content()
        self.assertEqual(response.code, 429)
        text = yield self.scrape()
        self.assertEqual(
            _sample(text, "openai_forward_requests_total", route="/", status="200",
                    key="alice", outcome="complete"), 1)
        self.assertEqual(
            _sample(text, "openai_forward_requests_total", status="429", key="alice"), 1)
        self.assertEqual(_sample(text, "openai_forward_refusals_total", reason="invalid_api_key"), 1)
        self.assertEqual(_sample(text, "openai_forward_key_failovers_total", status="429"), 1)
        self.assertEqual(
            _sample(text, "openai_forward_upstream_first_byte_seconds_count", route="/"), 2)
        self.assertGreaterEqual(
            _sample(text, "openai_forward_relayed_bytes_total", route="/"), len(body))
        self.assertEqual(_sample(text, "openai_forward_open_exchanges", route="/"), 0)
        for secret in KEYS.split() + ["fk-alice-metrics-1", "fk-wrong", "127.0.0.1"]:
            self.assertNotIn(secret, text)

    @defer.inlineCallbacks
    def test_open_stream_gauge(self):
        """The open-exchanges gauge is 1 while a stream is held open and 0 once it ends."""
        yield self.start_proxy()
        self.fake.hold_at = 2
        response, collector = yield self.open_stream("/v1/chat/completions")
        yield collector.got_data
        text = yield self.scrape()
        self.assertEqual(_sample(text, "openai_forward_open_exchanges", route="/"), 1)
        self.fake.release.callback(None)
        yield collector.done
        text = yield self.scrape()
        self.assertEqual(_sample(text, "openai_forward_open_exchanges", route="/"), 0)

    @defer.inlineCallbacks
    def test_disabled_path_is_forwarded(self):
        """With METRICS=false, /metrics is an ordinary path forwarded to the upstream."""
        yield self.start_proxy(METRICS="false")
        response = yield self.client.get(self.url("/metrics"))
        yield response.content()
        self.assertEqual([s.uri for s in self.fake.seen], [b"/metrics"])

    @defer.inlineCallbacks
    def test_path_configurable(self):
        """METRICS_PATH moves the scrape path; /metrics is then forwarded upstream like any
        path."""
        yield self.start_proxy(METRICS_PATH="/internal/prom")
        text = yield self.scrape(self.url("/internal/prom"))
        self.assertIn("openai_forward_requests_total", text)
        response = yield self.client.get(self.url("/metrics"))
        yield response.content()
        self.assertEqual([s.uri for s in self.fake.seen], [b"/metrics"])

    @defer.inlineCallbacks
    def test_own_port(self):
        """METRICS_PORT serves the metrics on their own listener without a Server header,
        and /metrics on the proxy's port is then forwarded upstream."""
        yield self.start_proxy(METRICS="true", METRICS_PORT="tcp:0:interface=127.0.0.1")
        found = listeners(self.service)
        self.assertEqual(len(found), 2)
        port = found[1].endpoint.port.getHost().port
        text = yield self.scrape(f"http://127.0.0.1:{port}/metrics")
        self.assertIn("openai_forward_requests_total", text)
        scraped = yield self.client.get(f"http://127.0.0.1:{port}/metrics")
        yield scraped.content()
        self.assertFalse(scraped.headers.hasHeader(b"server"))  # no TwistedWeb/<version>

    @defer.inlineCallbacks
    def test_public_port_needs_admin_key(self):
        """With ADMIN_KEY set, /metrics on the proxy's public port needs it
        as a Bearer token (401, OpenAI-shaped, otherwise); the key itself
        is never in the answer."""
        admin = "admin-metrics-key-0123456789"
        yield self.start_proxy(METRICS="true", ADMIN_KEY=admin)
        for headers in ({}, {b"authorization": [b"Bearer wrong-admin-key"]}):
            response = yield self.client.get(self.url("/metrics"), headers=headers)
            body = json.loads((yield response.content()))
            self.assertEqual(response.code, 401)
            self.assertEqual(body["error"]["code"], "invalid_admin_key")
        response = yield self.client.get(
            self.url("/metrics"), headers={b"authorization": [b"Bearer " + admin.encode()]})
        text = (yield response.content()).decode()
        self.assertEqual(response.code, 200)
        self.assertIn("openai_forward_requests_total", text)
        self.assertNotIn(admin, text)
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_access_line(self):
        """Each request logs one access event with method, path without query, status,
        route, key label and upstream time, and no key in its text."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        yield self.start_proxy(OPENAI_API_KEY=KEYS, FORWARD_KEY=FORWARD)
        response = yield self.client.get(
            self.url("/v1/models?x=1"), headers={b"authorization": b"Bearer fk-alice-metrics-1"}
        )
        yield response.content()
        [line] = [e for e in events if e.get("log_namespace") == "twisted_forward.access"]
        self.assertEqual(
            (line["method"], line["path"], line["status"], line["route"], line["key"]),
            ("GET", "/v1/models", 200, "/", "alice"),
        )
        self.assertIsInstance(line["upstream_ms"], float)
        from twisted.logger import formatEvent

        self.assertNotIn("sk-metrics", formatEvent(line))
