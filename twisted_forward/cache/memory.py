"""
The in-memory store: least recently used first out, bounded by bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from .interfaces import ICacheStore
from .metrics import CacheMetrics

#: Bytes counted per entry on top of its key and value (dict slot, objects).
OVERHEAD = 200


@implementer(ICacheStore)
class MemoryStore:
    """Entries in this process's memory, for ``ttl`` seconds, within
    ``max_bytes`` (keys, values and a fixed overhead each); the least
    recently used go first.

    :param clock: for expiry (the reactor; a ``Clock`` in tests).
    """

    name = "memory"

    def __init__(
        self, clock: IReactorTime, ttl: float, max_bytes: int,
        metrics: Optional[CacheMetrics] = None,
    ) -> None:
        self.clock = clock
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.bytes = 0
        self._entries: "OrderedDict[bytes, tuple[float, bytes]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _cost(key: bytes, value: bytes) -> int:
        return len(key) + len(value) + OVERHEAD

    def _drop(self, key: bytes) -> None:
        _, value = self._entries.pop(key)
        self.bytes -= self._cost(key, value)

    def get(self, key: bytes) -> "Deferred[Optional[bytes]]":
        """The value, if stored and not expired; it becomes the most recent."""
        item = self._entries.get(key)
        if item is None:
            return succeed(None)
        expires, value = item
        if self.clock.seconds() >= expires:
            self._drop(key)
            self._report()
            return succeed(None)
        self._entries.move_to_end(key)
        return succeed(value)

    def put(self, key: bytes, value: bytes) -> "Deferred[None]":
        """Store ``value``; the least recently used go until it fits."""
        cost = self._cost(key, value)
        if key in self._entries:
            self._drop(key)
        if cost > self.max_bytes:
            self._report()
            return succeed(None)
        now = self.clock.seconds()
        evicted = 0
        while self.bytes + cost > self.max_bytes and self._entries:
            oldest = next(iter(self._entries))
            if self._entries[oldest][0] > now:
                evicted += 1
            self._drop(oldest)
        self._entries[key] = (now + self.ttl, value)
        self.bytes += cost
        if self.metrics is not None:
            self.metrics.evicted(evicted)
        self._report()
        return succeed(None)

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.size.set(self.bytes)

    def close(self) -> "Deferred[None]":
        """Forget everything."""
        self._entries.clear()
        self.bytes = 0
        self._report()
        return succeed(None)
