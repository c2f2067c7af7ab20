"""
A burst of reservations on the Redis policy store (a real redis-server):
a thousand requests asked for in one reactor turn, with the reactor then
busy for longer than ``LIMITS_STORE_TIMEOUT`` (as it is while it parses a
burst of requests), are all answered by the store, exactly to the limit,
none refused as if the store were down; an answer that comes after its wait
ran out gives back what it granted; and through the real plugin, a burst of
streams with policies on Redis and ``LIMITS_ON_STORE_FAILURE=closed`` is
served up to the limit, none refused with 503.
"""

from __future__ import annotations

import json
import time
from typing import Any

import txredisapi
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from twisted_forward import redis_link
from twisted_forward.policies.redis_store import BATCH_MAX, RedisStore, connection
from twisted_forward.policies.store import FIXED, Bucket, StoreUnavailable

from .redis_server import start_redis
from .test_policies_e2e import ALICE, BOB, DEFAULT, PolicyTestCase, chat

T0 = float(int(time.time()) // 60 * 60)


def busy(seconds: float) -> None:
    """Keep the reactor's thread busy (CPU, not sleeping), as parsing a
    burst of requests does."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


class StoreBurstTests(TestCase):
    """The store alone, on a real redis-server."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.server = yield start_redis(self)
        self.target = redis_link.parse_redis_url(self.server.url)

    @defer.inlineCallbacks
    def make_store(self, timeout: float, **kw: Any) -> Any:
        store = RedisStore(lambda: connection(self.target, timeout), reactor, timeout, **kw)
        self.addCleanup(store.close)
        # Connected, as the service's start connects it: the burst is not
        # the first call.
        yield store.reserve("warm-up", [Bucket("other/rpm", FIXED, 10, 1, 60.0, T0)], T0)
        return store

    @defer.inlineCallbacks
    def test_burst_with_a_busy_reactor_is_answered_exactly(self) -> Any:
        """1000 reservations of one key (rpm 600) asked for in one turn,
        then the reactor busy for twice the store's timeout: none fails
        with StoreUnavailable, exactly 600 are granted, and the refusals
        say when the window ends."""
        store = yield self.make_store(0.3)
        bucket = Bucket("alice/rpm", FIXED, 600, 1, 60.0, T0)
        calls = [store.reserve(f"r{i}", [bucket], T0 + 1) for i in range(1000)]
        reactor.callLater(0, busy, 0.6)
        results = yield defer.DeferredList(calls, consumeErrors=True)
        failures = [r for ok, r in results if not ok]
        self.assertEqual(failures, [])
        verdicts = [r for _, r in results]
        self.assertEqual(sum(v.granted for v in verdicts), 600)
        refused = [v for v in verdicts if not v.granted][0]
        self.assertEqual((refused.refused, refused.states[0].remaining), (0, 0))
        self.assertAlmostEqual(refused.retry_after, 59.0)
        self.assertEqual(len(store.open), 600 + 1)

    @defer.inlineCallbacks
    def test_a_burst_is_few_calls(self) -> Any:
        """The reservations of one turn go to Redis in batches of at most
        BATCH_MAX: 1000 reservations are 5 script runs, not 1000."""
        store = yield self.make_store(2.0)
        redis = yield txredisapi.UnixConnection(
            self.server.socket_path, reconnect=False, convertNumbers=False)
        self.addCleanup(redis.disconnect)
        before = yield redis.execute_command("INFO", "commandstats")
        bucket = Bucket("alice/rpm", FIXED, 10_000, 1, 60.0, T0)
        yield defer.gatherResults([store.reserve(f"r{i}", [bucket], T0) for i in range(1000)])
        after = yield redis.execute_command("INFO", "commandstats")

        def evalsha_calls(info: str) -> int:
            return sum(
                int(line.split("calls=")[1].split(",")[0])
                for line in info.splitlines()
                if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:"))
            )

        self.assertEqual(evalsha_calls(after) - evalsha_calls(before), 1000 // BATCH_MAX)

    @defer.inlineCallbacks
    def test_a_late_answer_gives_back_what_it_granted(self) -> Any:
        """With Redis paused past the timeout, the reservation fails with
        StoreUnavailable; when Redis answers afterwards, the grant it made is
        given back, so the key's one slot in the window is free again."""
        returned: defer.Deferred = defer.Deferred()
        store = yield self.make_store(0.2, gave_back=returned.callback)
        other = yield txredisapi.UnixConnection(
            self.server.socket_path, reconnect=False, convertNumbers=False)
        self.addCleanup(other.disconnect)
        yield other.execute_command("CLIENT", "PAUSE", "700")
        # A window around the real time: the give-back is made at the real
        # time, and a window that is over is not given back to.
        now = time.time()
        bucket = Bucket("alice/hour", FIXED, 1, 1, 3600.0, now - 1)
        yield self.assertFailure(store.reserve("late", [bucket], now), StoreUnavailable)
        self.assertEqual((yield returned), 1)
        yield store.release_all(now)
        self.assertNotIn("late", store.open)
        again = yield store.reserve("again", [bucket], now + 1)
        self.assertTrue(again.granted)


class PluginBurstTests(PolicyTestCase):
    """The real plugin, policies on a real redis-server, fail closed."""

    timeout = 60

    @defer.inlineCallbacks
    def test_a_burst_of_streams_is_served_up_to_the_limit(self) -> Any:
        """300 streamed chats sent at once by one key with rpm 250 (the
        default LIMITS_STORE_TIMEOUT, LIMITS_ON_STORE_FAILURE=closed):
        exactly 250 are served, 50 get 429 rate_limit_exceeded, none gets
        503 limits_unavailable; a key without a policy is served too."""
        redis = yield start_redis(self)
        yield self.start_proxy(
            OPENAI_API_KEY=DEFAULT, FORWARD_KEY=f"alice:{ALICE} bob:{BOB}",
            REDIS_URL=redis.url, KEY_POLICY=json.dumps({"alice": {"rpm": 250, "tpm": 10**9}}),
            LIMITS_ON_STORE_FAILURE="closed",
        )
        # The store is connected at start-up; one request proves it.
        response, _ = yield self.post(BOB, chat())
        self.assertEqual(response.code, 200)
        results = yield defer.gatherResults(
            [self.post(ALICE, chat(stream=True)) for _ in range(300)])
        codes = sorted(r.code for r, _ in results)
        self.assertEqual(codes, [200] * 250 + [429] * 50)
        for response, content in results:
            if response.code == 429:
                self.assertError(response, content, 429, "rate_limit_exceeded")
