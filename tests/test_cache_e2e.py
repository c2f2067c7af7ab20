"""
The response cache end to end: the real plugin in front of the fake
upstream, with the memory, LMDB and Redis backends.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from twisted.internet import defer

from .fake_upstream import chat_chunks
from .redis_server import start_redis
from .test_chatlog_e2e import ChatLogTestCase

CHAT = "/v1/chat/completions"
FORWARD = "team-a:fk-aaaaaaaaaaaaaaaa team-b:fk-bbbbbbbbbbbbbbbb"
DEFAULT_KEY = "sk-default-0123456789abcdef"


def ask(text: str = "hi", stream: bool = False, caching: Optional[bool] = True,
        **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra
    }
    if stream:
        body["stream"] = True
    if caching is not None:
        body["caching"] = caching
    return json.dumps(body).encode()


def data_lines(body: bytes) -> list[bytes]:
    return [line for line in body.split(b"\n") if line.startswith(b"data:")]


class CacheTestCase(ChatLogTestCase):
    """Posts through the proxy and reads x-cache."""

    def env(self, **extra: str) -> dict[str, str]:
        """The proxy's environment with the cache on for openai routes."""
        return {"CACHE_OPENAI": "true", **extra}

    @defer.inlineCallbacks
    def send(self, body: bytes, key: Optional[str] = None, base: Optional[str] = None):
        """POST a chat request (with ``key`` as Bearer); fires with the
        response and its body."""
        headers = {b"content-type": [b"application/json"]}
        if key is not None:
            headers[b"authorization"] = [b"Bearer " + key.encode()]
        response = yield self.client.post(
            (base or self.base) + CHAT, data=body, headers=headers
        )
        content = yield response.content()
        return response, content

    def x_cache(self, response: Any) -> Optional[bytes]:
        """The answer's x-cache value, or None."""
        values = response.headers.getRawHeaders(b"x-cache")
        return values[0] if values else None

    def upstream_bodies(self) -> list[dict]:
        """The completions bodies the fake upstream received, parsed."""
        return [json.loads(seen.body) for seen in self.fake.seen if seen.uri.endswith(b"/completions")]


class HitMissBypassTests(CacheTestCase):
    """The memory backend, JSON and streamed answers."""

    @defer.inlineCallbacks
    def test_json_miss_then_hit(self) -> None:
        """The first request is a miss and goes upstream without its
        ``caching`` field; the second is a hit, byte-identical, and never
        reaches the upstream."""
        yield self.start_proxy(**self.env(OPENAI_API_KEY=DEFAULT_KEY))
        first, first_body = yield self.send(ask())
        self.assertEqual(first.code, 200)
        self.assertEqual(self.x_cache(first), b"miss")
        second, second_body = yield self.send(ask())
        self.assertEqual(self.x_cache(second), b"hit")
        self.assertEqual(second_body, first_body)
        self.assertEqual(second.headers.getRawHeaders(b"content-type"),
                         first.headers.getRawHeaders(b"content-type"))
        bodies = self.upstream_bodies()
        self.assertEqual(len(bodies), 1)
        self.assertNotIn("caching", bodies[0])

    @defer.inlineCallbacks
    def test_stream_miss_then_hit(self) -> None:
        """A streamed answer is stored whole and replayed as the same SSE
        data lines, ending with [DONE]."""
        yield self.start_proxy(**self.env(CACHE_REPLAY_INTERVAL="0.001"))
        first, first_body = yield self.send(ask(stream=True))
        self.assertEqual(self.x_cache(first), b"miss")
        self.assertEqual(first_body, b"".join(chat_chunks(self.fake.answer_text)))
        second, second_body = yield self.send(ask(stream=True))
        self.assertEqual(self.x_cache(second), b"hit")
        self.assertEqual(data_lines(second_body), data_lines(first_body))
        self.assertEqual(second_body, first_body)
        self.assertEqual(data_lines(second_body)[-1], b"data: [DONE]")
        self.assertEqual(len(self.upstream_bodies()), 1)
        # A non-streamed request with the same messages is another answer.
        third, _ = yield self.send(ask())
        self.assertEqual(self.x_cache(third), b"miss")

    @defer.inlineCallbacks
    def test_usage_chunk_only_for_who_asked(self) -> None:
        """``stream_options`` is not in the key: a stream stored for a client
        that asked for usage is replayed without the usage chunk to one that
        did not, and with it to one that did."""
        yield self.start_proxy(**self.env())
        options = {"stream_options": {"include_usage": True}}
        first, with_usage = yield self.send(ask(stream=True, **options))
        self.assertEqual(self.x_cache(first), b"miss")
        self.assertIn(b'"usage": {', with_usage)
        plain, without = yield self.send(ask(stream=True))
        self.assertEqual(self.x_cache(plain), b"hit")
        self.assertEqual(without, b"".join(chat_chunks(self.fake.answer_text)))
        again, body = yield self.send(ask(stream=True, **options))
        self.assertEqual(self.x_cache(again), b"hit")
        self.assertEqual(body, with_usage)
        self.assertEqual(len(self.upstream_bodies()), 1)

    @defer.inlineCallbacks
    def test_bypass(self) -> None:
        """Without the field (and the default off), with ``caching: false``,
        or with sampling, every request goes upstream, marked bypass; the
        field never reaches the upstream."""
        yield self.start_proxy(**self.env())
        for body in (ask(caching=None), ask(caching=False), ask(temperature=0.9)) * 2:
            response, _ = yield self.send(body)
            self.assertEqual(self.x_cache(response), b"bypass")
        bodies = self.upstream_bodies()
        self.assertEqual(len(bodies), 6)
        self.assertFalse(any("caching" in b for b in bodies))

    @defer.inlineCallbacks
    def test_default_caching_value(self) -> None:
        """DEFAULT_REQUEST_CACHING_VALUE=true caches requests without the
        field; those go upstream byte for byte."""
        yield self.start_proxy(**self.env(DEFAULT_REQUEST_CACHING_VALUE="true"))
        yield self.send(ask(caching=None))
        response, _ = yield self.send(ask(caching=None))
        self.assertEqual(self.x_cache(response), b"hit")
        self.assertEqual(self.fake.seen[0].body, ask(caching=None))

    @defer.inlineCallbacks
    def test_errors_are_not_stored(self) -> None:
        """An upstream error answer is relayed, not stored: the next request
        goes upstream again."""
        yield self.start_proxy(**self.env())

        def fail(request: Any) -> bytes:
            request.setResponseCode(500)
            return b'{"error": {"message": "boom"}}'

        self.fake.override = fail
        first, _ = yield self.send(ask())
        self.assertEqual((first.code, self.x_cache(first)), (500, b"miss"))
        self.fake.override = None
        second, _ = yield self.send(ask())
        self.assertEqual((second.code, self.x_cache(second)), (200, b"miss"))

    @defer.inlineCallbacks
    def test_proxy_error_says_miss(self) -> None:
        """When the upstream cannot be reached, the proxy's own 502 still
        says x-cache: miss, and nothing is stored."""
        yield self.start_proxy(**self.env(OPENAI_BASE_URL="http://127.0.0.1:1"))
        for _ in range(2):
            response, _ = yield self.send(ask())
            self.assertEqual((response.code, self.x_cache(response)), (502, b"miss"))

    @defer.inlineCallbacks
    def test_cache_off_sends_body_untouched(self) -> None:
        """With the cache off there is no x-cache header and the body is
        not touched."""
        yield self.start_proxy()
        response, _ = yield self.send(ask())
        self.assertIsNone(self.x_cache(response))
        self.assertEqual(self.fake.seen[0].body, ask())


class IsolationTests(CacheTestCase):
    """One tenant never receives another's cached answer."""

    @defer.inlineCallbacks
    def test_two_forward_keys(self) -> None:
        """Team b misses what team a stored; each then hits its own."""
        yield self.start_proxy(**self.env(OPENAI_API_KEY=DEFAULT_KEY, FORWARD_KEY=FORWARD))
        a = "fk-aaaaaaaaaaaaaaaa"
        b = "fk-bbbbbbbbbbbbbbbb"
        r, _ = yield self.send(ask(), key=a)
        self.assertEqual(self.x_cache(r), b"miss")
        r, _ = yield self.send(ask(), key=b)
        self.assertEqual(self.x_cache(r), b"miss")
        r, _ = yield self.send(ask(), key=a)
        self.assertEqual(self.x_cache(r), b"hit")
        r, _ = yield self.send(ask(), key=b)
        self.assertEqual(self.x_cache(r), b"hit")
        self.assertEqual(len(self.upstream_bodies()), 2)

    @defer.inlineCallbacks
    def test_two_client_keys(self) -> None:
        """Two clients with their own keys do not share answers."""
        yield self.start_proxy(**self.env())
        one, two = "sk-client-one-0123456789", "sk-client-two-0123456789"
        r, _ = yield self.send(ask(), key=one)
        self.assertEqual(self.x_cache(r), b"miss")
        r, _ = yield self.send(ask(), key=two)
        self.assertEqual(self.x_cache(r), b"miss")
        r, _ = yield self.send(ask(), key=one)
        self.assertEqual(self.x_cache(r), b"hit")
        self.assertEqual(
            [s.header(b"authorization") for s in self.fake.seen],
            [b"Bearer " + one.encode(), b"Bearer " + two.encode()],
        )

    @defer.inlineCallbacks
    def test_shared_partition(self) -> None:
        """CACHE_SHARED=true lets another key hit what one stored."""
        yield self.start_proxy(**self.env(CACHE_SHARED="true"))
        yield self.send(ask(), key="sk-client-one-0123456789")
        r, _ = yield self.send(ask(), key="sk-client-two-0123456789")
        self.assertEqual(self.x_cache(r), b"hit")


class RecordsAndMetricsTests(CacheTestCase):
    """Hits are recorded, counted, and spend no default key."""

    #: They scrape /metrics on the proxy's port, without the admin key.
    proxy_settings = {"METRICS": "public"}

    @defer.inlineCallbacks
    def test_hit_is_recorded_as_cached(self) -> None:
        """A hit writes a chat record marked ``cache: hit`` with the answer."""
        yield self.start_recording(**self.env(OPENAI_API_KEY=DEFAULT_KEY))
        yield self.send(ask(stream=True))
        yield self.send(ask(stream=True))
        records = yield self.records()
        self.assertEqual([r.get("cache") for r in records], ["miss", "hit"])
        miss, hit = records
        self.assertEqual(hit["status"], 200)
        for name in ("messages", "finish_reason", "model"):
            self.assertEqual(hit.get(name), miss.get(name))
        self.assertIn("Hello", json.dumps(hit))

    @defer.inlineCallbacks
    def test_metrics(self) -> None:
        """Hits, misses, bypasses and stored/served bytes are counted; the
        hit spends no default key (the rotation does not move)."""
        yield self.start_proxy(**self.env(OPENAI_API_KEY="sk-one-0123456789 sk-two-0123456789"))
        yield self.send(ask())
        yield self.send(ask())
        yield self.send(ask(caching=None))
        self.assertEqual(
            [s.header(b"authorization") for s in self.fake.seen],
            [b"Bearer sk-one-0123456789", b"Bearer sk-two-0123456789"],
        )
        response = yield self.client.get(self.url("/metrics"))
        text = (yield response.content()).decode()
        for line in (
            'openai_forward_cache_lookups_total{result="hit",route="/"} 1.0',
            'openai_forward_cache_lookups_total{result="miss",route="/"} 1.0',
            'openai_forward_cache_lookups_total{result="bypass",route="/"} 1.0',
        ):
            self.assertIn(line, text)
        self.assertRegex(text, r'openai_forward_cache_bytes_total\{direction="served"\} [1-9]')


class PersistentBackendTests(CacheTestCase):
    """LMDB across a restart; Redis shared by two instances."""

    timeout = 40

    @defer.inlineCallbacks
    def restart(self, env: dict[str, str]) -> Any:
        """Stop the running service (drained, store closed) and start anew."""
        yield self.pool.closeCachedConnections()
        yield self.service.stopService()
        yield self.proxy_tracker.closed()
        yield self.start_proxy(**env)

    @defer.inlineCallbacks
    def test_lmdb_survives_restart(self) -> None:
        """An answer stored in LMDB is a hit after the service restarts."""
        root = os.path.abspath(self.mktemp())
        env = self.env(CACHE_BACKEND="LMDB", CACHE_ROOT_PATH_OR_URL=root)
        yield self.start_proxy(**env)
        r, before = yield self.send(ask(stream=True))
        self.assertEqual(self.x_cache(r), b"miss")
        yield self.restart(env)
        r, after = yield self.send(ask(stream=True))
        self.assertEqual(self.x_cache(r), b"hit")
        self.assertEqual(after, before)
        self.assertTrue(os.path.isdir(os.path.join(root, "CACHE_DB")))
        self.assertEqual(len(self.upstream_bodies()), 1)

    @defer.inlineCallbacks
    def test_damaged_lmdb_is_a_miss(self) -> None:
        """A damaged LMDB file makes misses, never errors: answers still flow."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "CACHE_DB"))
        with open(os.path.join(root, "CACHE_DB", "data.mdb"), "wb") as f:
            f.write(b"\x00garbage" * 4096)
        yield self.start_proxy(**self.env(CACHE_BACKEND="LMDB", CACHE_ROOT_PATH_OR_URL=root))
        for _ in range(2):
            r, body = yield self.send(ask())
            self.assertEqual((r.code, self.x_cache(r)), (200, b"miss"))
            self.assertIn(b"Hello", body)

    @defer.inlineCallbacks
    def test_unwritable_lmdb_is_a_miss(self) -> None:
        """An LMDB location that cannot be created (a file is in the way)
        makes misses, never errors, and start-up is not stopped."""
        blocker = os.path.abspath(self.mktemp())
        with open(blocker, "w") as f:
            f.write("in the way")
        yield self.start_proxy(**self.env(CACHE_BACKEND="LMDB", CACHE_ROOT_PATH_OR_URL=blocker))
        for _ in range(2):
            r, body = yield self.send(ask(stream=True))
            self.assertEqual((r.code, self.x_cache(r)), (200, b"miss"))
            self.assertEqual(data_lines(body)[-1], b"data: [DONE]")

    @defer.inlineCallbacks
    def test_redis_shared_by_two_instances(self) -> None:
        """What one instance stored in Redis, a second instance serves."""
        server = yield start_redis(self)
        env = self.env(CACHE_BACKEND="REDIS", REDIS_URL=server.url)
        yield self.start_proxy(**env)
        first_base = self.base
        first_service, first_tracker = self.service, self.proxy_tracker

        @defer.inlineCallbacks
        def stop_first() -> Any:
            if first_service.running:
                yield first_service.stopService()
            yield first_tracker.closed()

        self.addCleanup(stop_first)
        r, stored = yield self.send(ask(stream=True), base=first_base)
        self.assertEqual(self.x_cache(r), b"miss")
        # The store writes after the answer went out: ask the first instance
        # until it hits, so the entry is surely in Redis.
        misses = 1
        for _ in range(100):
            r, _ = yield self.send(ask(stream=True), base=first_base)
            if self.x_cache(r) == b"hit":
                break
            misses += 1
        yield self.start_proxy(**env)
        self.assertNotEqual(self.base, first_base)
        r, served = yield self.send(ask(stream=True))
        self.assertEqual(self.x_cache(r), b"hit")
        self.assertEqual(served, stored)
        self.assertEqual(len(self.upstream_bodies()), misses)

    @defer.inlineCallbacks
    def test_redis_down_is_a_miss(self) -> None:
        """With Redis gone, requests are misses within CACHE_TIMEOUT and are answered."""
        server = yield start_redis(self)
        yield self.start_proxy(**self.env(CACHE_BACKEND="REDIS", REDIS_URL=server.url,
                                          CACHE_TIMEOUT="0.5"))
        yield self.send(ask())
        yield server.kill()
        r, body = yield self.send(ask())
        self.assertEqual((r.code, self.x_cache(r)), (200, b"miss"))
        self.assertIn(b"Hello", body)


class PolicyTests(CacheTestCase):
    """A hit spends no upstream tokens in the policies."""

    @defer.inlineCallbacks
    def test_hits_spend_no_quota(self) -> None:
        """With a token quota that holds one answer (8 tokens) and one more
        reservation, the first request spends 8 tokens and every later hit
        passes: its reservation is released, not charged."""
        import math

        alice = "fk-alice-0123456789"
        body = ask(max_tokens=1)
        reserve = math.ceil(len(body) / 4) + 1
        yield self.start_proxy(**self.env(
            OPENAI_API_KEY=DEFAULT_KEY, FORWARD_KEY=f"alice:{alice}",
            KEY_POLICY=json.dumps({"alice": {"tokens_per_day": 8 + reserve}}),
        ))
        for i in range(5):
            response, content = yield self.send(body, key=alice)
            self.assertEqual(response.code, 200, content)
            self.assertEqual(self.x_cache(response), b"miss" if i == 0 else b"hit")
            # Hits carry the policies' headers too.
            self.assertEqual(
                response.headers.getRawHeaders(b"x-ratelimit-limit-tokens"), [b"%d" % (8 + reserve)]
            )
        self.assertEqual(len(self.upstream_bodies()), 1)
        # Not a hit: needs a new reservation on top of the 8 spent, which fits
        # once; its 8 tokens then exhaust the day.
        response, _ = yield self.send(ask("ho", max_tokens=1), key=alice)
        self.assertEqual(response.code, 200)
        response, content = yield self.send(ask("hu", max_tokens=1), key=alice)
        self.assertEqual(response.code, 429, content)


class RouteAndBodyTests(CacheTestCase):
    """General routes, and bodies over the examination bound."""

    @defer.inlineCallbacks
    def test_general_route(self) -> None:
        """CACHE_GENERAL caches on a general route (partitioned by the
        client's key), and CACHE_OPENAI alone does not."""
        config = json.dumps([
            {"base_url": f"http://127.0.0.1:{self.upstream_port}", "route": "/g", "type": "general"},
        ])
        yield self.start_proxy(CACHE_GENERAL="true", FORWARD_CONFIG=config)
        key = "sk-client-one-0123456789"
        r, first = yield self.send(ask(), key=key, base=self.base + "/g")
        self.assertEqual(self.x_cache(r), b"miss")
        r, second = yield self.send(ask(), key=key, base=self.base + "/g")
        self.assertEqual(self.x_cache(r), b"hit")
        self.assertEqual(second, first)
        r, _ = yield self.send(ask(), key="sk-client-two-0123456789", base=self.base + "/g")
        self.assertEqual(self.x_cache(r), b"miss")

    @defer.inlineCallbacks
    def test_large_body_bypasses(self) -> None:
        """A body over CACHE_MAX_REQUEST_BODY is not examined: bypass, and
        it reaches the upstream whole."""
        yield self.start_proxy(**self.env(CACHE_MAX_REQUEST_BODY="1000",
                                          DEFAULT_REQUEST_CACHING_VALUE="true"))
        body = ask("x" * 2000, caching=None)
        for _ in range(2):
            r, _ = yield self.send(body)
            self.assertEqual(self.x_cache(r), b"bypass")
        self.assertEqual([s.body for s in self.fake.seen], [body, body])
