"""
Per-key policies end to end: the real plugin in front of the fake upstream.

Levels and 403, 429 with OpenAI's rate-limit headers, token and dollar
quotas, the streamed-usage request and its removal (byte for byte), the
release of reservations at shutdown, /metrics, and the official SDK
backing off on a 429.
"""

from __future__ import annotations

import json
import math
import os

import openai
from twisted.application.service import IServiceCollection
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from twisted_forward.policies.body import DEFAULT_OUTPUT_RESERVE
from twisted_forward.policies.store import CONCURRENT, FIXED, Bucket, IPolicyStore
from twisted_forward.policies.windows import fixed_window

from .fake_upstream import chat_chunks
from .harness import ProxyTestCase

ALICE = "fk-alice-0123456789"
BOB = "fk-bob-0123456789"
DEFAULT = "sk-default-0123456789"


def chat(model: str = "gpt-4o-mini", **extra) -> bytes:
    return json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "model": model, **extra}
    ).encode()


class PolicyTestCase(ProxyTestCase):
    """Posts chats with a key; reads JSON answers."""

    #: They scrape /metrics on the proxy's port, without the admin key.
    proxy_settings = {"METRICS": "public"}

    @defer.inlineCallbacks
    def post(self, key: str, body: bytes, path: str = "/v1/chat/completions"):
        response = yield self.client.post(
            self.url(path),
            data=body,
            headers={b"authorization": [b"Bearer " + key.encode()],
                     b"content-type": [b"application/json"]},
        )
        content = yield response.content()
        return response, content

    def header(self, response, name: str):
        values = response.headers.getRawHeaders(name.encode())
        return values[0].decode() if values else None

    def assertError(self, response, content: bytes, status: int, code: str) -> dict:
        self.assertEqual(response.code, status, content)
        error = json.loads(content)["error"]
        self.assertEqual(error["code"], code)
        return error

    @defer.inlineCallbacks
    def metrics(self) -> defer.Deferred:
        response = yield self.client.get(self.url("/metrics"))
        text = yield response.text()
        return text

    def policy_store(self):
        """The running proxy's policy store."""
        for service in IServiceCollection(self.service):
            built = getattr(service, "built", None)
            if built is not None:
                return built.policy.store
        raise AssertionError("no proxy service")


class LevelTests(PolicyTestCase):
    """openai-forward 0.8.1's levels: keys, models, default keys by level."""

    @defer.inlineCallbacks
    def setUp_levels(self):
        yield self.start_proxy(
            FORWARD_KEY_CONFIG=json.dumps({f"zero:{ALICE}": 0, f"one:{BOB}": 1}),
            OPENAI_API_KEY_CONFIG=json.dumps(
                {"sk-level-zero-0123456": [0], "sk-level-one-0123456": [1]}
            ),
            LEVEL_MODELS=json.dumps({"1": ["gpt-4o-mini", "text-embedding-3-*"]}),
        )

    @defer.inlineCallbacks
    def test_level_key_gets_its_default_key(self):
        """A level-1 forward key is swapped for the key serving level 1, a
        level-0 key for the level-0 key, in turn."""
        yield self.setUp_levels()
        for key, expected in ((BOB, b"sk-level-one-0123456"), (ALICE, b"sk-level-zero-0123456"),
                              (BOB, b"sk-level-one-0123456")):
            response, _ = yield self.post(key, chat())
            self.assertEqual(response.code, 200)
            self.assertEqual(self.fake.seen[-1].header(b"authorization"), b"Bearer " + expected)

    @defer.inlineCallbacks
    def test_failover_stays_in_level(self):
        """When the level's default keys are all rate-limited upstream, the
        request fails over between them only, never to another level's key."""
        yield self.start_proxy(
            FORWARD_KEY_CONFIG=json.dumps({f"one:{BOB}": 1}),
            OPENAI_API_KEY_CONFIG=json.dumps({
                "sk-level-zero-0123456": [0], "sk-one-a-0123456789": [1],
                "sk-one-b-0123456789": [1],
            }),
        )
        response, _ = yield self.post(BOB, chat(), "/status/429")
        self.assertEqual(response.code, 429)
        used = sorted(seen.header(b"authorization") for seen in self.fake.seen)
        self.assertEqual(used, [b"Bearer sk-one-a-0123456789", b"Bearer sk-one-b-0123456789"])

    @defer.inlineCallbacks
    def test_model_outside_level_refused(self):
        """A level-1 key asking for a model its level lacks gets 403
        model_not_allowed naming the model (not the key); nothing goes
        upstream.  Level 0 may use every model; patterns match."""
        yield self.setUp_levels()
        response, content = yield self.post(BOB, chat("gpt-4o"))
        error = self.assertError(response, content, 403, "model_not_allowed")
        self.assertIn("gpt-4o", error["message"])
        self.assertNotIn(BOB, content.decode())
        self.assertEqual(error["type"], "permission_error")
        self.assertEqual(self.fake.seen, [])
        response, _ = yield self.post(BOB, chat("text-embedding-3-small"), "/v1/embeddings")
        self.assertNotEqual(response.code, 403)
        response, _ = yield self.post(ALICE, chat("gpt-4o"))
        self.assertEqual(response.code, 200)
        text = yield self.metrics()
        self.assertIn(
            'openai_forward_policy_refusals_total{key="one",reason="model_not_allowed"} 1.0', text
        )

    @defer.inlineCallbacks
    def test_model_smuggled_twice_refused(self):
        """A body naming two models cannot slip the allowed one past the
        check: it is refused before anything goes upstream."""
        yield self.setUp_levels()
        body = b'{"model": "gpt-4o-mini", "messages": [], "model": "gpt-4o"}'
        response, content = yield self.post(BOB, body)
        self.assertError(response, content, 400, "invalid_json")
        self.assertEqual(self.fake.seen, [])


class RateLimitTests(PolicyTestCase):
    """rpm and REQ_RATE_LIMIT: 429 rate_limit_exceeded with headers."""

    @defer.inlineCallbacks
    def test_rpm(self):
        """rpm 2: two pass with x-ratelimit-* headers counting down, the
        third gets 429 with Retry-After; another key is not limited."""
        yield self.start_proxy(
            OPENAI_API_KEY=DEFAULT, FORWARD_KEY=f"alice:{ALICE} bob:{BOB}",
            KEY_POLICY=json.dumps({"alice": {"rpm": 2}}),
        )
        for remaining in ("1", "0"):
            response, _ = yield self.post(ALICE, chat())
            self.assertEqual(response.code, 200)
            self.assertEqual(self.header(response, "x-ratelimit-limit-requests"), "2")
            self.assertEqual(self.header(response, "x-ratelimit-remaining-requests"), remaining)
            self.assertRegex(self.header(response, "x-ratelimit-reset-requests"), r"^(\d+h)?(\d+m)?\d+(ms|s)$")
        response, content = yield self.post(ALICE, chat())
        error = self.assertError(response, content, 429, "rate_limit_exceeded")
        self.assertEqual(error["type"], "rate_limit_error")
        self.assertTrue(1 <= int(self.header(response, "retry-after")) <= 60)
        self.assertEqual(self.header(response, "x-ratelimit-remaining-requests"), "0")
        self.assertEqual(len(self.fake.seen), 2)
        response, _ = yield self.post(BOB, chat())
        self.assertEqual(response.code, 200)
        self.assertIsNone(self.header(response, "x-ratelimit-limit-requests"))
        text = yield self.metrics()
        self.assertIn(
            'openai_forward_policy_refusals_total{key="alice",reason="rate_limit_exceeded"} 1.0',
            text,
        )

    @defer.inlineCallbacks
    def test_req_rate_limit_by_level_and_route(self):
        """REQ_RATE_LIMIT limits level-1 keys on the chat route only (under
        any spelling of its path); GLOBAL_RATE_LIMIT covers the rest."""
        yield self.start_proxy(
            FORWARD_KEY_CONFIG=json.dumps({f"one:{BOB}": 1}),
            OPENAI_API_KEY=DEFAULT,
            REQ_RATE_LIMIT=json.dumps(
                {"/v1/chat/completions": [{"level": 1, "limit": "1/minute"}]}
            ),
            GLOBAL_RATE_LIMIT="3/minute",
        )
        response, _ = yield self.post(BOB, chat())
        self.assertEqual(response.code, 200)
        response, content = yield self.post(BOB, chat(), "//v1/chat/completions/")
        self.assertError(response, content, 429, "rate_limit_exceeded")
        for _ in range(3):
            response, _ = yield self.post(BOB, b"{}", "/v1/models")
            self.assertEqual(response.code, 200)
        response, content = yield self.post(BOB, b"{}", "/v1/models")
        self.assertError(response, content, 429, "rate_limit_exceeded")

    @defer.inlineCallbacks
    def test_max_parallel(self):
        """max_parallel 1: a second request while a stream is open gets 429;
        once the stream ends, the slot is free again."""
        yield self.start_proxy(
            OPENAI_API_KEY=DEFAULT, FORWARD_KEY=f"alice:{ALICE}",
            KEY_POLICY=json.dumps({"alice": {"max_parallel": 1}}),
        )
        self.fake.hold_at = 2
        response = yield self.client.post(
            self.url("/v1/chat/completions"), data=chat(stream=True),
            headers={b"authorization": [b"Bearer " + ALICE.encode()]}, unbuffered=True,
        )
        second, content = yield self.post(ALICE, chat())
        self.assertError(second, content, 429, "rate_limit_exceeded")
        self.fake.release.callback(None)
        yield response.content()
        third, _ = yield self.post(ALICE, chat())
        self.assertEqual(third.code, 200)


class QuotaTests(PolicyTestCase):
    """tokens_per_day and usd_per_day: 429 insufficient_quota until the
    period resets; reservations settled with the upstream's usage."""

    @defer.inlineCallbacks
    def test_token_quota(self):
        """Each answer spends 8 tokens; each request first reserves its
        estimate.  Exactly the requests that fit pass; the next gets
        insufficient_quota with Retry-After until midnight UTC."""
        body = chat(max_tokens=1)
        reserve = math.ceil(len(body) / 4) + 1
        limit = 3 * 8 + reserve  # room for four answers
        yield self.start_proxy(
            OPENAI_API_KEY=DEFAULT, FORWARD_KEY=f"alice:{ALICE}",
            KEY_POLICY=json.dumps({"alice": {"tokens_per_day": limit}}),
        )
        for _ in range(4):
            response, content = yield self.post(ALICE, body)
            self.assertEqual(response.code, 200, content)
        self.assertEqual(self.header(response, "x-ratelimit-limit-tokens"), str(limit))
        response, content = yield self.post(ALICE, body)
        error = self.assertError(response, content, 429, "insufficient_quota")
        self.assertIn("quota", error["message"])
        retry = int(self.header(response, "retry-after"))
        self.assertTrue(0 < retry <= 86400)
        self.assertEqual(len(self.fake.seen), 4)

    @defer.inlineCallbacks
    def test_usd_quota(self):
        """gpt-4o-mini at 0.15/0.60 USD per 1M tokens: each request reserves
        its estimate (23 prompt tokens and 1 output: 4.05, so 5
        micro-dollars) and settles at its usage (5+3 tokens: 2.55, so 3).
        An 11 micro-dollar day takes three (3+3+5 fits), not four."""
        body = chat(max_tokens=1)
        self.assertEqual(math.ceil(len(body) / 4), 23)
        yield self.start_proxy(
            OPENAI_API_KEY=DEFAULT, FORWARD_KEY=f"alice:{ALICE}",
            KEY_POLICY=json.dumps({"alice": {"usd_per_day": 0.000011}}),
        )
        results = []
        for _ in range(4):
            response, _ = yield self.post(ALICE, body)
            results.append(response.code)
        self.assertEqual(results, [200, 200, 200, 429])

    @defer.inlineCallbacks
    def test_unknown_model_fallback_price(self):
        """A model the table does not know is charged UNKNOWN_MODEL_PRICE."""
        body = chat("my-own-model", max_tokens=1)
        yield self.start_proxy(
            OPENAI_API_KEY=DEFAULT, FORWARD_KEY=f"alice:{ALICE}",
            KEY_POLICY=json.dumps({"alice": {"usd_per_day": 0.001}}),
            UNKNOWN_MODEL_PRICE="100,100",  # 8 tokens: 800 micro-dollars
        )
        response, _ = yield self.post(ALICE, body)
        self.assertEqual(response.code, 200)
        response, content = yield self.post(ALICE, body)
        self.assertError(response, content, 429, "insufficient_quota")


class StreamedUsageTests(PolicyTestCase):
    """The proxy asks for streamed usage and hides it from the client."""

    @defer.inlineCallbacks
    def stream(self, key: str, body: bytes):
        response = yield self.client.post(
            self.url("/v1/chat/completions"), data=body,
            headers={b"authorization": [b"Bearer " + key.encode()]},
        )
        content = yield response.content()
        return response, content

    @defer.inlineCallbacks
    def test_injected_and_removed_byte_for_byte(self):
        """A key with a token limit streams without include_usage: the
        upstream is asked for usage, the client gets exactly the stream it
        would have had, and the real usage is what the window counts."""
        yield self.start_proxy(
            OPENAI_API_KEY=DEFAULT, FORWARD_KEY=f"alice:{ALICE}",
            KEY_POLICY=json.dumps({"alice": {"tpm": 100000}}),
        )
        body = chat(stream=True)
        response, content = yield self.stream(ALICE, body)
        self.assertEqual(response.code, 200)
        sent = json.loads(self.fake.seen[0].body)
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        self.assertEqual(self.fake.seen[0].body[:len(b'{"stream_options"')], b'{"stream_options"')
        self.assertEqual(content, b"".join(chat_chunks(self.fake.answer_text, "gpt-4o-mini")))
        self.assertIsNone(response.headers.getRawHeaders(b"content-length"))
        # The window holds the real usage (5 prompt + 5 completion tokens)
        # plus the next request's reservation.
        second, _ = yield self.stream(ALICE, body)
        reserve = math.ceil(len(body) / 4) + DEFAULT_OUTPUT_RESERVE
        self.assertEqual(
            self.header(second, "x-ratelimit-remaining-tokens"), str(100000 - 10 - reserve)
        )

    @defer.inlineCallbacks
    def test_client_asked_itself(self):
        """A client that asked for usage gets it, body and stream untouched."""
        yield self.start_proxy(
            OPENAI_API_KEY=DEFAULT, FORWARD_KEY=f"alice:{ALICE}",
            KEY_POLICY=json.dumps({"alice": {"tokens_per_day": 100000}}),
        )
        body = chat(stream=True, stream_options={"include_usage": True})
        response, content = yield self.stream(ALICE, body)
        self.assertEqual(self.fake.seen[0].body, body)
        self.assertEqual(
            content,
            b"".join(chat_chunks(self.fake.answer_text, "gpt-4o-mini", include_usage=True)),
        )

    @defer.inlineCallbacks
    def test_rpm_only_untouched(self):
        """A key limited in requests only: the body goes as sent."""
        yield self.start_proxy(
            OPENAI_API_KEY=DEFAULT, FORWARD_KEY=f"alice:{ALICE}",
            KEY_POLICY=json.dumps({"alice": {"rpm": 100}}),
        )
        body = chat(stream=True)
        response, content = yield self.stream(ALICE, body)
        self.assertEqual(self.fake.seen[0].body, body)
        self.assertEqual(content, b"".join(chat_chunks(self.fake.answer_text, "gpt-4o-mini")))


class ShutdownTests(PolicyTestCase):
    """Reservations of exchanges cut at shutdown are released."""

    @defer.inlineCallbacks
    def test_stop_releases(self):
        """A stream open at shutdown (grace over) holds a slot and a token
        reservation; once the service has stopped, both are free: the
        window takes its whole limit again."""
        yield self.start_proxy(
            OPENAI_API_KEY=DEFAULT, FORWARD_KEY=f"alice:{ALICE}",
            KEY_POLICY=json.dumps({"alice": {"tpm": 5000, "max_parallel": 1}}),
            SHUTDOWN_GRACE="0.2",
        )
        store = self.policy_store()
        self.fake.hold_at = 2
        response = yield self.client.post(
            self.url("/v1/chat/completions"), data=chat(stream=True),
            headers={b"authorization": [b"Bearer " + ALICE.encode()]}, unbuffered=True,
        )
        self.assertEqual(response.code, 200)
        response.deliverBody(_Ignore())
        yield self.service.stopService()
        now = _now()
        start, length = fixed_window(now, 60.0)
        whole = Bucket("alice/tpm", FIXED, 5000, 5000, length, start)
        slot = Bucket("alice/parallel", CONCURRENT, 1, 1, 60.0)
        verdict = yield store.reserve("probe", [whole, slot], now)
        self.assertTrue(verdict.granted)


class SDKBackoffTests(PolicyTestCase):
    """The official SDK retries a 429 after Retry-After, by itself."""

    @defer.inlineCallbacks
    def test_sdk_backs_off(self):
        """With 1 request a second (moving window), the SDK's second call
        gets a 429, waits the Retry-After and succeeds; the proxy refused
        one request and the upstream saw two."""
        yield self.start_proxy(
            OPENAI_API_KEY=DEFAULT, FORWARD_KEY=f"alice:{ALICE}",
            REQ_RATE_LIMIT=json.dumps({"/v1/chat/completions": [{"level": 0, "limit": "1/second"}]}),
            RATE_LIMIT_STRATEGY="moving-window",
        )
        base = self.base

        def run():
            with openai.OpenAI(
                base_url=base + "/v1", api_key=ALICE, max_retries=2, timeout=10,
                http_client=openai.DefaultHttpxClient(trust_env=False),
            ) as client:
                msgs = [{"role": "user", "content": "hi"}]
                first = client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
                second = client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=msgs
                )
                return first, second.retries_taken

        first, retries = yield deferToThread(run)
        self.assertEqual(first.choices[0].message.content, self.fake.answer_text)
        self.assertGreaterEqual(retries, 1)
        self.assertEqual(len(self.fake.seen), 2)

    @defer.inlineCallbacks
    def test_sdk_does_not_retry_spent_quota(self):
        """A spent quota says x-should-retry: false: the SDK raises
        RateLimitError with code insufficient_quota after one request."""
        yield self.start_proxy(
            OPENAI_API_KEY=DEFAULT, FORWARD_KEY=f"alice:{ALICE}",
            KEY_POLICY=json.dumps({"alice": {"tokens_per_day": 0}}),
        )
        base = self.base

        def run():
            with openai.OpenAI(
                base_url=base + "/v1", api_key=ALICE, max_retries=2, timeout=10,
                http_client=openai.DefaultHttpxClient(trust_env=False),
            ) as client:
                try:
                    client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                    )
                except openai.RateLimitError as e:
                    return e
            return None

        error = yield deferToThread(run)
        self.assertEqual(error.code, "insufficient_quota")
        self.assertEqual(self.fake.seen, [])
        text = yield self.metrics()
        self.assertIn(
            'openai_forward_policy_refusals_total{key="alice",reason="insufficient_quota"} 1.0',
            text,
        )


class _Ignore(Protocol):
    """Takes a body and drops it."""

    def connectionLost(self, reason=None):
        pass


def _now() -> float:
    from twisted.internet import reactor

    return reactor.seconds()


class RecordedUsageTests(PolicyTestCase):
    """The chat record keeps the usage the proxy asked for."""

    @defer.inlineCallbacks
    def test_record_has_usage_client_not(self):
        """A token-limited key's stream: the client gets no usage chunk,
        the chat record (and so the ledger) has the usage."""
        from twisted_forward.tap import ProxyService

        yield self.start_proxy(
            OPENAI_API_KEY=DEFAULT, FORWARD_KEY=f"alice:{ALICE}",
            KEY_POLICY=json.dumps({"alice": {"tpm": 100000}}),
            LOG_CHAT="true", LOG_DIR=os.path.abspath(self.mktemp()),
        )
        [service] = [s for s in self.service if isinstance(s, ProxyService)]
        records: list = []
        got: defer.Deferred = defer.Deferred()

        def observe(event: dict) -> None:
            records.append(event["chat_record"])
            got.callback(None)

        service.recorder.publisher.addObserver(observe)
        self.addCleanup(service.recorder.publisher.removeObserver, observe)
        response = yield self.client.post(
            self.url("/v1/chat/completions"), data=chat(stream=True),
            headers={b"authorization": [b"Bearer " + ALICE.encode()]},
        )
        content = yield response.content()
        yield got
        self.assertNotIn(b'"usage"', content)
        self.assertEqual(records[0]["usage"]["total_tokens"], 10)


@implementer(IPolicyStore)
class LaterStore:
    """A memory store that answers on a later turn of the reactor, as the
    supervisor's and Redis stores do."""

    def __init__(self, store) -> None:
        self.store = store

    def reserve(self, reservation, buckets, now):
        return deferLater(reactor, 0, self.store.reserve_now, reservation, buckets, now)

    def settle(self, reservation, settlements, now):
        return deferLater(reactor, 0, self.store.settle_now, reservation, settlements, now)

    def close(self):
        return self.store.close()


class AsyncStoreTests(PolicyTestCase):
    """A store that answers later: the exchange waits for it."""

    @defer.inlineCallbacks
    def test_later_answers(self):
        """Admitted and refused requests work the same when the verdict
        comes on a later reactor turn."""
        yield self.start_proxy(
            OPENAI_API_KEY=DEFAULT, FORWARD_KEY=f"alice:{ALICE}",
            KEY_POLICY=json.dumps({"alice": {"rpm": 1, "tpm": 100000}}),
        )
        for service in IServiceCollection(self.service):
            built = getattr(service, "built", None)
            if built is not None:
                built.policy.store = LaterStore(built.policy.store)
        response, content = yield self.post(ALICE, chat(stream=True))
        self.assertEqual(response.code, 200)
        self.assertEqual(content, b"".join(chat_chunks(self.fake.answer_text, "gpt-4o-mini")))
        response, content = yield self.post(ALICE, chat())
        self.assertError(response, content, 429, "rate_limit_exceeded")
        self.assertIsNotNone(self.header(response, "retry-after"))
