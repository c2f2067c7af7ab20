"""
The Lua scripts of the Redis policy store, run on a real redis-server with
time given by the test (``now`` in milliseconds), so windows, reservations and
settling are checked exactly, without waiting.
"""

from __future__ import annotations

from typing import Any, Sequence

import txredisapi
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from twisted_forward.policies import redis_lua

from .redis_server import start_redis


class LuaTests(TestCase):
    """Each test gets its own redis-server on a unix socket."""

    timeout = 20

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.server = yield start_redis(self)
        self.redis = yield txredisapi.UnixConnection(
            self.server.socket_path, reconnect=False, convertNumbers=False
        )
        self.addCleanup(self.redis.disconnect)

    def reserve(self, now: int, rid: str, buckets: Sequence[tuple]) -> "defer.Deferred[list]":
        """Run RESERVE; ``buckets`` are (key, kind, window or lease, limit,
        amount[, start, end])."""
        keys = [b[0] for b in buckets]
        args: list[Any] = [now, rid]
        for b in buckets:
            start, end = (b[5], b[6]) if len(b) > 5 else (0, 0)
            args += [b[1], b[2], b[3], b[4], start, end]
        return self.redis.eval(redis_lua.RESERVE, keys, args)

    def adjust(self, rid: str, changes: Sequence[tuple]) -> "defer.Deferred[Any]":
        """Run ADJUST; ``changes`` are (key, kind, tag, old, new)."""
        keys = [c[0] for c in changes]
        args: list[Any] = [rid]
        for c in changes:
            args += [c[1], c[2], c[3], c[4]]
        return self.redis.eval(redis_lua.ADJUST, keys, args)

    @defer.inlineCallbacks
    def test_fixed_window_counts_up_to_the_limit_and_resets(self) -> Any:
        """A fixed window of 60 s with limit 3: three charges pass, the fourth
        is refused with the time to the window's end; the next window is
        fresh."""
        bucket = ("t:f:rpm", "f", 0, 3, 1, 120000, 180000)
        results = []
        for i in range(4):
            results.append((yield self.reserve(120000 + i * 1000, f"r{i}", [bucket])))
        self.assertEqual([r[0] for r in results], [1, 1, 1, 0])
        self.assertEqual([r[4] for r in results[:3]], ["1", "2", "3"])
        refused = results[3]
        self.assertEqual(refused[1], 1)
        self.assertEqual(refused[2], 57000)  # from 123 s to 180 s
        self.assertEqual(refused[5], 57000)
        self.assertEqual(refused[6], "120000")
        fresh = yield self.reserve(180000, "r5", [("t:f:rpm", "f", 60000, 3, 1)])
        self.assertEqual(fresh[0], 1)
        self.assertEqual(fresh[4], "1")
        ttl = yield self.redis.execute_command("PTTL", "t:f:rpm:180000")
        self.assertTrue(0 < int(ttl) <= 61000, ttl)

    @defer.inlineCallbacks
    def test_all_or_nothing(self) -> Any:
        """When one bucket has no room, no bucket is charged."""
        requests = ("t:f:rpm", "f", 60000, 10, 1)
        tokens = ("t:f:tpm", "f", 60000, 100, 80)
        first = yield self.reserve(0, "a", [requests, tokens])
        self.assertEqual(first[0], 1)
        second = yield self.reserve(1000, "b", [requests, tokens])
        self.assertEqual(second[:2], [0, 2])
        self.assertEqual(second[4], "1")  # requests: still one
        self.assertEqual(second[7], "80")  # tokens: still 80
        self.assertEqual((yield self.redis.get("t:f:rpm:0")), "1")

    @defer.inlineCallbacks
    def test_fixed_window_settle_and_release(self) -> Any:
        """Settling charges the real amount to the window reserved in, even
        after it moved on; releasing takes the charge back; never below 0."""
        tokens = ("t:f:tpm", "f", 60000, 100, 80)
        r = yield self.reserve(1000, "a", [tokens])
        tag = r[6]
        yield self.adjust("a", [("t:f:tpm", "f", tag, "80", "25")])
        self.assertEqual(float((yield self.redis.get("t:f:tpm:0"))), 25)
        again = yield self.reserve(2000, "b", [("t:f:tpm", "f", 60000, 100, 75)])
        self.assertEqual(again[0], 1)
        yield self.adjust("b", [("t:f:tpm", "f", tag, "75", "0")])
        yield self.adjust("c", [("t:f:tpm", "f", tag, "500", "0")])
        self.assertEqual(float((yield self.redis.get("t:f:tpm:0"))), 0)
        # A window that is over is not brought back by a late settle.
        yield self.adjust("d", [("t:f:tpm", "f", "-60000", "5", "9")])
        self.assertIsNone((yield self.redis.get("t:f:tpm:-60000")))

    @defer.inlineCallbacks
    def test_explicit_period(self) -> Any:
        """With window 0 the caller's period (a calendar month) is the window."""
        start, end = 1_000_000, 3_678_400_000
        quota = ("t:f:usd", "f", 0, 1.5, 0.75, start, end)
        self.assertEqual((yield self.reserve(start + 5, "a", [quota]))[0], 1)
        self.assertEqual((yield self.reserve(start + 6, "b", [quota]))[0], 1)
        refused = yield self.reserve(start + 7, "c", [quota])
        self.assertEqual(refused[:3], [0, 1, end - start - 7])
        self.assertEqual(float(refused[4]), 1.5)

    @defer.inlineCallbacks
    def test_moving_window(self) -> Any:
        """A moving window of 10 s, limit 100: charges leave it 10 s after
        they were made, and the wait is until enough have left."""
        key = "t:m:tpm"
        self.assertEqual((yield self.reserve(0, "a", [(key, "m", 10000, 100, 30)]))[0], 1)
        self.assertEqual((yield self.reserve(4000, "b", [(key, "m", 10000, 100, 50)]))[0], 1)
        refused = yield self.reserve(6000, "c", [(key, "m", 10000, 100, 60)])
        # 80 used; 60 more needs 40 to leave: a's 30 at 10 s is not enough,
        # b's 50 at 14 s is.
        self.assertEqual(refused[:3], [0, 1, 8000])
        self.assertEqual(refused[5], 8000)  # all of it has left at 14 s
        # At 10 s a's charge has left: 50 used, 60 does not fit, 50 does.
        self.assertEqual((yield self.reserve(10000, "d", [(key, "m", 10000, 100, 60)]))[0], 0)
        self.assertEqual((yield self.reserve(10000, "e", [(key, "m", 10000, 100, 50)]))[0], 1)
        # Settling b down to 10 makes room for 40 more, at once.
        yield self.adjust("b", [(key, "m", "", "50", "10")])
        ok = yield self.reserve(10001, "f", [(key, "m", 10000, 100, 40)])
        self.assertEqual((ok[0], ok[4]), (1, "100"))

    @defer.inlineCallbacks
    def test_concurrency_leases(self) -> Any:
        """max_parallel 2: a third lease is refused; a released one frees a
        place; a lease whose holder vanished ends when it expires."""
        key = "t:c:par"
        slot = (key, "c", 5000, 2, 1)
        self.assertEqual((yield self.reserve(0, "a", [slot]))[0], 1)
        self.assertEqual((yield self.reserve(0, "b", [slot]))[0], 1)
        self.assertEqual((yield self.reserve(1, "c", [slot]))[0], 0)
        yield self.adjust("a", [(key, "c", "", "1", "0")])
        self.assertEqual((yield self.reserve(2, "d", [slot]))[0], 1)
        # b and d are held; b is renewed, d's holder died.
        yield self.redis.eval(redis_lua.RENEW, [key], [4000, "b", 1, 5000])
        refused = yield self.reserve(4999, "e", [slot])
        self.assertEqual(refused[0], 0)
        granted = yield self.reserve(5002, "e", [slot])
        self.assertEqual((granted[0], granted[4]), (1, "2"))
        members = yield self.redis.execute_command("ZRANGE", key, 0, -1)
        self.assertEqual(sorted(members), ["b#1", "e#1"])

    @defer.inlineCallbacks
    def test_health(self) -> Any:
        """Key health is read back only when its version changed."""
        keys = ["t:health", "t:health:v"]
        self.assertEqual((yield self.redis.eval(redis_lua.HEALTH_GET, keys, ["0"])), ["0"])
        version = yield self.redis.eval(redis_lua.HEALTH_SET, keys, ["k1", "revoked", "0", 60000])
        yield self.redis.eval(redis_lua.HEALTH_SET, keys, ["k2", "rest", "1234.5", 60000])
        got = yield self.redis.eval(redis_lua.HEALTH_GET, keys, [str(version)])
        self.assertEqual(got[0], "2")
        self.assertEqual(dict(zip(got[1::2], got[2::2])), {"k1": "revoked:0", "k2": "rest:1234.5"})
        self.assertEqual((yield self.redis.eval(redis_lua.HEALTH_GET, keys, ["2"])), ["2"])

    @defer.inlineCallbacks
    def test_batch_applies_in_order(self) -> Any:
        """BATCH: reservations and adjustments in one call are applied in
        the order given, each as RESERVE or ADJUST would, and each answers
        one status line; a key used by several operations is given once."""
        keys = ["t:f:rpm", "t:f:tpm"]
        ops = [
            "r a 1000 2 1 f 60000 2 1 0 0 2 f 60000 100 80 0 0",
            "r b 2000 2 1 f 60000 2 1 0 0 2 f 60000 100 30 0 0",  # tokens: no room
            "a a 1 2 f 0 80 20",  # a settles at 20 tokens
            "r c 3000 2 1 f 60000 2 1 0 0 2 f 60000 100 30 0 0",  # fits now
            "r d 4000 1 1 f 60000 2 1 0 0",  # rpm 2 is full
        ]
        reply = yield self.redis.eval(redis_lua.BATCH, keys, ops)
        self.assertEqual(reply, [
            "1 0 0 1 59000 80 59000",
            "0 2 58000 1 58000 80 58000",
            "0",
            "1 0 0 2 57000 50 57000",
            "0 1 56000 2 56000",
        ])
        self.assertEqual(float((yield self.redis.get("t:f:tpm:0"))), 50)
