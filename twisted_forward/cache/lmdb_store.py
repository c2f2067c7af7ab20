"""
The LMDB store: answers on disk, shared by the processes of one machine
(``--workers N``), kept across restarts.

Every LMDB call runs, in order, in the store's own thread, so the reactor
never waits on the disk.  The size bound is the LMDB map size: when the
pages in use pass 90% of it, the expired entries and then the oldest go
until 70% is in use (oldest stored first, not least recently used: a read
in LMDB writes nothing).  Expiry is checked on read from the entry's own
head.  A database that cannot be opened (damaged, unwritable) fails each
operation, and is tried again at most every :data:`REOPEN_AFTER` seconds.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Optional, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .entry import CorruptEntry, expires_at, stored_at
from .interfaces import ICacheStore
from .metrics import CacheMetrics

#: The directory under CACHE_ROOT_PATH_OR_URL (openai-forward's name for it).
DIRECTORY = "CACHE_DB"
#: Seconds between attempts to open a database that failed to open.
REOPEN_AFTER = 30.0
#: Eviction starts above this share of the map, and stops below the next.
HIGH_WATER = 0.9
LOW_WATER = 0.7

T = TypeVar("T")


class StoreUnavailable(Exception):
    """The database could not be opened recently; not tried again yet."""


@implementer(ICacheStore)
class LMDBStore:
    """Entries in an LMDB environment at ``path`` (a directory).

    :param reactor: runs the thread pool's results back in the reactor,
        and tells the time (expiry).
    :param max_bytes: the map size: the database file never grows past it.
    """

    name = "lmdb"

    def __init__(
        self, reactor: Any, path: str, max_bytes: int,
        metrics: Optional[CacheMetrics] = None,
    ) -> None:
        self.reactor: IReactorThreads = reactor
        self.clock: IReactorTime = reactor
        self.path = path
        self.max_bytes = max_bytes
        self.metrics = metrics
        # One thread: operations run in order, so closing never races a
        # write (LMDB serialises writers anyway; reads are short).
        self.pool = ThreadPool(minthreads=0, maxthreads=1, name="cache-lmdb")
        self._env: Any = None
        self._failed_at: Optional[float] = None
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------ reactor side

    def _run(self, work: Callable[..., T], *args: Any) -> "Deferred[Optional[T]]":
        """``work(*args)`` in the store's thread; None once it is closed."""
        if self._closed:
            return succeed(None)
        if not self.pool.started:
            self.pool.start()
        return deferToThreadPool(self.reactor, self.pool, work, *args)

    def get(self, key: bytes) -> "Deferred[Optional[bytes]]":
        """The value under ``key`` if it has not expired."""
        return self._run(self._get, key, self.clock.seconds())

    def put(self, key: bytes, value: bytes) -> "Deferred[None]":
        """Store ``value``; evicts first when the map is nearly full."""
        d = self._run(self._put, key, value, self.clock.seconds())
        return d.addCallback(self._evicted)

    def _evicted(self, count: Optional[int]) -> None:
        if count and self.metrics is not None:
            self.metrics.evicted(count)

    def close(self) -> "Deferred[None]":
        """Let running operations end, then close the database."""
        if self._closed:
            return succeed(None)
        self._closed = True
        if self.pool.started:
            d = deferToThreadPool(self.reactor, self.pool, self._close)
            d.addBoth(lambda _: self.pool.stop())
            return d
        self._close()
        return succeed(None)

    # ------------------------------------------------------------ pool side

    def _open(self, now: float) -> Any:
        with self._lock:
            if self._env is not None:
                return self._env
            if self._failed_at is not None and now - self._failed_at < REOPEN_AFTER:
                raise StoreUnavailable(f"the LMDB cache at {self.path} could not be opened")
            import lmdb

            try:
                os.makedirs(self.path, exist_ok=True)
                self._env = lmdb.open(
                    self.path, map_size=self.max_bytes, subdir=True,
                    metasync=False, readahead=False, max_dbs=0, lock=True,
                )
            except Exception:
                self._failed_at = now
                raise
            self._failed_at = None
            return self._env

    def _close(self) -> None:
        with self._lock:
            env, self._env = self._env, None
        if env is not None:
            env.sync(True)
            env.close()

    def _get(self, key: bytes, now: float) -> Optional[bytes]:
        env = self._open(now)
        with env.begin(buffers=True) as txn:
            value = txn.get(key)
            if value is None:
                return None
            try:
                if expires_at(value) <= now:
                    return None
            except CorruptEntry:
                pass  # handed up: the caller counts it and treats it as a miss
            return bytes(value)

    def _used(self, env: Any) -> int:
        stat = env.stat()
        return (stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]) * stat["psize"]

    def _put(self, key: bytes, value: bytes, now: float) -> int:
        import lmdb

        env = self._open(now)
        evicted = 0
        if self._used(env) + len(value) + len(key) > HIGH_WATER * self.max_bytes:
            evicted += self._evict(env, now, int(LOW_WATER * self.max_bytes) - len(value))
        try:
            with env.begin(write=True) as txn:
                txn.put(key, value)
        except lmdb.MapFullError:
            evicted += self._evict(env, now, 0)
            with env.begin(write=True) as txn:
                txn.put(key, value)
        return evicted

    def _evict(self, env: Any, now: float, target: int) -> int:
        """Delete expired entries, then the oldest until about ``target``
        bytes are in use (``target`` 0: the map was full, so at least half
        the entries go); returns how many live entries went."""
        live: list[tuple[float, bytes, int]] = []
        gone: list[bytes] = []
        dead_bytes = 0
        with env.begin(buffers=True) as txn:
            for key, value in txn.cursor():
                size = len(key) + len(value)
                try:
                    dead = expires_at(value) <= now
                    stored = stored_at(value)
                except CorruptEntry:
                    dead, stored = True, 0.0
                if dead:
                    gone.append(bytes(key))
                    dead_bytes += size
                else:
                    live.append((stored, bytes(key), size))
        live.sort()  # oldest first
        used = self._used(env)
        total = dead_bytes + sum(size for _, _, size in live)
        # Pages hold more than the entries' bytes: scale entry sizes to pages.
        ratio = used / total if total else 1.0
        estimate = used - dead_bytes * ratio
        evicted = 0
        for _, key, size in live:
            if target > 0 and estimate <= target:
                break
            if target <= 0 and evicted >= max(1, len(live) // 2):
                break
            gone.append(key)
            estimate -= size * ratio
            evicted += 1
        if gone:
            with env.begin(write=True) as txn:
                for key in gone:
                    txn.delete(key)
        return evicted
