"""
End-to-end: the real plugin in front of the fake upstream feeds its SQLite
ledger; the rows are read back from the file after the service stopped.
"""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timezone
from typing import Any

from twisted.internet import defer
from twisted.web.server import Request

from twisted_forward.ledger.sql import SQLITE_FILE
from twisted_forward.site import Built
from twisted_forward.tap import ProxyService

from .fake_upstream import chat_chunks, sse_event
from .harness import ProxyTestCase
from .test_ledger_feed import builtin_pricer

JSON = {b"content-type": [b"application/json"]}
FORWARD = "team-a:fk-ledger-0123456789abcdef"


def chat(stream: bool = False, model: str = "gpt-4o-mini") -> bytes:
    return json.dumps({"model": model, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()


def streamed_with_usage(request: Request) -> bytes:
    """A streamed answer whose last chunk carries usage, cached tokens included."""
    request.setHeader(b"content-type", b"text/event-stream")
    events = chat_chunks("two words")
    usage = sse_event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
                       "model": "gpt-4o-mini",
                       "usage": {"prompt_tokens": 100, "completion_tokens": 20,
                                 "prompt_tokens_details": {"cached_tokens": 40}}})
    return b"".join(events[:-1] + [usage, events[-1]])


class LedgerFeedTests(ProxyTestCase):
    """Every answered exchange reaches the ledger with its figures."""

    @defer.inlineCallbacks
    def post(self, path: str, body: bytes, key: str = "fk-ledger-0123456789abcdef") -> Any:
        headers = {**JSON, b"authorization": [f"Bearer {key}".encode()]}
        response = yield self.client.post(self.url(path), data=body, headers=headers)
        yield response.content()
        return response.code

    def rows(self, data_dir: str) -> dict[tuple[str, str], dict[str, Any]]:
        with sqlite3.connect(os.path.join(data_dir, SQLITE_FILE)) as db:
            db.row_factory = sqlite3.Row
            return {(r["key_label"], r["model"]): dict(r) for r in db.execute(
                "SELECT * FROM usage_days")}

    @defer.inlineCallbacks
    def test_plain_streamed_other_and_failed(self) -> None:
        """A plain chat, a streamed chat with usage, a model list and an upstream
        error each add their figures to the key's rows, written at stop; with
        LOG_CHAT off no chat record is written."""
        data_dir = os.path.abspath(self.mktemp())
        log_dir = os.path.abspath(self.mktemp())
        yield self.start_proxy(OPENAI_API_KEY="sk-ledger-default-0123456789",
                               FORWARD_KEY=FORWARD, DATA_DIR=data_dir,
                               LOG_CHAT="false", LOG_DIR=log_dir)
        [service] = [s for s in self.service if isinstance(s, ProxyService)]
        built: Built = service.built
        self.assertIsNotNone(built.ledger)
        codes = [(yield self.post("/v1/chat/completions", chat()))]
        self.fake.override = streamed_with_usage
        codes.append((yield self.post("/v1/chat/completions", chat(stream=True))))
        self.fake.override = None
        response = yield self.client.get(
            self.url("/v1/models"),
            headers={b"authorization": [b"Bearer fk-ledger-0123456789abcdef"]})
        yield response.content()

        def fail(request: Request) -> bytes:
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"application/json")
            return b'{"error": {"message": "boom", "type": "server_error"}}'

        self.fake.override = fail
        codes.append((yield self.post("/v1/chat/completions", chat(model="gpt-4o"))))
        self.assertEqual(codes, [200, 200, 500])
        yield self.service.stopService()
        self.assertFalse(os.path.exists(log_dir))  # LOG_CHAT=false: no chat file
        rows = self.rows(data_dir)
        today = datetime.now(timezone.utc).date().isoformat()
        mini = rows[("team-a", "gpt-4o-mini")]
        self.assertEqual(mini["day"], today)
        self.assertEqual((mini["requests"], mini["errors"]), (2, 0))
        self.assertEqual((mini["prompt_tokens"], mini["completion_tokens"],
                          mini["cached_tokens"]), (105, 23, 40))
        cost_usd = builtin_pricer()
        self.assertAlmostEqual(mini["cost_usd"], cost_usd("gpt-4o-mini", 5, 3, 0)
                               + cost_usd("gpt-4o-mini", 100, 20, 40))
        self.assertGreater(mini["cost_usd"], 0)
        self.assertEqual(mini["ttfb_count"], 2)
        self.assertGreater(mini["response_bytes"], 0)
        self.assertGreater(mini["request_bytes"], 0)
        other = rows[("team-a", "")]
        self.assertEqual((other["requests"], other["errors"], other["ttfb_count"]), (1, 0, 1))
        failed = rows[("team-a", "gpt-4o")]
        self.assertEqual((failed["requests"], failed["errors"], failed["prompt_tokens"]),
                         (1, 1, 0))

    @defer.inlineCallbacks
    def test_client_gone_counts(self) -> None:
        """A client that leaves mid-stream is counted, not as an error."""
        data_dir = os.path.abspath(self.mktemp())
        yield self.start_proxy(DATA_DIR=data_dir)
        self.fake.hold_at = 2
        _, collector = yield self.open_stream()
        while b"\n\n" not in collector.body:
            yield collector.got_data
        collector.transport.stopProducing()  # the client hangs up
        yield self.service.stopService()
        [row] = self.rows(data_dir).values()
        self.assertEqual((row["key_label"], row["model"]), ("none", "m"))
        self.assertEqual((row["requests"], row["errors"]), (1, 0))
        self.assertGreater(row["response_bytes"], 0)

    @defer.inlineCallbacks
    def test_ledger_off(self) -> None:
        """LEDGER=false keeps no ledger and writes no file."""
        data_dir = os.path.abspath(self.mktemp())
        yield self.start_proxy(LEDGER="false", DATA_DIR=data_dir)
        [service] = [s for s in self.service if isinstance(s, ProxyService)]
        self.assertIsNone(service.built.ledger)
        self.assertIsNone(service.recorder)
        yield self.post("/v1/chat/completions", chat(), key="sk-own-0123456789")
        yield self.service.stopService()
        self.assertFalse(os.path.exists(data_dir))


class PolicyStreamUsageTests(ProxyTestCase):
    """A stream whose usage the policies asked for on the client's behalf."""

    @defer.inlineCallbacks
    def test_stream_usage_asked_for_the_client(self) -> None:
        """The client, which did not ask for usage, gets none, and the ledger
        still counts the stream's tokens."""
        data_dir = os.path.abspath(self.mktemp())
        yield self.start_proxy(OPENAI_API_KEY="sk-ledger-default-0123456789",
                               FORWARD_KEY=FORWARD, DATA_DIR=data_dir,
                               KEY_POLICY=json.dumps({"team-a": {"tokens_per_day": 100000}}))
        self.fake.answer_text = "three little words"
        response = yield self.client.post(
            self.url("/v1/chat/completions"), data=chat(stream=True),
            headers={**JSON, b"authorization": [b"Bearer fk-ledger-0123456789abcdef"]})
        body = yield response.content()
        self.assertEqual(response.code, 200)
        self.assertNotIn(b"usage", body)
        yield self.service.stopService()
        with sqlite3.connect(os.path.join(data_dir, SQLITE_FILE)) as db:
            rows = db.execute("SELECT key_label, requests, prompt_tokens, completion_tokens "
                              "FROM usage_days").fetchall()
        self.assertEqual(rows, [("team-a", 1, 5, 3)])


class AdminReadsLedgerTests(ProxyTestCase):
    """With ADMIN_KEY set, the exchanges feed the ledger through the admin's
    live tally, and the usage API reads the SQLite ledger."""

    @defer.inlineCallbacks
    def test_usage_api_sees_exchanges(self) -> None:
        """Two chats appear in ``/_admin/api/usage`` and in the live totals."""
        admin = "admin-key-for-ledger-0123456789"
        data_dir = os.path.abspath(self.mktemp())
        yield self.start_proxy(OPENAI_API_KEY="sk-ledger-default-0123456789",
                               FORWARD_KEY=FORWARD, DATA_DIR=data_dir, ADMIN_KEY=admin)
        for _ in range(2):
            response = yield self.client.post(
                self.url("/v1/chat/completions"), data=chat(),
                headers={**JSON, b"authorization": [b"Bearer fk-ledger-0123456789abcdef"]})
            yield response.content()
        response = yield self.client.get(
            self.url("/_admin/api/usage?group=key"),
            headers={b"authorization": [f"Bearer {admin}".encode()]})
        usage = json.loads((yield response.content()))
        self.assertEqual(response.code, 200)
        [row] = usage["data"]
        self.assertEqual((row["key_label"], row["requests"], row["prompt_tokens"]),
                         ("team-a", 2, 10))
        self.assertEqual(usage["ledger"]["backend"], "sqlite")
        [service] = [s for s in self.service if isinstance(s, ProxyService)]
        self.assertEqual(service.built.ledger.tokens, 16)  # the live tally counted them


class StoreDownTests(ProxyTestCase):
    """A ledger store that is down never holds a request up."""

    #: They scrape /metrics on the proxy's port, without the admin key.
    proxy_settings = {"METRICS": "public"}

    @defer.inlineCallbacks
    def test_requests_served_failures_counted(self) -> None:
        """With PostgreSQL unreachable, chats are answered, the figures wait in
        memory, and the failures show in the metrics."""
        yield self.start_proxy(
            DATABASE_URL="postgresql://ledger@/ledger?host=/nonexistent-ledger-socket-dir")
        response = yield self.client.post(self.url("/v1/chat/completions"), data=chat(),
                                          headers=JSON)
        yield response.content()
        self.assertEqual(response.code, 200)
        [service] = [s for s in self.service if isinstance(s, ProxyService)]
        yield service.built.ledger.flush()
        self.assertEqual(service.built.ledger.stats.pending_rows, 1)
        metrics = yield self.client.get(self.url("/metrics"))
        text = (yield metrics.content()).decode()
        self.assertRegex(text, r'openai_forward_ledger_write_failures_total\{backend="postgresql"\} [1-9]')
        self.assertIn('openai_forward_ledger_pending_rows{backend="postgresql"} 1.0', text)
