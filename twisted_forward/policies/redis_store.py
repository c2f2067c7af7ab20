"""
The Redis policy store: counters shared by several proxy instances.

Every reservation is one ``EVALSHA`` (:data:`~.redis_lua.RESERVE`) that
checks and charges all of a request's buckets atomically on the server, so
instances sharing one Redis (or Valkey) enforce a limit exactly; settling is
one more (:data:`~.redis_lua.ADJUST`).  Time comes from the instance's clock,
as the fixed windows do (:mod:`.windows`): keep the machines' clocks in step
(NTP), as any distributed limiter needs.

Slots (``max_parallel``) are leases: this store holds them for at most
:data:`LEASE` seconds and renews the ones still in use every
:data:`RENEW_EVERY` seconds, so the slots of an instance that died free
themselves within a minute.  On shutdown the store gives back every
reservation still open (:meth:`RedisStore.close`): nothing leaks into the
next window.

Default keys' health lives in one hash (by :func:`~.store.key_id`, never the
key) with a version counter; each instance polls the version every
:data:`HEALTH_POLL` seconds and reads the hash only when it changed.

Every call is bounded by ``timeout``; a call that fails or times out errs
with :class:`~.store.StoreUnavailable`, and the caller applies
``LIMITS_ON_STORE_FAILURE``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import redis_lua
from .store import (
    CONCURRENT,
    FIXED,
    Bucket,
    BucketState,
    IKeyHealth,
    IPolicyStore,
    IStoreInfo,
    Mark,
    Settlement,
    StoreUnavailable,
    Verdict,
)

#: Every key this store writes starts with this.
PREFIX = "twisted-forward:policy:"
#: Longest a slot is held without renewal, in seconds.
LEASE = 60.0
#: How often held slots are renewed, in seconds.
RENEW_EVERY = 20.0
#: How often the default keys' health is polled, in seconds.
HEALTH_POLL = 1.0
#: How long a health record lives after its last change, in seconds.
HEALTH_TTL = 86400.0

_KIND = {FIXED: "f", "moving": "m", CONCURRENT: "c"}


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def _bucket_key(bucket: Bucket) -> str:
    return f"{PREFIX}{_KIND[bucket.kind]}:{bucket.id}"


@implementer(IPolicyStore, IKeyHealth, IStoreInfo)
class RedisStore:
    """Policy counters and key health in Redis.

    :param connect: makes the txredisapi connection (pool), e.g.
        :func:`twisted_forward.redis_link.connect`; called on first use, so
        no connection is made before twistd forks into a daemon.
    :param clock: for timeouts, renewals and polls.
    :param timeout: seconds any one call may take.
    """

    name = "redis"
    log = Logger()

    def __init__(self, connect: Callable[[], Any], clock: IReactorTime, timeout: float) -> None:
        self._connect = connect
        self._client: Any = None
        self.clock = clock
        self.timeout = timeout
        #: Granted reservations not settled yet: name -> its buckets.
        self.open: dict[str, tuple[Bucket, ...]] = {}
        #: Fire when the settlements on their way are done (close waits).
        self._settling: set[Deferred[None]] = set()
        self._watchers: list[Callable[[str, Mark], None]] = []
        self._health_version = ""
        self._health: dict[str, Mark] = {}
        self._renewer = LoopingCall(self._renew)
        self._renewer.clock = clock
        self._poller = LoopingCall(self._poll_health)
        #: The loops' calls in flight, cancelled at close (a poll waiting on
        #: an unreachable Redis would otherwise outlive the store).
        self._loop_calls: set["Deferred[Any]"] = set()
        self._poller.clock = clock
        self._closed = False

    def start(self) -> None:
        """Connect now, not on the first request."""
        self.client  # noqa: B018 (made on first use)

    @property
    def client(self) -> Any:
        """The connection (pool), made on first use; slot renewal starts
        with it."""
        if self._client is None:
            self._client = self._connect()
            if not self._closed:
                self._renewer.start(RENEW_EVERY, now=False).addErrback(self._loop_failed)
        return self._client

    def _loop_failed(self, failure: Failure) -> None:
        self.log.failure("policy store loop failed", failure)

    # ------------------------------------------------------------ calls

    def _eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> "Deferred[Any]":
        """Run ``script``, bounded; any failure becomes StoreUnavailable."""
        try:
            d = self.client.eval(script, list(keys), list(args))
        except Exception as e:  # txredisapi raises at once when stopped
            return fail(StoreUnavailable(f"redis: {e}"))
        d.addTimeout(self.timeout, self.clock)

        def unavailable(failure: Failure) -> Failure:
            if failure.check(StoreUnavailable):
                return failure
            return Failure(StoreUnavailable(f"redis: {failure.getErrorMessage()}"))

        return d.addErrback(unavailable)

    # ------------------------------------------------------------ IPolicyStore

    def reserve(self, reservation: str, buckets: Sequence[Bucket], now: float) -> "Deferred[Verdict]":
        buckets = tuple(buckets)
        if not buckets:
            return succeed(Verdict(True, ()))
        args: list[Any] = [_ms(now), reservation]
        for b in buckets:
            window = 0 if b.kind == FIXED else _ms(b.seconds)
            if b.kind == CONCURRENT:
                window = _ms(min(b.seconds, LEASE))
            start, end = (_ms(b.start), _ms(b.end)) if b.kind == FIXED else (0, 0)
            args += [_KIND[b.kind], window, b.limit, b.amount, start, end]
        d = self._eval(redis_lua.RESERVE, [_bucket_key(b) for b in buckets], args)
        return d.addCallback(self._verdict, reservation, buckets)

    def _verdict(self, reply: list[Any], reservation: str, buckets: tuple[Bucket, ...]) -> Verdict:
        granted = int(reply[0]) == 1
        states = []
        for i, bucket in enumerate(buckets):
            used = float(reply[4 + 3 * i])
            reset = int(reply[5 + 3 * i]) / 1000.0
            if bucket.kind == CONCURRENT:
                reset = 0.0
            elif bucket.kind != FIXED and granted and bucket.amount:
                reset = bucket.seconds
            states.append(BucketState(bucket.limit, max(0, int(bucket.limit - used)), max(0.0, reset)))
        if granted:
            self.open[reservation] = buckets
            return Verdict(True, tuple(states))
        return Verdict(False, tuple(states), int(reply[1]) - 1, int(reply[2]) / 1000.0)

    def settle(
        self, reservation: str, settlements: Sequence[Settlement], now: float
    ) -> "Deferred[None]":
        held = self.open.get(reservation)
        if held is None:
            return succeed(None)  # never granted here, or settled already
        amounts = {s.bucket: s.amount for s in settlements}
        changes = [(b, amounts[b]) for b in held if b in amounts]
        rest = tuple(b for b in held if b not in amounts)
        if rest:
            self.open[reservation] = rest
        else:
            del self.open[reservation]
        # Slots are freed whatever the amount; a fixed window that is over
        # is left alone.
        changes = [(b, 0 if b.kind == CONCURRENT else new) for b, new in changes]
        changes = [
            (b, new) for b, new in changes
            if new != b.amount and not (b.kind == FIXED and b.end <= now)
        ]
        if not changes:
            return succeed(None)
        keys = [_bucket_key(b) for b, _ in changes]
        args: list[Any] = [reservation]
        for b, new in changes:
            tag = str(_ms(b.start)) if b.kind == FIXED else ""
            args += [_KIND[b.kind], tag, b.amount, new]
        d = self._eval(redis_lua.ADJUST, keys, args)
        finished: Deferred[None] = Deferred()
        self._settling.add(finished)

        def done(result: Any) -> Any:
            self._settling.discard(finished)
            finished.callback(None)
            return result

        return d.addBoth(done).addCallback(lambda _: None)

    def release_all(self, now: float) -> "Deferred[None]":
        """Give back every reservation still open (at shutdown)."""
        from twisted.internet.defer import DeferredList

        calls = [
            self.settle(name, [Settlement(b, 0) for b in buckets], now)
            for name, buckets in list(self.open.items())
        ]
        if calls:
            self.log.info("giving back {count} open reservation(s)", count=len(calls))
        # And wait for the settlements already on their way.
        calls += list(self._settling)
        return DeferredList(calls, consumeErrors=True).addCallback(lambda _: None)

    def close(self) -> "Deferred[None]":
        if self._closed:
            return succeed(None)
        self._closed = True
        for loop in (self._renewer, self._poller):
            if loop.running:
                loop.stop()
        for call in list(self._loop_calls):
            call.cancel()
        d = self.release_all(self.clock.seconds())

        def disconnect(_: Any) -> Any:
            if self._client is not None:
                return self._client.disconnect()
            return None

        return d.addCallback(disconnect).addErrback(lambda _: None).addCallback(lambda _: None)

    def _in_flight(self, d: "Deferred[Any]") -> "Deferred[Any]":
        """Keep a loop's call until it ends, so that close can cancel it."""
        self._loop_calls.add(d)

        def ended(result: Any) -> Any:
            self._loop_calls.discard(d)
            return result

        return d.addBoth(ended)

    def _renew(self) -> "Deferred[Any]":
        held = [
            (name, b) for name, buckets in self.open.items()
            for b in buckets if b.kind == CONCURRENT
        ]
        if not held:
            return succeed(None)
        keys = [_bucket_key(b) for _, b in held]
        args: list[Any] = [_ms(self.clock.seconds())]
        for name, b in held:
            args += [name, b.amount, _ms(min(b.seconds, LEASE))]

        def failed(failure: Failure) -> None:
            self.log.warn("could not renew {count} slot lease(s): {why}",
                          count=len(held), why=failure.getErrorMessage())

        return self._in_flight(self._eval(redis_lua.RENEW, keys, args)).addErrback(failed)

    # ------------------------------------------------------------ IKeyHealth

    def _health_keys(self) -> list[str]:
        return [PREFIX + "health", PREFIX + "health:version"]

    def mark(self, key: str, until: Mark) -> "Deferred[None]":
        state, when = ("revoked", "") if until is None else ("rest", repr(float(until)))
        d = self._eval(redis_lua.HEALTH_SET, self._health_keys(),
                       [key, state, when, _ms(HEALTH_TTL)])
        return d.addCallback(lambda _: None)

    def marks(self, now: float) -> "Deferred[Mapping[str, Mark]]":
        d = self._eval(redis_lua.HEALTH_GET, self._health_keys(), [""])

        def read(reply: list[Any]) -> dict[str, Mark]:
            marks = _read_marks(reply)
            return {k: u for k, u in marks.items() if u is None or u > now}

        return d.addCallback(read)

    def watch(self, callback: Callable[[str, Mark], None]) -> None:
        self._watchers.append(callback)
        if not self._poller.running and not self._closed:
            self._poller.start(HEALTH_POLL, now=False).addErrback(self._loop_failed)

    def _poll_health(self) -> "Deferred[None]":
        d = self._in_flight(
            self._eval(redis_lua.HEALTH_GET, self._health_keys(), [self._health_version]))

        def read(reply: list[Any]) -> None:
            version = str(reply[0])
            if version == self._health_version:
                return
            self._health_version = version
            marks = _read_marks(reply)
            for key, until in marks.items():
                if key not in self._health or self._health[key] != until:
                    self._health[key] = until
                    for watcher in list(self._watchers):
                        watcher(key, until)

        # A failed poll is tried again at the next tick; the failure itself
        # is counted where requests meet it.
        return d.addCallback(read).addErrback(lambda _: None)


def _read_marks(reply: list[Any]) -> dict[str, Mark]:
    marks: dict[str, Mark] = {}
    for key, value in zip(reply[1::2], reply[2::2]):
        state, _, when = str(value).partition(":")
        if state == "revoked":
            marks[str(key)] = None
        elif state == "rest":
            try:
                marks[str(key)] = float(when)
            except ValueError:
                continue
    return marks
