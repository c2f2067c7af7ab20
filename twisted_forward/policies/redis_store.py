"""
The Redis policy store: counters shared by several proxy instances.

Every reservation is checked and charged atomically on the server by
:data:`~.redis_lua.RESERVE`'s steps, so instances sharing one Redis (or
Valkey) enforce a limit exactly; settling is :data:`~.redis_lua.ADJUST`'s.
Time comes from the instance's clock, as the fixed windows do
(:mod:`.windows`): keep the machines' clocks in step (NTP), as any
distributed limiter needs.

**Batches.** The reservations and settlements asked for in one reactor turn
are sent together, at the end of the turn, as one ``EVALSHA`` of
:data:`~.redis_lua.BATCH` (at most :data:`BATCH_MAX` operations each; more
are pipelined on the connection).  The script applies them in the order they
were asked, in one atomic step, so a batch is exactly as strict as one call
each; a burst of a thousand requests costs Redis a few script runs and the
proxy a few replies to read instead of a thousand of each.  Each answer is a
status line, not a bulk string: txredisapi's own reader (used when hiredis
is not installed) reads every bulk string of a reply on a reactor turn of its
own, which under load made a reservation's answer wait many busy turns.

**Timeouts measure the store, not this process.**  A batch's wait starts
when its bytes leave (the reactor turn after it is written), and when it runs out the store is given one more turn
of the reactor to read what already arrived (and more turns while answers
keep arriving) before the batch is declared lost: a reactor busy parsing a
burst of requests is not a store that is down.  An answer that comes after
its batch was given up is not wasted: what it granted is given back at once.
The connection's own reply timeout (:func:`connection`) is a longer backstop
that drops a connection which stopped answering.

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

from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import redis_link
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

#: Most operations in one EVALSHA of BATCH (the server runs a script
#: without serving anyone else: keep each run short).
BATCH_MAX = 200
#: The connection's own reply timeout, as a multiple of the store's timeout
#: (and at least :data:`BACKSTOP_MIN` seconds): it drops a connection that
#: stopped answering, after the requests were answered as configured.
BACKSTOP_FACTOR = 10.0
BACKSTOP_MIN = 5.0

_KIND = {FIXED: "f", "moving": "m", CONCURRENT: "c"}


def connection(target: redis_link.RedisTarget, timeout: float, ca_file: Optional[str] = None) -> Any:
    """The txredisapi pool the policy store uses: connecting is bounded by
    ``timeout``; a reply by a longer backstop (:data:`BACKSTOP_FACTOR`),
    since :class:`RedisStore` bounds its own waits, measured from when it
    writes."""
    backstop = max(BACKSTOP_MIN, BACKSTOP_FACTOR * timeout)
    return redis_link.connect(target, timeout, ca_file=ca_file, reply_timeout=backstop)


class _Op:
    """One reservation or adjustment waiting for its batch.

    :ivar keys: its buckets' keys, in order.
    :ivar head: the start of its BATCH argument (``r <id> <now> <count>``).
    :ivar fields: per bucket, its fields after the key index.
    """

    __slots__ = ("keys", "head", "fields", "deferred", "reservation", "buckets")

    def __init__(
        self,
        keys: list[str],
        head: str,
        fields: list[str],
        reservation: str,
        buckets: Optional[tuple[Bucket, ...]] = None,
    ) -> None:
        self.keys = keys
        self.head = head
        self.fields = fields
        self.reservation = reservation
        #: A reservation's buckets; None for an adjustment.
        self.buckets = buckets
        self.deferred: Deferred[Any] = Deferred()


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
    :param timeout: seconds any one call may take (measured from when it
        is written, see the module's docstring).
    :param gave_back: called with the count each time reservations granted
        after their wait ran out are given back.
    """

    name = "redis"
    log = Logger()

    def __init__(
        self,
        connect: Callable[[], Any],
        clock: IReactorTime,
        timeout: float,
        gave_back: Optional[Callable[[int], None]] = None,
    ) -> None:
        self._connect = connect
        self._gave_back = gave_back
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
        #: Operations asked for in this reactor turn, sent at its end.
        self._queue: list[_Op] = []
        self._flush_call: Optional[IDelayedCall] = None
        #: Replies read so far: while they keep coming, a late one is
        #: queued behind them, not lost.
        self._replies = 0

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

    def _eval(
        self,
        script: str,
        keys: Sequence[str],
        args: Sequence[Any],
        late: Optional[Callable[[Any], None]] = None,
    ) -> "Deferred[Any]":
        """Run ``script``, bounded; any failure becomes StoreUnavailable.

        The wait starts when the call is written (the reactor's next turn,
        when its bytes leave: ``write`` only buffers); when it runs out,
        the answer still gets the reactor's next turn, and more while other
        answers keep arriving (:meth:`_grace`), before the call errs.  An
        answer that comes after that goes to ``late``.
        """
        try:
            d = self.client.eval(script, list(keys), list(args))
        except Exception as e:  # txredisapi raises at once when stopped
            return fail(StoreUnavailable(f"redis: {e}"))
        timers: list[IDelayedCall] = []

        def stop_timers() -> None:
            for timer in timers:
                if timer.active():
                    timer.cancel()

        def cancel(_: "Deferred[Any]") -> None:
            # Cancelled (the store closing): nothing of this call may stay
            # on the reactor.
            stop_timers()
            d.cancel()

        result: Deferred[Any] = Deferred(cancel)

        def arm() -> None:
            # On the reactor's next turn: ``write`` only buffers, and the
            # bytes leave in the turn's I/O step, so the wait is measured
            # from there.
            if not result.called:
                timers.append(self.clock.callLater(self.timeout, self._expired, result))

        timers.append(self.clock.callLater(0, arm))

        def answered(reply: Any) -> None:
            self._replies += 1
            stop_timers()
            if not result.called:
                result.callback(reply)
            elif late is not None:
                late(reply)

        def failed(failure: Failure) -> None:
            stop_timers()
            if not result.called:
                result.errback(Failure(StoreUnavailable(f"redis: {failure.getErrorMessage()}")))

        d.addCallbacks(answered, failed)
        return result

    def _expired(self, result: "Deferred[Any]") -> None:
        if not result.called:
            self.clock.callLater(0, self._grace, result, self._replies)

    def _grace(self, result: "Deferred[Any]", replies: int) -> None:
        """A call's time ran out a turn ago: if no answer at all was read
        since, the store is not answering; if some were, this one is queued
        behind them, so wait one more turn."""
        if result.called:
            return
        if self._replies != replies:
            self.clock.callLater(0, self._grace, result, self._replies)
            return
        result.errback(StoreUnavailable(f"redis: no answer in {self.timeout:g} s"))

    # ------------------------------------------------------------ batches

    def _enqueue(self, op: _Op) -> "Deferred[Any]":
        self._queue.append(op)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)
        return op.deferred

    def _flush(self) -> None:
        """Send what this turn asked for, :data:`BATCH_MAX` at a time."""
        self._flush_call = None
        queue, self._queue = self._queue, []
        for i in range(0, len(queue), BATCH_MAX):
            self._send(queue[i:i + BATCH_MAX])

    def _send(self, ops: list[_Op]) -> None:
        index: dict[str, int] = {}
        args: list[str] = []
        for op in ops:
            parts = [op.head]
            for key, fields in zip(op.keys, op.fields):
                i = index.get(key)
                if i is None:
                    i = index[key] = len(index) + 1
                parts.append(f"{i} {fields}")
            args.append(" ".join(parts))
        keys = list(index)
        d = self._eval(redis_lua.BATCH, keys, args, late=lambda reply: self._late(ops, reply))

        def answered(reply: list[Any]) -> None:
            for op, line in zip(ops, reply):
                op.deferred.callback(line)

        def failed(failure: Failure) -> None:
            for op in ops:
                op.deferred.errback(failure)

        d.addCallbacks(answered, failed)

    def _late(self, ops: list[_Op], reply: list[Any]) -> None:
        """A batch answered after it was given up: give back what it granted."""
        given_back = 0
        for op, line in zip(ops, reply):
            if op.buckets is not None and str(line).startswith("1"):
                self.open[op.reservation] = op.buckets
                self.settle(op.reservation, [Settlement(b, 0) for b in op.buckets],
                            self.clock.seconds()).addErrback(self._give_back_failed)
                given_back += 1
        if given_back:
            if self._gave_back is not None:
                self._gave_back(given_back)
            self.log.info("gave back {count} reservation(s) granted after their wait ran out",
                          count=given_back)

    def _give_back_failed(self, failure: Failure) -> None:
        self.log.warn("could not give back a late reservation: {why}",
                      why=failure.getErrorMessage())

    # ------------------------------------------------------------ IPolicyStore

    def reserve(self, reservation: str, buckets: Sequence[Bucket], now: float) -> "Deferred[Verdict]":
        buckets = tuple(buckets)
        if not buckets:
            return succeed(Verdict(True, ()))
        fields = []
        for b in buckets:
            if b.kind == FIXED:
                fields.append(f"f 0 {b.limit} {b.amount} {_ms(b.start)} {_ms(b.end)}")
            elif b.kind == CONCURRENT:
                fields.append(f"c {_ms(min(b.seconds, LEASE))} {b.limit} {b.amount} 0 0")
            else:
                fields.append(f"m {_ms(b.seconds)} {b.limit} {b.amount} 0 0")
        op = _Op([_bucket_key(b) for b in buckets], f"r {reservation} {_ms(now)} {len(buckets)}",
                 fields, reservation, buckets)
        return self._enqueue(op).addCallback(self._verdict, reservation, buckets)

    def _verdict(self, line: str, reservation: str, buckets: tuple[Bucket, ...]) -> Verdict:
        reply = str(line).split()
        granted = reply[0] == "1"
        states = []
        for i, bucket in enumerate(buckets):
            used = float(reply[3 + 2 * i])
            if bucket.kind == CONCURRENT:
                reset = 0.0
            elif bucket.kind != FIXED and granted and bucket.amount:
                reset = bucket.seconds
            else:
                reset = float(reply[4 + 2 * i]) / 1000.0
            states.append(BucketState(bucket.limit, max(0, int(bucket.limit - used)), max(0.0, reset)))
        if granted:
            self.open[reservation] = buckets
            return Verdict(True, tuple(states))
        return Verdict(False, tuple(states), int(reply[1]) - 1, float(reply[2]) / 1000.0)

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
        fields = [
            f"{_KIND[b.kind]} {_ms(b.start) if b.kind == FIXED else '-'} {b.amount} {new}"
            for b, new in changes
        ]
        d = self._enqueue(_Op(keys, f"a {reservation} {len(changes)}", fields, reservation))
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
