"""
The admin API end to end: the real plugin with ADMIN_KEY set, in front of
the fake upstream, asked over HTTP.  The secrets watch (tests/harness.py)
checks every test for the admin key, the default keys and the forward keys
in anything sent or logged.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from twisted_forward.admin.resource import CONTENT_SECURITY_POLICY
from twisted_forward.tap import ProxyService

from .harness import Collector, ProxyTestCase

ADMIN = "admin-secret-0123456789abcdef"
DEFAULTS = "sk-admin-test-default-000 sk-admin-test-default-111 sk-admin-test-default-222"
FORWARD = "alice:fk-alice-admin-test-1 bob:fk-bob-admin-test-22"
ALICE = {b"authorization": [b"Bearer fk-alice-admin-test-1"]}
BOB = {b"authorization": [b"Bearer fk-bob-admin-test-22"]}
JSON = {b"content-type": [b"application/json"]}


def chat(text: str, model: str = "gpt-4o-mini", stream: bool = False) -> bytes:
    return json.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]}
    ).encode()


class AdminTestCase(ProxyTestCase):
    """Starts the proxy with the admin on and asks its API."""

    @defer.inlineCallbacks
    def start_admin(self, **env: str) -> Any:
        settings = dict(ADMIN_KEY=ADMIN, OPENAI_API_KEY=DEFAULTS, FORWARD_KEY=FORWARD)
        settings.update(env)
        yield self.start_proxy(**settings)
        [service] = [s for s in self.service if isinstance(s, ProxyService)]
        self.admin = service.built.admin

    @defer.inlineCallbacks
    def get(self, path: str, key: Optional[str] = ADMIN, base: Optional[str] = None,
            **headers: Any) -> Any:
        """GET ``path``; returns (response, body bytes)."""
        sent = {k.encode(): v for k, v in headers.items()}
        if key is not None:
            sent[b"authorization"] = [b"Bearer " + key.encode()]
        response = yield self.client.get(
            (base or self.base) + path, headers=sent, allow_redirects=False
        )
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def api(self, path: str) -> Any:
        """GET an API path with the admin key; returns the JSON answer."""
        response, body = yield self.get(path)
        self.assertEqual(response.code, 200, body)
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-store"])
        return json.loads(body)

    @defer.inlineCallbacks
    def send(self, text: str, who: dict = ALICE, model: str = "gpt-4o-mini",
             stream: bool = False) -> Any:
        """One chat exchange through the proxy; returns the status."""
        response = yield self.client.post(
            self.url("/v1/chat/completions"), data=chat(text, model, stream),
            headers={**who, **JSON},
        )
        yield response.content()
        return response.code


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of Prometheus text output (0 if absent)."""
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return 0.0


class AuthTests(AdminTestCase):
    """Every API call needs the admin key, and the admin key opens nothing else."""

    @defer.inlineCallbacks
    def test_off_without_admin_key(self):
        """Without ADMIN_KEY, /_admin/ is a 404 of the proxy's own and is
        never forwarded upstream."""
        yield self.start_proxy(OPENAI_API_KEY=DEFAULTS)
        for path in ("/_admin/", "/_admin/api/keys", "/_admin"):
            response, body = yield self.get(path, key=None)
            self.assertEqual(response.code, 404)
            self.assertEqual(json.loads(body)["error"]["code"], "admin_off")
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_missing_or_wrong_key_refused_counted_never_logged(self):
        """No key, a wrong key, a forward key, a default key, a bare or
        malformed header: each a 401 in OpenAI's shape, counted, and the
        attempted key in no log event."""
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        yield self.start_admin()
        wrong = "admin-guess-9876543210zyxwvu"
        attempts: list[dict[str, Any]] = [
            {},
            {"authorization": [b"Bearer " + wrong.encode()]},
            {"authorization": [b"Bearer fk-alice-admin-test-1"]},
            {"authorization": [b"Bearer sk-admin-test-default-000"]},
            {"authorization": [b"Bearer"]},
            {"authorization": [ADMIN.encode()]},  # no Bearer
            {"authorization": [b"Basic " + ADMIN.encode()]},
            {"authorization": [b"Bearer " + ADMIN.encode() + b"x"]},
            {"authorization": [b"Bearer " + ADMIN.encode(), b"Bearer " + ADMIN.encode()]},
            {"x-api-key": [ADMIN.encode()]},
        ]
        for headers in attempts:
            response, body = yield self.get("/_admin/api/keys", key=None, **headers)
            self.assertEqual(response.code, 401, headers)
            error = json.loads(body)["error"]
            self.assertEqual(error["code"], "invalid_admin_key")
            self.assertEqual(error["type"], "invalid_request_error")
            self.assertEqual(
                response.headers.getRawHeaders(b"www-authenticate"),
                [b'Bearer realm="twisted-forward admin"'],
            )
            self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-store"])
        response, body = yield self.get("/metrics")
        self.assertEqual(
            metric(body.decode(), "openai_forward_admin_refusals_total",
                   reason="invalid_admin_key"),
            len(attempts),
        )
        logged = "\n".join(repr(e) for e in events)
        self.assertNotIn(wrong, logged)
        self.assertNotIn(ADMIN, logged)
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_admin_key_opens_nothing_else(self):
        """The admin key sent to a forwarding route is refused (401) and never
        reaches the upstream, in any credential header."""
        yield self.start_admin()
        for header in (b"authorization", b"api-key", b"x-api-key"):
            value = b"Bearer " + ADMIN.encode() if header == b"authorization" else ADMIN.encode()
            response = yield self.client.get(self.url("/v1/models"), headers={header: [value]})
            body = yield response.content()
            self.assertEqual(response.code, 401, body)
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_forward_key_still_works_beside_admin(self):
        """Turning the admin on changes nothing for forward keys."""
        yield self.start_admin()
        self.assertEqual((yield self.send("hello")), 200)
        self.assertEqual(len(self.fake.seen), 1)

    @defer.inlineCallbacks
    def test_ip_gate_applies(self):
        """A client outside IP_WHITELIST gets 403 from /_admin/ too, even with
        the admin key."""
        yield self.start_admin(IP_WHITELIST="10.0.0.0/8")
        for path in ("/_admin/", "/_admin/api/keys"):
            response, body = yield self.get(path)
            self.assertEqual(response.code, 403)
            self.assertEqual(json.loads(body)["error"]["code"], "ip_not_allowed")


class PageTests(AdminTestCase):
    """The page's files: served from the package with strict headers."""

    @defer.inlineCallbacks
    def test_page_and_assets(self):
        """The page and each of its files are served without the key (they
        hold no data), with a self-only CSP and no sniffing or framing."""
        yield self.start_admin()
        for path, kind in (
            ("/_admin/", b"text/html"),
            ("/_admin/admin.js", b"text/javascript"),
            ("/_admin/admin.css", b"text/css"),
            ("/_admin/favicon.svg", b"image/svg+xml"),
        ):
            response, body = yield self.get(path, key=None)
            self.assertEqual(response.code, 200, path)
            self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(kind))
            headers = response.headers
            self.assertEqual(headers.getRawHeaders(b"content-security-policy"),
                             [CONTENT_SECURITY_POLICY])
            self.assertEqual(headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
            self.assertEqual(headers.getRawHeaders(b"x-frame-options"), [b"DENY"])
            self.assertEqual(headers.getRawHeaders(b"referrer-policy"), [b"no-referrer"])
            self.assertIsNone(headers.getRawHeaders(b"server"))
            self.assertNotIn(ADMIN.encode(), body)
        response, body = yield self.get("/_admin/", key=None)
        # Nothing from anywhere else: every src/href is relative.
        self.assertNotIn(b"http://", body)
        self.assertNotIn(b"https://", body)
        self.assertNotIn(b"<script>", body)  # no inline script (CSP forbids it)

    @defer.inlineCallbacks
    def test_redirect_unknown_and_methods(self):
        """``/_admin`` redirects to ``/_admin/``; unknown files are 404; only
        GET and HEAD are served; nothing reaches the upstream."""
        yield self.start_admin()
        response, _ = yield self.get("/_admin", key=None)
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/_admin/"])
        for path in ("/_admin/nope.js", "/_admin/static/../admin.js", "/_admin/api/nope"):
            response, body = yield self.get(path)
            self.assertIn(response.code, (400, 404), path)
            self.assertIn("error", json.loads(body))
        response = yield self.client.post(
            self.url("/_admin/api/keys"), data=b"{}",
            headers={b"authorization": [b"Bearer " + ADMIN.encode()]},
        )
        body = yield response.content()
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, HEAD"])
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_own_port(self):
        """With ADMIN_PORT the admin is served there, behind the IP gate, and
        the main port answers /_admin/ with 404 (never forwarded)."""
        yield self.start_admin(ADMIN_PORT="tcp:0:interface=127.0.0.1")
        [admin_listener] = [
            s for s in self.service
            if isinstance(s, StreamServerEndpointService) and s.factory is not self.site
        ]
        port = admin_listener.endpoint.port
        admin_base = f"http://127.0.0.1:{port.getHost().port}"
        response, body = yield self.get("/_admin/api/keys", base=admin_base)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["object"], "keys")
        response, body = yield self.get("/_admin/api/keys", key=None, base=admin_base)
        self.assertEqual(response.code, 401)
        response, body = yield self.get("/v1/models", base=admin_base)
        self.assertEqual(response.code, 404)
        response, body = yield self.get("/_admin/api/keys")
        self.assertEqual(response.code, 404)
        self.assertEqual(self.fake.seen, [])


class KeysTests(AdminTestCase):
    """``GET /_admin/api/keys``."""

    @defer.inlineCallbacks
    def test_forward_labels_and_default_key_health(self):
        """Forward keys by label; default keys by position with their health:
        a key answered 429 rests until a time, one answered 401 is revoked,
        the others are ok.  No key anywhere in the answer."""
        yield self.start_admin()

        def upstream(request):
            auth = request.getHeader(b"authorization") or b""
            request.setHeader(b"content-type", b"application/json")
            if auth.endswith(b"000"):
                request.setResponseCode(429)
                request.setHeader(b"retry-after", b"120")
                return b'{"error": {"message": "slow down"}}'
            if auth.endswith(b"111"):
                request.setResponseCode(401)
                return b'{"error": {"message": "bad key", "code": "invalid_api_key"}}'
            return b'{"object": "list", "data": []}'

        self.fake.override = upstream
        response = yield self.client.get(self.url("/v1/models"), headers=ALICE)
        yield response.content()
        self.assertEqual(response.code, 200)
        response, body = yield self.get("/_admin/api/keys")
        self.assertEqual(response.code, 200)
        answer = json.loads(body)
        self.assertEqual(
            [(k["label"], k["policy"], k["remaining"]) for k in answer["forward_keys"]],
            [("alice", None, None), ("bob", None, None)],
        )
        health = {k["label"]: k for k in answer["default_keys"]}
        self.assertEqual(sorted(health), ["default#0", "default#1", "default#2"])
        self.assertEqual(health["default#0"]["state"], "resting")
        self.assertRegex(health["default#0"]["until"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertGreater(health["default#0"]["seconds_left"], 100)
        self.assertEqual(health["default#1"]["state"], "revoked")
        self.assertEqual(health["default#2"]["state"], "ok")
        for secret in DEFAULTS.split() + ["fk-alice", "fk-bob", ADMIN]:
            self.assertNotIn(secret.encode(), body)

    @defer.inlineCallbacks
    def test_unknown_parameter(self):
        """A parameter the endpoint does not take is a 400 naming it."""
        yield self.start_admin()
        response, body = yield self.get("/_admin/api/keys?verbose=1")
        self.assertEqual(response.code, 400)
        self.assertEqual(json.loads(body)["error"]["param"], "verbose")


class ExchangesTests(AdminTestCase):
    """``GET /_admin/api/exchanges``: recent chat records, searchable."""

    @defer.inlineCallbacks
    def start_recording(self) -> Any:
        self.log_dir = os.path.abspath(self.mktemp())
        yield self.start_admin(LOG_CHAT="true", LOG_DIR=self.log_dir)
        [service] = [s for s in self.service if isinstance(s, ProxyService)]
        self.recorder = service.recorder

    @defer.inlineCallbacks
    def test_newest_first_filtered_and_searched(self):
        """Records come newest first; ``key`` filters by label, ``q`` finds
        words in the conversation, ``id`` gives one record, ``limit`` caps."""
        yield self.start_recording()
        yield self.send("the first question about penguins", ALICE)
        yield self.send("a second question about owls", BOB, model="gpt-4o")
        yield self.send("a third, streamed, about Penguins again", ALICE, stream=True)
        yield self.recorder.flush()
        answer = yield self.api("/_admin/api/exchanges")
        self.assertTrue(answer["recording"])
        questions = [r["messages"][0]["content"] for r in answer["data"]]
        self.assertEqual(questions, [
            "a third, streamed, about Penguins again",
            "a second question about owls",
            "the first question about penguins",
        ])
        self.assertEqual(answer["data"][0]["choices"][0]["content"],
                         "Hello from the fake upstream")
        answer = yield self.api("/_admin/api/exchanges?key=bob")
        self.assertEqual([r["key_label"] for r in answer["data"]], ["bob"])
        answer = yield self.api("/_admin/api/exchanges?q=PENGUINS")
        self.assertEqual(len(answer["data"]), 2)
        answer = yield self.api("/_admin/api/exchanges?q=penguins+first")
        self.assertEqual(len(answer["data"]), 1)
        answer = yield self.api("/_admin/api/exchanges?limit=1")
        self.assertEqual(len(answer["data"]), 1)
        wanted = answer["data"][0]["request_id"]
        answer = yield self.api("/_admin/api/exchanges?q=owls")
        by_id = yield self.api("/_admin/api/exchanges?id=" + answer["data"][0]["request_id"])
        self.assertEqual(by_id["data"], answer["data"])
        self.assertNotEqual(wanted, by_id["data"][0]["request_id"])

    @defer.inlineCallbacks
    def test_no_secret_in_records_answer(self):
        """A conversation that quotes a default key, a forward key and the
        admin key comes back with all three masked."""
        yield self.start_recording()
        yield self.send(
            f"my keys: sk-admin-test-default-111 fk-bob-admin-test-22 {ADMIN}", ALICE
        )
        yield self.recorder.flush()
        response, body = yield self.get("/_admin/api/exchanges")
        self.assertEqual(response.code, 200)
        for secret in ("sk-admin-test-default-111", "fk-bob-admin-test-22", ADMIN):
            self.assertNotIn(secret.encode(), body)
        self.assertIn(b"my keys:", body)

    @defer.inlineCallbacks
    def test_bad_parameters(self):
        """Out-of-range limits, long searches, repeated parameters: 400s
        naming the parameter."""
        yield self.start_recording()
        for query, param in (("limit=0", "limit"), ("limit=201", "limit"), ("limit=x", "limit"),
                             ("q=" + "a" * 201, "q"), ("key=a&key=b", "key")):
            response, body = yield self.get("/_admin/api/exchanges?" + query)
            self.assertEqual(response.code, 400, query)
            error = json.loads(body)["error"]
            self.assertEqual(error["param"], param)
            self.assertEqual(error["code"], "invalid_parameter")

    @defer.inlineCallbacks
    def test_recording_off(self):
        """With LOG_CHAT off the answer says so, with no records."""
        yield self.start_admin()
        answer = yield self.api("/_admin/api/exchanges")
        self.assertEqual(answer, {"object": "list", "recording": False, "data": [],
                                  "truncated": False})


class EventsTests(AdminTestCase):
    """``GET /_admin/api/events``: live figures as server-sent events."""

    @defer.inlineCallbacks
    def next_event(self, collector: Collector, name: str) -> Any:
        """The data of the next whole event called ``name``."""
        while True:
            text = collector.body.decode()
            while "\n\n" in text:
                block, text = text.split("\n\n", 1)
                collector.chunks = [text.encode()]
                lines = block.split("\n")
                if f"event: {name}" in lines:
                    return json.loads(
                        "".join(line[6:] for line in lines if line.startswith("data: "))
                    )
            yield collector.got_data

    @defer.inlineCallbacks
    def test_history_then_figures_that_move(self):
        """The stream starts with the recent samples, then sends a sample
        each second; requests sent meanwhile show in the totals."""
        yield self.start_admin()
        response = yield self.client.get(
            self.url("/_admin/api/events"),
            headers={b"authorization": [b"Bearer " + ADMIN.encode()]},
            unbuffered=True,
        )
        self.assertEqual(response.code, 200)
        self.assertTrue(
            response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/event-stream")
        )
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-store"])
        collector = Collector()
        response.deliverBody(collector)
        history = yield self.next_event(collector, "history")
        self.assertIsInstance(history, list)
        first = yield self.next_event(collector, "figures")
        self.assertEqual(
            sorted(first),
            ["errors_per_s", "errors_total", "open_streams", "requests_per_s",
             "requests_total", "time", "tokens_per_s", "tokens_total"],
        )
        before = first["requests_total"]
        yield self.send("count me")
        response = yield self.client.get(self.url("/v1/models"), headers=ALICE)
        yield response.content()
        while True:
            figures = yield self.next_event(collector, "figures")
            if figures["requests_total"] >= before + 2:
                break
        self.assertGreater(figures["time"], first["time"])
        # The client leaves: the server stops sending to it.
        [stream] = list(self.admin.resource.streams)
        ended = stream.notifyFinish()
        collector.transport.stopProducing()
        yield ended.addErrback(lambda _: None)
        self.assertEqual(self.admin.resource.streams, set())
        self.assertEqual(self.admin.live.listeners, 0)

    @defer.inlineCallbacks
    def test_streams_end_at_shutdown(self):
        """Stopping the proxy ends every open event stream, so it can drain."""
        yield self.start_admin()
        response = yield self.client.get(
            self.url("/_admin/api/events"),
            headers={b"authorization": [b"Bearer " + ADMIN.encode()]},
            unbuffered=True,
        )
        collector = Collector()
        response.deliverBody(collector)
        yield self.next_event(collector, "history")
        yield self.service.stopService()
        yield collector.done
        self.assertEqual(self.admin.resource.streams, set())
        self.assertEqual(self.admin.live.listeners, 0)

    @defer.inlineCallbacks
    def test_needs_the_key(self):
        """No key, no stream."""
        yield self.start_admin()
        response, body = yield self.get("/_admin/api/events", key=None)
        self.assertEqual(response.code, 401)
        self.assertEqual(self.admin.live.listeners, 0)


class UsageTests(AdminTestCase):
    """``GET /_admin/api/usage``: the ledger's rows, as JSON or CSV."""

    @defer.inlineCallbacks
    def test_rows_by_key_model_and_day_as_json_and_csv(self):
        """Requests sent through the proxy show in the ledger's rows, grouped
        and filtered as asked, as JSON and as CSV."""
        yield self.start_admin(DATA_DIR=os.path.abspath(self.mktemp()))
        yield self.send("one", ALICE)
        yield self.send("two", ALICE, model="gpt-4o")
        yield self.send("three", BOB)
        answer = yield self.api("/_admin/api/usage?since=today&group=key")
        rows = {r["key_label"]: r for r in answer["data"]}
        self.assertEqual(sorted(rows), ["alice", "bob"])
        self.assertEqual(rows["alice"]["requests"], 2)
        self.assertEqual(rows["alice"]["prompt_tokens"], 10)
        self.assertEqual(rows["alice"]["completion_tokens"], 6)
        self.assertGreater(rows["alice"]["cost_usd"], rows["bob"]["cost_usd"])
        self.assertEqual(answer["total"]["requests"], 3)
        self.assertEqual(answer["ledger"]["backend"], "sqlite")
        answer = yield self.api("/_admin/api/usage?group=model&key=alice")
        self.assertEqual([(r["model"], r["requests"]) for r in answer["data"]],
                         [("gpt-4o", 1), ("gpt-4o-mini", 1)])
        answer = yield self.api("/_admin/api/usage?group=day&model=gpt-4o-mini")
        [day] = answer["data"]
        self.assertEqual((day["day"], day["requests"]), (answer["until"], 2))
        response, body = yield self.get("/_admin/api/usage?group=key&format=csv")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/csv"))
        self.assertIn(b"attachment", response.headers.getRawHeaders(b"content-disposition")[0])
        table = list(csv.DictReader(io.StringIO(body.decode())))
        self.assertEqual([(r["key_label"], r["requests"]) for r in table],
                         [("alice", "2"), ("bob", "1")])

    @defer.inlineCallbacks
    def test_bad_parameters(self):
        """Bad days, a reversed period, unknown groups or formats: 400s naming
        the parameter."""
        yield self.start_admin()
        for query, param in (
            ("since=yesterday-ish", "since"), ("until=2026-13-01", "until"),
            ("since=2026-12-02&until=2026-12-01", "until"), ("group=colour", "group"),
            ("format=xml", "format"), ("since=0d", "since"), ("colour=red", "colour"),
        ):
            response, body = yield self.get("/_admin/api/usage?" + query)
            self.assertEqual(response.code, 400, query)
            self.assertEqual(json.loads(body)["error"]["param"], param, query)


class LimitsTests(AdminTestCase):
    """``GET /_admin/api/keys`` with per-key policies: what remains."""

    @defer.inlineCallbacks
    def test_remaining_follows_use(self):
        """A key's policy is shown, and what remains of its request rate
        drops with each request; asking does not use any of it."""
        yield self.start_admin(
            KEY_POLICY=json.dumps({"alice": {"rpm": 5, "max_parallel": 2,
                                             "usd_per_day": 1.5}}),
            # A moving window: no minute can turn between the requests and
            # the question.
            RATE_LIMIT_STRATEGY="moving-window",
        )
        answer = yield self.api("/_admin/api/keys")
        alice, bob = answer["forward_keys"]
        self.assertEqual(alice["policy"], {"rpm": 5, "max_parallel": 2, "usd_per_day": 1.5})
        self.assertEqual(alice["remaining"]["rpm"]["remaining"], 5)
        self.assertEqual(alice["remaining"]["max_parallel"], {
            "limit": 2, "remaining": 2, "reset_seconds": 0.0})
        self.assertEqual(alice["remaining"]["usd_per_day"]["limit"], 1.5)
        self.assertEqual((bob["policy"], bob["remaining"]), (None, None))
        yield self.send("one")
        yield self.send("two")
        for _ in range(3):  # asking takes nothing
            answer = yield self.api("/_admin/api/keys")
        self.assertEqual(answer["forward_keys"][0]["remaining"]["rpm"]["remaining"], 3)
        self.assertEqual(answer["forward_keys"][0]["remaining"]["max_parallel"]["remaining"], 2)
