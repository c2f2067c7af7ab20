"""
The cache stores: memory (TTL and LRU by bytes on a fake clock), LMDB (real
files: restart, bound, damaged or unwritable database) and the entry format.
"""

from __future__ import annotations

import gzip
import os

from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from twisted_forward.cache.entry import AnswerCollector, CorruptEntry, Entry
from twisted_forward.cache.interfaces import ICacheStore
from twisted_forward.cache.lmdb_store import LMDBStore
from twisted_forward.cache.memory import OVERHEAD, MemoryStore
from twisted_forward.cache.metrics import CacheMetrics


def sample(metrics: CacheMetrics, name: str) -> float:
    """A series' value from the metrics' registry (0 when absent)."""
    return metrics.registry.get_sample_value(name) or 0.0


class MemoryStoreTests(SynchronousTestCase):
    """The in-memory store on a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = CacheMetrics(CollectorRegistry())

    def get(self, store: MemoryStore, key: bytes) -> object:
        return self.successResultOf(store.get(key))

    def test_interface(self) -> None:
        """MemoryStore provides ICacheStore."""
        verifyObject(ICacheStore, MemoryStore(self.clock, 10, 1000))

    def test_ttl(self) -> None:
        """An entry is served until its TTL ends, and not after."""
        store = MemoryStore(self.clock, 60, 10_000, self.metrics)
        store.put(b"k", b"v")
        self.clock.advance(59.9)
        self.assertEqual(self.get(store, b"k"), b"v")
        self.clock.advance(0.1)
        self.assertIsNone(self.get(store, b"k"))
        self.assertEqual(store.bytes, 0)

    def test_lru_by_bytes(self) -> None:
        """Past the byte bound the least recently used entry goes, and the
        eviction is counted."""
        size = 1 + 100 + OVERHEAD
        store = MemoryStore(self.clock, 60, 2 * size, self.metrics)
        store.put(b"a", b"x" * 100)
        store.put(b"b", b"y" * 100)
        self.get(store, b"a")  # a is now the most recent
        store.put(b"c", b"z" * 100)
        self.assertIsNone(self.get(store, b"b"))
        self.assertEqual(self.get(store, b"a"), b"x" * 100)
        self.assertEqual(self.get(store, b"c"), b"z" * 100)
        self.assertEqual(store.bytes, 2 * size)
        self.assertEqual(sample(self.metrics, "openai_forward_cache_evictions_total"), 1)
        self.assertEqual(sample(self.metrics, "openai_forward_cache_size_bytes"), 2 * size)

    def test_too_large_is_not_stored(self) -> None:
        """An entry larger than the whole bound is not stored and evicts nothing."""
        store = MemoryStore(self.clock, 60, 500, self.metrics)
        store.put(b"a", b"x")
        store.put(b"big", b"x" * 1000)
        self.assertIsNone(self.get(store, b"big"))
        self.assertEqual(self.get(store, b"a"), b"x")


class EntryTests(SynchronousTestCase):
    """The stored form of an answer."""

    def test_round_trip(self) -> None:
        """An entry reads back as it was written."""
        entry = Entry(100.0, 200.0, b"text/event-stream", True, b"data: x\n\n")
        self.assertEqual(Entry.decode(entry.encode()), entry)

    def test_damage_is_detected(self) -> None:
        """A changed byte, a truncation or foreign bytes raise CorruptEntry."""
        data = Entry(1.0, 2.0, b"application/json", False, b'{"a": 1}').encode()
        damaged = data[:-2] + b"X" + data[-1:]
        for bad in (damaged, data[:10], b"garbage", b""):
            self.assertRaises(CorruptEntry, Entry.decode, bad)


class CollectorTests(SynchronousTestCase):
    """What a missed answer must be to be stored."""

    def headers(self, ctype: bytes, encoding: bytes = b"") -> Headers:
        h = Headers({b"content-type": [ctype]})
        if encoding:
            h.setRawHeaders(b"content-encoding", [encoding])
        return h

    def test_whole_stream_is_stored_decoded(self) -> None:
        """A gzip-coded event stream that reached [DONE] is stored decoded."""
        stream = b'data: {"a":1}\n\ndata: [DONE]\n\n'
        coded = gzip.compress(stream)
        c = AnswerCollector(1000)
        c.response(200, self.headers(b"text/event-stream", b"gzip"))
        c.data(coded[:5])
        c.data(coded[5:])
        entry = c.entry("complete", 10.0, 5.0)
        assert entry is not None
        self.assertEqual(entry.body, stream)
        self.assertTrue(entry.stream)
        self.assertEqual(entry.expires_at, 15.0)

    def test_not_stored(self) -> None:
        """A stream cut before [DONE], a non-200, an answer over the bound
        or an exchange that did not complete is not stored."""
        cut = AnswerCollector(1000)
        cut.response(200, self.headers(b"text/event-stream"))
        cut.data(b"data: {}\n\n")
        self.assertIsNone(cut.entry("complete", 0, 1))
        self.assertEqual(cut.refused, "incomplete")
        error = AnswerCollector(1000)
        error.response(500, self.headers(b"application/json"))
        self.assertIsNone(error.entry("complete", 0, 1))
        self.assertEqual(error.refused, "status")
        big = AnswerCollector(10)
        big.response(200, self.headers(b"application/json"))
        big.data(b"x" * 11)
        self.assertIsNone(big.entry("complete", 0, 1))
        self.assertEqual(big.refused, "too_large")
        left = AnswerCollector(1000)
        left.response(200, self.headers(b"application/json"))
        left.data(b"{}")
        self.assertIsNone(left.entry("client_left", 0, 1))


class LMDBStoreTests(TestCase):
    """The LMDB store on real files, its work in threads."""

    def setUp(self) -> None:
        self.metrics = CacheMetrics(CollectorRegistry())
        self.path = os.path.join(self.mktemp(), "CACHE_DB")

    def open(self, max_bytes: int = 10 * 1024 * 1024, path: str = "") -> LMDBStore:
        store = LMDBStore(reactor, path or self.path, max_bytes, self.metrics)
        self.addCleanup(store.close)
        return store

    def entry(self, body: bytes, stored: float = 0.0, ttl: float = 1e9) -> bytes:
        now = stored or reactor.seconds()
        return Entry(now, now + ttl, b"application/json", False, body).encode()

    def test_interface(self) -> None:
        """LMDBStore provides ICacheStore."""
        verifyObject(ICacheStore, self.open())

    @defer.inlineCallbacks
    def test_survives_restart(self) -> None:
        """What one store wrote, a new store on the same directory reads
        (the process restarted)."""
        first = self.open()
        value = self.entry(b'{"answer": 1}')
        yield first.put(b"k", value)
        yield first.close()
        second = self.open()
        self.assertEqual((yield second.get(b"k")), value)

    @defer.inlineCallbacks
    def test_expired_is_a_miss(self) -> None:
        """An entry past its expiry is not returned."""
        store = self.open()
        yield store.put(b"old", self.entry(b"{}", stored=reactor.seconds() - 100, ttl=10))
        self.assertIsNone((yield store.get(b"old")))

    @defer.inlineCallbacks
    def test_size_bound(self) -> None:
        """Filling past the map size evicts the oldest entries instead of
        failing, and counts them; the newest stay."""
        store = self.open(max_bytes=1024 * 1024)
        now = reactor.seconds()
        for i in range(40):
            yield store.put(b"k%03d" % i, self.entry(b"x" * 50_000, stored=now + i))
        self.assertIsNotNone((yield store.get(b"k039")))
        self.assertIsNone((yield store.get(b"k000")))
        self.assertGreater(sample(self.metrics, "openai_forward_cache_evictions_total"), 0)

    @defer.inlineCallbacks
    def test_damaged_database_fails_each_call(self) -> None:
        """A database file that is not LMDB fails the calls (the cache makes
        them misses); the store does not raise in the reactor."""
        os.makedirs(self.path)
        with open(os.path.join(self.path, "data.mdb"), "wb") as f:
            f.write(b"this is not an lmdb file" * 1000)
        store = self.open()
        yield self.assertFailure(store.get(b"k"), Exception)
        yield self.assertFailure(store.put(b"k", b"v"), Exception)

    @defer.inlineCallbacks
    def test_unwritable_location_fails_each_call(self) -> None:
        """A directory that cannot be created (a file is in the way) fails
        the calls."""
        blocker = self.mktemp()
        with open(blocker, "w") as f:
            f.write("in the way")
        store = self.open(path=os.path.join(blocker, "CACHE_DB"))
        yield self.assertFailure(store.get(b"k"), Exception)
