"""
The exchange's side of the cache: :class:`ResponseCache`.

For each request on a route where the cache is on, the exchange calls
:meth:`ResponseCache.lookup` before forwarding.  The answer is a
:class:`Lookup`:

- ``hit``: :meth:`ResponseCache.replay` answers from the entry; nothing
  goes upstream and no default key is spent.
- ``miss``: forward (with :attr:`Lookup.body` when the ``caching`` field was
  taken out) and feed :attr:`Lookup.tap`; a whole 200 is stored.
- ``bypass``: forward, not stored (not asked for, not cacheable, too large).

A store that fails or does not answer within CACHE_TIMEOUT makes a miss (or
an answer not stored), counted in ``openai_forward_cache_errors`` and
logged once until it works again: the cache never fails a request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from zope.interface import implementer

from ..chat.recorder import IExchangeTap
from ..config import ForwardKey, Route
from ..keys import KeyDecision
from ..policies.usage import UsageStripper
from .entry import AnswerCollector, CorruptEntry, Entry
from .interfaces import ICacheStore, IExchangeCache
from .key import Partitions, cache_key, examine, read_prefix
from .metrics import CacheMetrics
from .replay import Replay
from .settings import CacheSettings

HIT = "hit"
MISS = "miss"
BYPASS = "bypass"


@dataclass
class Lookup:
    """What the cache made of one request.

    :ivar result: ``hit``, ``miss`` or ``bypass`` (the ``x-cache`` value).
    :ivar body: the body to forward instead of the client's, or None.
    :ivar entry: the cached answer, on a hit.
    :ivar tap: on a miss, feed it the answer to have it stored.
    :ivar reason: why a bypass (for logs and tests).
    :ivar strip_usage: the request did not ask for a stream's usage chunk
        (``stream_options`` is not in the key): a replay leaves it out.
    """

    result: str
    body: Optional[bytes] = field(default=None, repr=False)
    entry: Optional[Entry] = field(default=None, repr=False)
    tap: Optional["StoringTap"] = field(default=None, repr=False)
    reason: str = ""
    strip_usage: bool = False

    @property
    def hit(self) -> bool:
        """Whether the answer comes from the cache (no upstream tokens)."""
        return self.result == HIT


@implementer(IExchangeTap)
class StoringTap:
    """Collects one missed answer and stores it if it ended whole with 200."""

    def __init__(self, cache: "ResponseCache", key: bytes) -> None:
        self.cache = cache
        self.key = key
        self.collector = AnswerCollector(cache.settings.max_entry_bytes)
        self.ended = False

    def response(self, status: int, headers: Headers) -> None:
        """The answer's head."""
        self.collector.response(status, headers)

    def data(self, chunk: bytes) -> None:
        """A body chunk as relayed."""
        self.collector.data(chunk)

    def end(self, outcome: str) -> None:
        """Store the answer if it can be; never raises."""
        if self.ended:
            return
        self.ended = True
        try:
            cache = self.cache
            entry = self.collector.entry(outcome, cache.clock.seconds(), cache.settings.ttl)
            if entry is None:
                cache.metrics.not_stored.labels(self.collector.refused or "other").inc()
                return
            cache.store_entry(self.key, entry)
        except Exception:
            self.cache.log.failure("cache: storing an answer failed")


@implementer(IExchangeCache)
class ResponseCache:
    """Looks requests up, replays hits and stores misses.

    :param settings: the cache's settings.
    :param store: the backend.
    :param partitions: names each credential's partition.
    :param clock: the reactor (time, timeouts, replay pace).
    """

    log = Logger()

    def __init__(
        self, settings: CacheSettings, store: ICacheStore, partitions: Partitions,
        clock: IReactorTime, metrics: CacheMetrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.partitions = partitions
        self.clock = clock
        self.metrics = metrics
        self._routes = frozenset(r.encode("ascii") for r in settings.routes)
        self._failing: set[str] = set()
        #: Store writes not finished yet (cancelled at close).
        self._writing: set[Deferred[None]] = set()

    def on(self, route: Route) -> bool:
        """Whether requests on ``route`` go through the cache at all."""
        return self.settings.on(route.kind)

    # ------------------------------------------------------------ lookup

    def lookup(
        self, request: IRequest, route: Route, target: bytes, decision: KeyDecision
    ) -> "Deferred[Lookup]":
        """Examine a request and look its answer up; never fails."""
        label = route.prefix or "/"
        path = target.split(b"?", 1)[0]
        if request.method != b"POST" or path not in self._routes:
            return succeed(self._counted(label, Lookup(BYPASS, reason="route")))
        settings = self.settings
        examined = examine(
            read_prefix(request.content, settings.max_request_body),
            settings.default_caching, settings.nondeterministic,
        )
        if not examined.cacheable or examined.canonical is None:
            return succeed(self._counted(
                label, Lookup(BYPASS, body=examined.body, reason=examined.reason)
            ))
        key = cache_key(
            self.partitions.of(decision), f"{route.prefix}|{route.base}", target,
            examined.canonical,
        )
        try:
            d = self.store.get(key)
        except Exception:
            d = fail()  # the exception being handled
        d.addTimeout(settings.timeout, self.clock)
        looked: Deferred[Lookup] = d.addCallbacks(
            self._found, self._get_failed,
            callbackArgs=(key, examined.body, not examined.wants_usage),
            errbackArgs=(key, examined.body),
        )
        return looked.addCallback(lambda lookup: self._counted(label, lookup))

    def _found(
        self, value: Optional[bytes], key: bytes, body: Optional[bytes], strip_usage: bool
    ) -> Lookup:
        self._recovered("get")
        if value is not None:
            try:
                entry = Entry.decode(value)
            except CorruptEntry:
                self.metrics.errors.labels("corrupt").inc()
                self._warn_once("corrupt", "cache: a stored entry is damaged; treated as a miss")
                entry = None
            if entry is not None and entry.fresh(self.clock.seconds()):
                return Lookup(HIT, body=body, entry=entry, strip_usage=strip_usage)
        return Lookup(MISS, body=body, tap=StoringTap(self, key))

    def _get_failed(self, failure: Failure, key: bytes, body: Optional[bytes]) -> Lookup:
        self.metrics.errors.labels("get").inc()
        self._warn_once(
            "get", "cache: the {store} store failed a lookup ({why}); serving misses",
            store=self.store.name, why=failure.getErrorMessage() or failure.type.__name__,
        )
        return Lookup(MISS, body=body, tap=StoringTap(self, key))

    def _counted(self, route: str, lookup: Lookup) -> Lookup:
        self.metrics.lookups.labels(route, lookup.result).inc()
        return lookup

    # ------------------------------------------------------------ store

    def store_entry(self, key: bytes, entry: Entry) -> "Deferred[None]":
        """Put ``entry`` in the store; failures are counted, not raised."""
        value = entry.encode()
        try:
            d = self.store.put(key, value)
        except Exception:
            d = fail()  # the exception being handled
        d.addTimeout(self.settings.timeout, self.clock)

        def stored(_: object) -> None:
            self._recovered("put")
            self.metrics.bytes.labels("stored").inc(len(entry.body))

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError):
                return  # given up at shutdown (close)
            self.metrics.errors.labels("put").inc()
            self._warn_once(
                "put", "cache: the {store} store failed to store an answer ({why})",
                store=self.store.name, why=failure.getErrorMessage() or failure.type.__name__,
            )

        d.addCallbacks(stored, failed)
        if not d.called:
            self._writing.add(d)
            d.addBoth(lambda _: self._writing.discard(d))
        return d

    def close(self) -> "Deferred[None]":
        """Give up unfinished writes and close the store (at shutdown, after
        the last exchange)."""
        for d in list(self._writing):
            d.cancel()
        return self.store.close()

    # ------------------------------------------------------------ replay

    def replay(
        self, request: Request, lookup: Lookup, tap: Optional[IExchangeTap] = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> Replay:
        """Answer ``request`` from ``lookup``'s entry; the replay's ``done``
        fires with the outcome, and its ``sent`` counts the bytes written."""
        entry = lookup.entry
        assert entry is not None
        if lookup.strip_usage and entry.stream and b'"usage"' in entry.body:
            stripper = UsageStripper()
            entry = replace(entry, body=stripper.feed(entry.body) + stripper.flush())
        replay = Replay(
            request, entry, self.clock, self.settings.replay_interval, tap, headers
        )
        self.metrics.bytes.labels("served").inc(len(entry.body))
        replay.start()
        return replay

    # ------------------------------------------------------------ logging

    def _warn_once(self, kind: str, format: str, **fields: Any) -> None:
        if kind in self._failing:
            return
        self._failing.add(kind)
        self.log.warn(format, **fields)

    def _recovered(self, kind: str) -> None:
        if kind in self._failing:
            self._failing.discard(kind)
            self.log.info("cache: the {store} store works again", store=self.store.name)


def open_store(
    settings: CacheSettings, reactor: Any, metrics: CacheMetrics,
    ca_file: Optional[str] = None,
) -> ICacheStore:
    """The backend ``settings`` name (nothing is opened or connected yet).

    :param ca_file: CAs for a ``rediss://`` server (SSL_CERT_FILE), else the
        system's.
    """
    if settings.backend == "lmdb":
        from .lmdb_store import DIRECTORY, LMDBStore

        return LMDBStore(
            reactor, os.path.join(settings.root, DIRECTORY), settings.max_bytes, metrics
        )
    if settings.backend == "redis":
        from ..redis_link import parse_redis_url
        from .redis_store import RedisStore

        assert settings.redis_url is not None
        return RedisStore(
            reactor, parse_redis_url(settings.redis_url), settings.ttl, settings.max_bytes,
            settings.timeout, metrics, ca_file,
        )
    from .memory import MemoryStore

    return MemoryStore(reactor, settings.ttl, settings.max_bytes, metrics)


def build_cache(
    settings: CacheSettings, forward_keys: Sequence[ForwardKey], reactor: Any,
    metrics: CacheMetrics, store: Optional[ICacheStore] = None,
    ca_file: Optional[str] = None,
) -> Optional[ResponseCache]:
    """The response cache for these settings, or None when it is off."""
    if not settings.enabled:
        return None
    if store is None:
        store = open_store(settings, reactor, metrics, ca_file)
    return ResponseCache(
        settings, store, Partitions(forward_keys, settings.shared), reactor, metrics
    )
