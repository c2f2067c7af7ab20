"""
The features together, end to end with the real plugin: a forward key with a
KEY_POLICY, the response cache on, the usage ledger, the chat records and
the admin API, all at once, around one streamed chat sent twice.

The first time, the policies ask the upstream for the stream's usage (the
key has a token limit) and strip it from the client's stream, and the cache
stores the answer; the second time the cache replays it.  Each feature must
see the other's work exactly once: the client gets the same bytes both times
(those it asked for), the ledger counts the upstream's tokens once and the
hit with zero, the policy window holds the real usage (the hit's reservation
released), each exchange has one chat record (the hit marked as cached), and
the admin key opens the admin API only.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sqlite3
from typing import Any, Optional

from twisted.internet import defer

from twisted_forward.ledger.sql import SQLITE_FILE
from twisted_forward.policies.body import DEFAULT_OUTPUT_RESERVE

from .fake_upstream import chat_chunks
from .harness import ProxyTestCase

DEFAULT = "sk-together-default-0123456789"
ALICE = "fk-together-alice-0123456789"
BOB = "fk-together-bob-0123456789"
ADMIN = "admin-together-0123456789abcdef"
TPM = 100000


def chat(**extra: Any) -> bytes:
    return json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **extra}
    ).encode()


class FeaturesTogetherTests(ProxyTestCase):
    """Policy, cache, ledger, chat records and admin on one streamed chat."""

    @defer.inlineCallbacks
    def start_all(self) -> Any:
        self.data_dir = os.path.abspath(self.mktemp())
        self.log_dir = os.path.abspath(self.mktemp())
        yield self.start_proxy(
            OPENAI_API_KEY=DEFAULT,
            FORWARD_KEY=f"alice:{ALICE} bob:{BOB}",
            KEY_POLICY=json.dumps({"alice": {"tpm": TPM, "tokens_per_day": 10 * TPM},
                                   "bob": {"tpm": TPM}}),
            CACHE_OPENAI="true",
            DATA_DIR=self.data_dir,
            LOG_CHAT="true",
            LOG_DIR=self.log_dir,
            ADMIN_KEY=ADMIN,
        )

    @defer.inlineCallbacks
    def post(self, key: str, body: bytes, path: str = "/v1/chat/completions") -> Any:
        response = yield self.client.post(
            self.url(path), data=body,
            headers={b"authorization": [b"Bearer " + key.encode()],
                     b"content-type": [b"application/json"]},
        )
        content = yield response.content()
        return response, content

    @defer.inlineCallbacks
    def get(self, path: str, key: Optional[str]) -> Any:
        headers = {b"authorization": [b"Bearer " + key.encode()]} if key else {}
        response = yield self.client.get(self.url(path), headers=headers)
        content = yield response.content()
        return response, content

    def header(self, response: Any, name: str) -> Optional[str]:
        values = response.headers.getRawHeaders(name.encode())
        return values[0].decode() if values else None

    def ledger_rows(self) -> list[dict[str, Any]]:
        with sqlite3.connect(os.path.join(self.data_dir, SQLITE_FILE)) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM usage_days")]

    def chat_records(self) -> list[dict[str, Any]]:
        records = []
        for name in sorted(glob.glob(os.path.join(self.log_dir, "chat_*.jsonl"))):
            with open(name, "rb") as f:
                records += [json.loads(line) for line in f if line.strip()]
        return records

    @defer.inlineCallbacks
    def test_streamed_chat_miss_then_hit(self) -> None:
        """One streamed chat twice, with every feature on: byte-identical
        streams (the injected usage chunk never shown), one upstream request
        (asked for usage, without the caching field), the ledger counting the
        upstream's tokens once, the policy window holding them once, one chat
        record per exchange, the admin API agreeing."""
        yield self.start_all()
        body = chat(stream=True, caching=True)
        expected = b"".join(chat_chunks(self.fake.answer_text, "gpt-4o-mini"))
        words = len(self.fake.answer_text.split(" "))
        reserve = math.ceil(len(body) / 4) + DEFAULT_OUTPUT_RESERVE

        first, first_body = yield self.post(ALICE, body)
        self.assertEqual(first.code, 200, first_body)
        self.assertEqual(self.header(first, "x-cache"), "miss")
        self.assertEqual(first_body, expected)
        [seen] = self.fake.seen
        sent = json.loads(seen.body)
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        self.assertNotIn("caching", sent)
        self.assertEqual(seen.headers.getRawHeaders(b"authorization"),
                         [b"Bearer " + DEFAULT.encode()])
        self.assertEqual(self.header(first, "x-ratelimit-limit-tokens"), str(TPM))

        second, second_body = yield self.post(ALICE, body)
        self.assertEqual(second.code, 200, second_body)
        self.assertEqual(self.header(second, "x-cache"), "hit")
        self.assertEqual(second_body, first_body)
        self.assertEqual(len(self.fake.seen), 1, "a hit must not reach the upstream")
        # The window: the miss settled with its real usage (5 + words), and
        # the hit's own reservation is in it while it is answered.
        self.assertEqual(self.header(second, "x-ratelimit-remaining-tokens"),
                         str(TPM - (5 + words) - reserve))
        # After the hit, its reservation is released: a third request sees
        # only the miss's usage plus its own reservation.
        third, third_body = yield self.post(ALICE, body)
        self.assertEqual(self.header(third, "x-cache"), "hit")
        self.assertEqual(third_body, expected)
        self.assertEqual(self.header(third, "x-ratelimit-remaining-tokens"),
                         str(TPM - (5 + words) - reserve))

        # The admin key opens the admin API, which already counts the
        # upstream's tokens once.
        response, content = yield self.get("/_admin/api/usage?group=key", ADMIN)
        self.assertEqual(response.code, 200, content)
        usage = json.loads(content)
        [alice] = [row for row in usage["data"] if row.get("key_label", row.get("key")) == "alice"]
        self.assertEqual(alice["requests"], 3)
        self.assertEqual((alice["prompt_tokens"], alice["completion_tokens"]), (5, words))

        yield self.service.stopService()
        [row] = [r for r in self.ledger_rows() if r["key_label"] == "alice"]
        self.assertEqual((row["model"], row["requests"], row["errors"]), ("gpt-4o-mini", 3, 0))
        self.assertEqual((row["prompt_tokens"], row["completion_tokens"]), (5, words))
        self.assertGreater(row["cost_usd"], 0)

        records = self.chat_records()
        self.assertEqual(len(records), 3, [r.get("request_id") for r in records])
        self.assertEqual(len({r["request_id"] for r in records}), 3)
        self.assertEqual([r.get("cache") for r in records], ["miss", "hit", "hit"])
        self.assertEqual({r["key_label"] for r in records}, {"alice"})
        # The miss's record holds the upstream's usage; the record is of the
        # client's request (asked without usage).
        self.assertEqual(records[0]["usage"]["prompt_tokens"], 5)

    @defer.inlineCallbacks
    def test_client_that_asked_for_usage_gets_it_from_the_cache(self) -> None:
        """The entry stored for a client who did not ask for usage still
        replays the usage chunk to one who did (stream_options is not in the
        cache key, so both share the entry): each gets the stream it asked
        for."""
        yield self.start_all()
        plain, plain_body = yield self.post(ALICE, chat(stream=True, caching=True))
        self.assertEqual(self.header(plain, "x-cache"), "miss")
        asked, asked_body = yield self.post(
            ALICE, chat(stream=True, caching=True, stream_options={"include_usage": True}))
        self.assertEqual(self.header(asked, "x-cache"), "hit")
        self.assertEqual(
            asked_body,
            b"".join(chat_chunks(self.fake.answer_text, "gpt-4o-mini", include_usage=True)))
        again, again_body = yield self.post(ALICE, chat(stream=True, caching=True))
        self.assertEqual(self.header(again, "x-cache"), "hit")
        self.assertEqual(again_body, plain_body)

    @defer.inlineCallbacks
    def test_tenants_keys_and_admin_apart(self) -> None:
        """Bob never gets Alice's cached answer; the admin key is no forward
        key; a forward key does not open /_admin/."""
        yield self.start_all()
        body = chat(stream=True, caching=True)
        alice, _ = yield self.post(ALICE, body)
        self.assertEqual(self.header(alice, "x-cache"), "miss")
        bob, _ = yield self.post(BOB, body)
        self.assertEqual(self.header(bob, "x-cache"), "miss")
        self.assertEqual(len(self.fake.seen), 2)

        response, content = yield self.post(ADMIN, body)
        self.assertEqual(response.code, 401, content)
        self.assertEqual(len(self.fake.seen), 2)
        # The page itself is static (it asks for the admin key); what it
        # shows comes from the API, which wants the admin key and no other.
        for path in ("/_admin/api/usage", "/_admin/api/keys",
                     "/_admin/api/exchanges", "/_admin/api/events"):
            for key in (ALICE, DEFAULT, None):
                response, content = yield self.get(path, key)
                self.assertEqual(response.code, 401, (path, key and key[:6], content))
                self.assertEqual(json.loads(content)["error"]["type"],
                                 "invalid_request_error")
        response, content = yield self.get("/_admin/api/keys", ADMIN)
        self.assertEqual(response.code, 200, content)
        described = json.loads(content)
        self.assertEqual({k["label"] for k in described["forward_keys"]}, {"alice", "bob"})


class StorePasswordsTests(ProxyTestCase):
    """The passwords in DATABASE_URL and REDIS_URL are secrets too."""

    @defer.inlineCallbacks
    def test_unreachable_stores_never_show_their_passwords(self) -> None:
        """PostgreSQL and Redis (policies and cache) configured with passwords
        and unreachable: requests are served (the stores fail open), and the
        secrets watch finds neither password in the answers, /metrics, the
        admin API, the chat records or the log (start-up, store errors,
        shutdown)."""
        closed = "127.0.0.1:1"  # nothing listens on port 1
        yield self.start_proxy(
            OPENAI_API_KEY=DEFAULT,
            FORWARD_KEY=f"alice:{ALICE}",
            KEY_POLICY=json.dumps({"alice": {"rpm": 100}}),
            REDIS_URL=f"redis://:redis-pass-0123456789@{closed}/0",
            LIMITS_ON_STORE_FAILURE="open",
            CACHE_OPENAI="true",
            CACHE_BACKEND="REDIS",
            DATABASE_URL=f"postgresql://tf:pg-pass-0123456789@{closed}/ledger",
            LOG_CHAT="true",
            LOG_DIR=os.path.abspath(self.mktemp()),
            ADMIN_KEY=ADMIN,
        )
        watch = self.secrets_watch
        self.assertEqual(
            sorted(p for _, p in watch.passwords),
            ["pg-pass-0123456789", "redis-pass-0123456789", "redis-pass-0123456789"],
        )
        response = yield self.client.post(
            self.url("/v1/chat/completions"), data=chat(caching=True),
            headers={b"authorization": [b"Bearer " + ALICE.encode()],
                     b"content-type": [b"application/json"]},
        )
        content = yield response.content()
        self.assertEqual(response.code, 200, content)
        codes = {}
        for path in ("/metrics", "/_admin/api/usage", "/_admin/api/keys"):
            response = yield self.client.get(
                self.url(path), headers={b"authorization": [b"Bearer " + ADMIN.encode()]})
            yield response.content()
            codes[path] = response.code
        # The ledger cannot be read: the usage API says so (503).
        self.assertEqual(codes, {"/metrics": 200, "/_admin/api/usage": 503,
                                 "/_admin/api/keys": 200})
        import psycopg
        self.flushLoggedErrors(psycopg.OperationalError)
        # The watch itself can fail: a password planted in a log event is found.
        from twisted.logger import LogLevel, globalLogPublisher
        event = {"log_format": "x {u}", "u": "pg-pass-0123456789",
                 "log_level": LogLevel.info, "log_namespace": "qa", "log_time": 0.0}
        watch(event)
        self.assertIn("DATABASE_URL's password in a log event ('x {u}')", watch.leaks(self))
        watch.events.remove(event)
        del globalLogPublisher
