"""
The exchange's side of the cache, in memory: lookups, storing, replay, and
stores that fail, hang or hold damaged entries.
"""

from __future__ import annotations

import io
import json
from typing import Any, Optional

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_forward.cache.hook import BYPASS, HIT, MISS, Lookup, ResponseCache
from twisted_forward.cache.interfaces import ICacheStore, IExchangeCache
from twisted_forward.cache.key import Partitions
from twisted_forward.cache.memory import MemoryStore
from twisted_forward.cache.metrics import CacheMetrics
from twisted_forward.cache.replay import sse_events
from twisted_forward.cache.settings import CacheSettings
from twisted_forward.config import ForwardKey, Route, parse_url
from twisted_forward.keys import KeyDecision

ROUTE = Route("", parse_url("http://upstream.example"), "openai")
CHAT = b"/v1/chat/completions"
KEYS = (ForwardKey("a", "fk-aaaaaaaaaa"), ForwardKey("b", "fk-bbbbbbbbbb"))
A = KeyDecision("a", substituted=True)
B = KeyDecision("b", substituted=True)
STREAM = (
    b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":"lo"}}]}\r\n\r\n'
    b": keep-alive\n\n"
    b"data: [DONE]\n\n"
)


def request(body: dict, method: bytes = b"POST") -> DummyRequest:
    req = DummyRequest([b""])
    req.method = method
    req.content = io.BytesIO(json.dumps(body).encode())
    return req


@implementer(ICacheStore)
class BrokenStore:
    """A store whose every call fails, or never answers."""

    name = "broken"

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang

    def get(self, key: bytes) -> "Deferred[Optional[bytes]]":
        return Deferred() if self.hang else fail(OSError("disk on fire"))

    def put(self, key: bytes, value: bytes) -> "Deferred[None]":
        return Deferred() if self.hang else fail(OSError("disk on fire"))

    def close(self) -> "Deferred[None]":
        return succeed(None)


class RaisingStore(BrokenStore):
    """A store whose calls raise instead of returning a failed Deferred."""

    def get(self, key: bytes) -> "Deferred[Optional[bytes]]":
        raise OSError("disk on fire")

    def put(self, key: bytes, value: bytes) -> "Deferred[None]":
        raise OSError("disk on fire")


class DamagingStore(MemoryStore):
    """A memory store whose values come back with their last bytes changed."""

    damage = False

    def get(self, key: bytes) -> "Deferred[Optional[bytes]]":
        def damaged(value: Optional[bytes]) -> Optional[bytes]:
            if value is None or not self.damage:
                return value
            return value[:-3] + b"!!!"

        return super().get(key).addCallback(damaged)


class HookTests(SynchronousTestCase):
    """ResponseCache with a memory store on a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.metrics = CacheMetrics(CollectorRegistry())

    def cache(self, store: Optional[ICacheStore] = None, **settings: Any) -> ResponseCache:
        s = CacheSettings(openai=True, **settings)
        if store is None:
            store = MemoryStore(self.clock, s.ttl, s.max_bytes, self.metrics)
        return ResponseCache(s, store, Partitions(KEYS, s.shared), self.clock, self.metrics)

    def lookup(self, cache: ResponseCache, body: dict, decision: KeyDecision = A,
               target: bytes = CHAT) -> Lookup:
        return self.successResultOf(cache.lookup(request(body), ROUTE, target, decision))

    def answer(self, lookup: Lookup, body: bytes, ctype: bytes = b"application/json",
               status: int = 200, outcome: str = "complete") -> None:
        assert lookup.tap is not None
        lookup.tap.response(status, Headers({b"content-type": [ctype]}))
        lookup.tap.data(body)
        lookup.tap.end(outcome)

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def test_interface(self) -> None:
        """ResponseCache provides IExchangeCache."""
        verifyObject(IExchangeCache, self.cache())

    def test_miss_store_hit(self) -> None:
        """A miss, once its 200 is stored, makes the same request a hit."""
        cache = self.cache()
        body = {"model": "m", "messages": [], "caching": True}
        first = self.lookup(cache, body)
        self.assertEqual(first.result, MISS)
        self.answer(first, b'{"id": "x"}')
        second = self.lookup(cache, dict(body, user="someone-else"))
        self.assertEqual(second.result, HIT)
        assert second.entry is not None
        self.assertEqual(second.entry.body, b'{"id": "x"}')
        self.assertEqual(self.count("openai_forward_cache_lookups_total", route="/", result="hit"), 1)
        self.assertEqual(self.count("openai_forward_cache_bytes_total", direction="stored"), 11)

    def test_bypass(self) -> None:
        """Not asked for, another route, or GET: bypass, never stored."""
        cache = self.cache()
        self.assertEqual(self.lookup(cache, {"model": "m"}).result, BYPASS)
        self.assertEqual(
            self.lookup(cache, {"model": "m", "caching": True}, target=b"/v1/images").result,
            BYPASS,
        )
        get = self.successResultOf(
            cache.lookup(request({}, b"GET"), ROUTE, CHAT, A))
        self.assertEqual(get.result, BYPASS)
        self.assertIsNone(get.tap)

    def test_errors_and_cut_answers_not_stored(self) -> None:
        """A 500, or an answer whose client left, leaves the next request a miss."""
        cache = self.cache()
        body = {"model": "m", "caching": True}
        self.answer(self.lookup(cache, body), b"{}", status=500)
        self.answer(self.lookup(cache, body), b"{}", outcome="client_left")
        self.assertEqual(self.lookup(cache, body).result, MISS)

    def test_partitions_are_apart(self) -> None:
        """One forward key's stored answer is a miss for another."""
        cache = self.cache()
        body = {"model": "m", "caching": True}
        self.answer(self.lookup(cache, body, A), b"{}")
        self.assertEqual(self.lookup(cache, body, A).result, HIT)
        self.assertEqual(self.lookup(cache, body, B).result, MISS)

    def test_shared_partition_opt_in(self) -> None:
        """With CACHE_SHARED, another key gets the stored answer."""
        cache = self.cache(shared=True)
        body = {"model": "m", "caching": True}
        self.answer(self.lookup(cache, body, A), b"{}")
        self.assertEqual(self.lookup(cache, body, B).result, HIT)

    def test_ttl(self) -> None:
        """After CACHE_TTL the answer is a miss again."""
        cache = self.cache(ttl=30.0)
        body = {"model": "m", "caching": True}
        self.answer(self.lookup(cache, body), b"{}")
        self.clock.advance(29)
        self.assertEqual(self.lookup(cache, body).result, HIT)
        self.clock.advance(2)
        self.assertEqual(self.lookup(cache, body).result, MISS)

    def test_failing_store_is_a_miss(self) -> None:
        """A store that fails makes misses, counted, and storing fails quietly."""
        cache = self.cache(store=BrokenStore())
        body = {"model": "m", "caching": True}
        lookup = self.lookup(cache, body)
        self.assertEqual(lookup.result, MISS)
        self.answer(lookup, b"{}")
        self.assertEqual(self.lookup(cache, body).result, MISS)
        self.assertEqual(self.count("openai_forward_cache_errors_total", op="get"), 2)
        self.assertEqual(self.count("openai_forward_cache_errors_total", op="put"), 1)

    def test_raising_store_is_a_miss(self) -> None:
        """A store whose calls raise (not fail their Deferred) makes misses
        too, counted, and storing fails quietly."""
        cache = self.cache(store=RaisingStore())
        body = {"model": "m", "caching": True}
        lookup = self.lookup(cache, body)
        self.assertEqual(lookup.result, MISS)
        self.answer(lookup, b"{}")
        self.assertEqual(self.count("openai_forward_cache_errors_total", op="get"), 1)
        self.assertEqual(self.count("openai_forward_cache_errors_total", op="put"), 1)

    def test_failure_logged_once_until_recovery(self) -> None:
        """A failing store is warned about once, not per request; when it
        works again that is said, and a new failure is warned about again."""
        store = BrokenStore()
        cache = self.cache(store=store)
        events: list[dict] = []
        cache.log = Logger(observer=events.append)
        body = {"model": "m", "caching": True}
        for _ in range(3):
            self.lookup(cache, body)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("disk on fire", formatEvent(warnings[0]))
        cache.store = MemoryStore(self.clock, 60, 1 << 20)
        self.lookup(cache, body)
        self.assertIn("works again", formatEvent(events[-1]))
        cache.store = store
        self.lookup(cache, body)
        self.assertEqual(len([e for e in events if e["log_level"] == LogLevel.warn]), 2)

    def test_hanging_store_times_out(self) -> None:
        """A store that never answers is a miss after CACHE_TIMEOUT."""
        cache = self.cache(store=BrokenStore(hang=True), timeout=2.0)
        d = cache.lookup(request({"model": "m", "caching": True}), ROUTE, CHAT, A)
        self.assertNoResult(d)
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(d).result, MISS)

    def test_damaged_entry_is_a_miss(self) -> None:
        """An entry that fails its checksum is a miss, counted as corrupt."""
        store = DamagingStore(self.clock, 3600, 1 << 20)
        cache = self.cache(store=store)
        body = {"model": "m", "caching": True}
        self.answer(self.lookup(cache, body), b'{"answer": 42}')
        store.damage = True
        self.assertEqual(self.lookup(cache, body).result, MISS)
        self.assertEqual(self.count("openai_forward_cache_errors_total", op="corrupt"), 1)

    def replayed(self, cache: ResponseCache, lookup: Lookup) -> tuple[DummyRequest, Deferred]:
        req = DummyRequest([b""])
        return req, cache.replay(req, lookup).done

    def test_replay_json(self) -> None:
        """A JSON hit is written whole with its content type, length, x-cache and age."""
        cache = self.cache()
        body = {"model": "m", "caching": True}
        self.answer(self.lookup(cache, body), b'{"id": "x"}')
        self.clock.advance(5)
        req, done = self.replayed(cache, self.lookup(cache, body))
        self.assertEqual(self.successResultOf(done), "complete")
        self.assertEqual(b"".join(req.written), b'{"id": "x"}')
        h = req.responseHeaders
        self.assertEqual(h.getRawHeaders(b"x-cache"), [b"hit"])
        self.assertEqual(h.getRawHeaders(b"content-length"), [b"11"])
        self.assertEqual(h.getRawHeaders(b"age"), [b"5"])
        self.assertEqual(req.finished, 1)

    def test_replay_stream_paced(self) -> None:
        """A stream is replayed as the same events, one per interval, byte
        for byte, ending with [DONE]."""
        cache = self.cache(replay_interval=0.5)
        body = {"model": "m", "stream": True, "caching": True}
        self.answer(self.lookup(cache, body), STREAM, ctype=b"text/event-stream")
        req, done = self.replayed(cache, self.lookup(cache, body))
        self.assertEqual(len(req.written), 1)
        self.assertNoResult(done)
        self.clock.advance(0.5)
        self.assertEqual(len(req.written), 2)
        self.clock.pump([0.5] * 3)
        self.assertEqual(self.successResultOf(done), "complete")
        self.assertEqual(req.written, sse_events(STREAM))
        self.assertEqual(b"".join(req.written), STREAM)
        self.assertTrue(req.written[-1].startswith(b"data: [DONE]"))
        self.assertIsNone(req.responseHeaders.getRawHeaders(b"content-length"))

    def test_replay_stream_client_leaves(self) -> None:
        """A client that leaves mid-replay stops it; nothing more is written."""
        cache = self.cache(replay_interval=1.0)
        body = {"model": "m", "stream": True, "caching": True}
        self.answer(self.lookup(cache, body), STREAM, ctype=b"text/event-stream")
        req, done = self.replayed(cache, self.lookup(cache, body))
        req.processingFailed(Failure(ConnectionDone("gone")))
        self.assertEqual(self.successResultOf(done), "client_left")
        self.clock.advance(10)
        self.assertEqual(len(req.written), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sse_events_keep_every_byte(self) -> None:
        """Splitting a stream into events loses and adds nothing."""
        for stream in (STREAM, b"data: a\r\rdata: b\n\n", b"data: unfinished"):
            self.assertEqual(b"".join(sse_events(stream)), stream)
        self.assertEqual(len(sse_events(STREAM)), 4)
