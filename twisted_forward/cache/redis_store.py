"""
The Redis store: one cache shared by several proxy instances.

Talks to Redis (or Valkey) through the connection the policies use too
(:mod:`twisted_forward.redis_link`: txredisapi, Twisted-native), with
replies kept as bytes.
Entries are Redis strings with a TTL (``SET … PX``); the size bound is kept
by a Lua script that, in the same atomic step as the write, records the
entry in a time-ordered index and drops expired entries and then the oldest
until the stored bytes are within the bound.  Scripts name the entries
they evict, so the store wants a plain Redis, not a Redis Cluster.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from ..redis_link import RedisTarget, connect
from .interfaces import ICacheStore
from .metrics import CacheMetrics

#: Every key this store writes starts with this.
PREFIX = b"twisted-forward:cache:"

_PUT = b"""
local key, index, sizes, total_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local value = ARGV[1]
local now = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local max = tonumber(ARGV[4])
local size = string.len(value) + string.len(key)
local old = redis.call('HGET', sizes, key)
if old then redis.call('DECRBY', total_key, old) end
redis.call('SET', key, value, 'PX', ttl)
redis.call('ZADD', index, now, key)
redis.call('HSET', sizes, key, size)
local total = redis.call('INCRBY', total_key, size)
local evicted = 0
while true do
  local oldest = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
  if #oldest == 0 then break end
  local name = oldest[1]
  local expired = tonumber(oldest[2]) + ttl <= now
  if not expired and (total <= max or name == key) then break end
  local was = tonumber(redis.call('HGET', sizes, name) or '0')
  local existed = redis.call('DEL', name)
  redis.call('ZREM', index, name)
  redis.call('HDEL', sizes, name)
  total = redis.call('DECRBY', total_key, was)
  if existed == 1 and not expired then evicted = evicted + 1 end
end
return evicted
"""


@implementer(ICacheStore)
class RedisStore:
    """Entries in Redis, for ``ttl`` seconds, within ``max_bytes``.

    The connection is made on first use (after twistd has forked) and kept;
    txredisapi reconnects by itself.  Calls are bounded by ``timeout``.
    """

    name = "redis"

    def __init__(
        self, clock: IReactorTime, target: RedisTarget, ttl: float, max_bytes: int,
        timeout: float, metrics: Optional[CacheMetrics] = None,
        ca_file: Optional[str] = None,
    ) -> None:
        self.clock = clock
        self.target = target
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.metrics = metrics
        self.ca_file = ca_file
        self._connection: Any = None

    def client(self) -> Any:
        """The txredisapi connection pool, made on first use."""
        if self._connection is None:
            self._connection = connect(
                self.target, self.timeout, poolsize=4, ca_file=self.ca_file, binary=True
            )
        return self._connection

    def get(self, key: bytes) -> "Deferred[Optional[bytes]]":
        """The value under ``key`` (Redis drops it at its TTL)."""
        return self.client().get(PREFIX + key)

    def put(self, key: bytes, value: bytes) -> "Deferred[None]":
        """Store ``value`` and keep the bound, in one atomic script."""
        d = self.client().eval(
            _PUT,
            [PREFIX + key, PREFIX + b"index", PREFIX + b"sizes", PREFIX + b"bytes"],
            [value, int(self.clock.seconds() * 1000), max(1, int(self.ttl * 1000)),
             self.max_bytes],
        )
        return d.addCallback(self._evicted)

    def _evicted(self, count: Any) -> None:
        if self.metrics is not None and isinstance(count, int):
            self.metrics.evicted(count)

    def close(self) -> "Deferred[None]":
        """Close the connections."""
        connection, self._connection = self._connection, None
        if connection is None:
            return succeed(None)
        return connection.disconnect()
