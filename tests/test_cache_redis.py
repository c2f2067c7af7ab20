"""
The Redis store against a real redis-server on a unix socket in the test's
temporary directory: shared by two stores (two instances), bounded, and a
dead server is a failure the cache turns into a miss.
"""

from __future__ import annotations

import io

from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from twisted_forward.cache.entry import Entry
from twisted_forward.cache.hook import MISS, ResponseCache
from twisted_forward.cache.interfaces import ICacheStore
from twisted_forward.cache.key import Partitions
from twisted_forward.cache.metrics import CacheMetrics
from twisted_forward.cache.redis_store import RedisStore
from twisted_forward.cache.settings import CacheSettings
from twisted_forward.config import Route
from twisted_forward.config import parse_url as parse_upstream
from twisted_forward.keys import DEFAULT_KEY, KeyDecision
from twisted_forward.redis_link import parse_redis_url

from .redis_server import start_redis


class _Request:
    method = b"POST"

    def __init__(self, body: bytes) -> None:
        self.content = io.BytesIO(body)


class RedisStoreTests(TestCase):
    """RedisStore with a real server."""

    timeout = 20

    @defer.inlineCallbacks
    def setUp(self) -> None:
        self.server = yield start_redis(self)
        self.metrics = CacheMetrics(CollectorRegistry())

    def store(self, max_bytes: int = 1024 * 1024, ttl: float = 3600) -> RedisStore:
        store = RedisStore(reactor, parse_redis_url(self.server.url), ttl, max_bytes, 2.0, self.metrics)
        self.addCleanup(store.close)
        return store

    def test_interface(self) -> None:
        """RedisStore provides ICacheStore."""
        verifyObject(ICacheStore, self.store())

    @defer.inlineCallbacks
    def test_shared_by_two_instances(self) -> None:
        """What one instance's store puts, another instance's store gets."""
        one, two = self.store(), self.store()
        value = Entry(1.0, 2.0, b"application/json", False, b'{"x": "\\u00e9"}').encode() + b"\xff\x00"
        yield one.put(b"k", value)
        self.assertEqual((yield two.get(b"k")), value)
        self.assertIsNone((yield two.get(b"other")))

    @defer.inlineCallbacks
    def test_size_bound(self) -> None:
        """Past the byte bound the oldest entries go, counted as evictions."""
        store = self.store(max_bytes=10_000)
        for i in range(5):
            yield store.put(b"k%d" % i, b"x" * 3000)
        self.assertIsNone((yield store.get(b"k0")))
        self.assertIsNone((yield store.get(b"k1")))
        self.assertIsNotNone((yield store.get(b"k4")))
        self.assertEqual(
            self.metrics.registry.get_sample_value("openai_forward_cache_evictions_total"), 2
        )

    @defer.inlineCallbacks
    def test_ttl_is_redis_expiry(self) -> None:
        """Entries carry the TTL as a Redis expiry."""
        store = self.store(ttl=100)
        yield store.put(b"k", b"v")
        ttl = yield store.client().execute_command("PTTL", b"twisted-forward:cache:k")
        self.assertTrue(0 < ttl <= 100_000, ttl)

    @defer.inlineCallbacks
    def test_dead_server_is_a_miss(self) -> None:
        """With the server gone, a lookup is a miss within the timeout, and
        the failure is counted."""
        store = self.store()
        yield store.put(b"warm", b"v")  # connected
        yield self.server.kill()
        settings = CacheSettings(openai=True, timeout=0.5, default_caching=True)
        cache = ResponseCache(settings, store, Partitions((), False), reactor, self.metrics)
        route = Route("", parse_upstream("http://upstream.invalid"), "openai")
        lookup = yield cache.lookup(
            _Request(b'{"model": "m", "messages": []}'), route, b"/v1/chat/completions",
            KeyDecision(DEFAULT_KEY, substituted=True),
        )
        self.assertEqual(lookup.result, MISS)
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "openai_forward_cache_errors_total", {"op": "get"}
            ),
            1,
        )
