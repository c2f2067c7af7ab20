"""
The in-memory policy store: exact for one process.

It is also the reference the other stores are tested against: the
supervisor's store for ``--workers`` runs one of these behind AMP.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from .store import (
    CONCURRENT,
    FIXED,
    MOVING,
    Bucket,
    BucketState,
    IImmediateStore,
    IKeyHealth,
    IStoreInfo,
    Mark,
    Settlement,
    Verdict,
)

#: Makes a named tuple from a tuple of its fields without the Python-level
#: ``__new__`` a call of the class runs (one per bucket and request).
_new = tuple.__new__

#: Retry-After for a bucket of parallel slots: a slot frees when some
#: request ends, which nobody can foretell.
SLOT_RETRY = 1.0


class _Moving:
    """One moving window: what was taken, when, under which reservation."""

    __slots__ = ("entries", "by_reservation", "total", "seconds")

    def __init__(self, seconds: float) -> None:
        #: The window length (for sweeping).
        self.seconds = seconds
        #: [stamp, amount, reservation], oldest first.
        self.entries: deque[list[Any]] = deque()
        self.by_reservation: dict[str, list[Any]] = {}
        self.total = 0

    def expire(self, now: float, seconds: float) -> None:
        entries = self.entries
        while entries and entries[0][0] + seconds <= now:
            stamp, amount, reservation = entries.popleft()
            self.total -= amount
            self.by_reservation.pop(reservation, None)


class _Slots:
    """The slots of one parallel bucket: reservation -> (amount, lease end),
    with their sum kept, and the leases looked at only once one may have
    ended (a lease is long: no scan per request)."""

    __slots__ = ("held", "total", "next_end")

    def __init__(self) -> None:
        self.held: dict[str, tuple[int, float]] = {}
        self.total = 0
        #: No lease ends before this time.
        self.next_end = float("inf")

    def used(self, now: float) -> int:
        if now >= self.next_end:
            for r in [r for r, (_, until) in self.held.items() if until <= now]:
                self.total -= self.held.pop(r)[0]
            self.next_end = min((until for _, until in self.held.values()), default=float("inf"))
        return self.total

    def take(self, reservation: str, amount: int, until: float) -> None:
        held = self.held.get(reservation, (0, 0.0))[0]
        self.held[reservation] = (held + amount, until)
        self.total += amount
        if until < self.next_end:
            self.next_end = until

    def release(self, reservation: str) -> None:
        held = self.held.pop(reservation, None)
        if held is not None:
            self.total -= held[0]


@implementer(IImmediateStore, IKeyHealth, IStoreInfo)
class MemoryStore:
    """Counters in this process's memory.

    Expired windows are dropped as they are met, and all of them every
    :data:`SWEEP_EVERY` reservations, so a store serving many keys over
    months does not grow.
    """

    name = "memory"
    SWEEP_EVERY = 4096

    def __init__(self) -> None:
        #: Fixed windows by (id, start): [what is held, when it ends].
        self._fixed: dict[tuple[str, float], list[Any]] = {}
        self._moving: dict[str, _Moving] = {}
        self._slots: dict[str, _Slots] = {}
        self._marks: dict[str, Mark] = {}
        self._watchers: list[Callable[[str, Mark], None]] = []
        self._count = 0

    # ------------------------------------------------------------ IPolicyStore

    def reserve(self, reservation: str, buckets: Sequence[Bucket], now: float) -> "Deferred[Verdict]":
        return succeed(self.reserve_now(reservation, buckets, now))

    def reserve_now(self, reservation: str, buckets: Sequence[Bucket], now: float) -> Verdict:
        """:meth:`reserve`, answered at once (for the supervisor's store).

        Fixed windows (most buckets) and slots are read and taken inline:
        what :meth:`_used`, :meth:`_take` and :meth:`_reset` do, without a
        call per bucket (this runs for every request).
        """
        self._count += 1
        if self._count % self.SWEEP_EVERY == 0:
            self.sweep(now)
        fixed, all_slots = self._fixed, self._slots
        used: list[int] = []
        refused = -1
        for bucket in buckets:
            kind = bucket.kind
            if kind == FIXED:
                window = fixed.get(bucket.key)
                if window is None:
                    held = 0
                elif window[1] <= now:
                    del fixed[bucket.key]
                    held = 0
                else:
                    held = window[0]
            elif kind == CONCURRENT:
                slots = all_slots.get(bucket.id)
                held = slots.used(now) if slots is not None else 0
            else:
                held = self._used(bucket, now)
            used.append(held)
            if refused < 0 and (held + bucket.amount > bucket.limit or held >= bucket.limit):
                refused = len(used) - 1
        if refused >= 0:
            bucket = buckets[refused]
            states = tuple(
                BucketState(b.limit, max(0, b.limit - u), self._reset(b, now))
                for b, u in zip(buckets, used)
            )
            return Verdict(False, states, refused, self._retry_after(bucket, used[refused], now))
        granted: list[BucketState] = []
        for bucket, held in zip(buckets, used):
            limit, amount, kind = bucket.limit, bucket.amount, bucket.kind
            if kind == FIXED:
                end = bucket.end
                window = fixed.get(bucket.key)
                if window is None:
                    fixed[bucket.key] = [amount, end]
                else:
                    window[0] += amount
                    window[1] = end
                reset = end - now if end > now else 0.0
            elif kind == CONCURRENT:
                slots = all_slots.get(bucket.id)
                if slots is None:
                    slots = all_slots[bucket.id] = _Slots()
                slots.take(reservation, amount, now + bucket.seconds)
                reset = 0.0
            else:
                # A moving window's reset reads its entries after the take;
                # a later take of the same bucket id in this reservation
                # adds to the same entry, so taking and reading in turn
                # gives what taking all first gave.
                self._take(reservation, bucket, now)
                reset = self._reset(bucket, now)
            left = limit - held - amount
            granted.append(_new(BucketState, (limit, left if left > 0 else 0, reset)))
        return _new(Verdict, (True, tuple(granted), None, 0.0))

    def settle(
        self, reservation: str, settlements: Sequence[Settlement], now: float
    ) -> "Deferred[None]":
        self.settle_now(reservation, settlements, now)
        return succeed(None)

    def settle_now(self, reservation: str, settlements: Sequence[Settlement], now: float) -> None:
        """:meth:`settle`, done at once."""
        fixed = self._fixed
        for bucket, amount in settlements:
            kind = bucket.kind
            if kind == FIXED:
                window = fixed.get(bucket.key)
                if window is not None and window[1] > now:
                    held = window[0] + amount - bucket.amount
                    window[0] = held if held > 0 else 0
            elif kind == MOVING:
                moving = self._moving.get(bucket.id)
                entry = moving.by_reservation.get(reservation) if moving else None
                if moving is not None and entry is not None:
                    moving.total += amount - entry[1]
                    entry[1] = amount
            else:
                slots = self._slots.get(bucket.id)
                if slots is not None:
                    slots.release(reservation)

    def close(self) -> "Deferred[None]":
        return succeed(None)

    # ------------------------------------------------------------ IKeyHealth

    def mark(self, key: str, until: Mark) -> "Deferred[None]":
        if self._marks.get(key, 0.0) is not None:  # a revocation is for good
            self._marks[key] = until
        for watcher in list(self._watchers):
            watcher(key, until)
        return succeed(None)

    def marks(self, now: float) -> "Deferred[Mapping[str, Mark]]":
        return succeed(self.marks_now(now))

    def marks_now(self, now: float) -> dict[str, Mark]:
        """:meth:`marks`, answered at once."""
        self._marks = {k: u for k, u in self._marks.items() if u is None or u > now}
        return dict(self._marks)

    def watch(self, callback: Callable[[str, Mark], None]) -> None:
        self._watchers.append(callback)

    # ------------------------------------------------------------ inside

    def sweep(self, now: float) -> None:
        """Forget every window and slot that is over."""
        for key in [k for k, (_, end) in self._fixed.items() if end <= now]:
            del self._fixed[key]
        for id in list(self._moving):
            window = self._moving[id]
            if not window.entries or window.entries[-1][0] + window.seconds <= now:
                del self._moving[id]
        for id in [i for i, s in self._slots.items() if not s.used(now)]:
            del self._slots[id]

    def _used(self, bucket: Bucket, now: float) -> int:
        if bucket.kind == FIXED:
            counter = self._fixed.get(bucket.key)
            if counter is not None and counter[1] <= now:
                del self._fixed[bucket.key]
                return 0
            return counter[0] if counter is not None else 0
        if bucket.kind == MOVING:
            window = self._moving.get(bucket.id)
            if window is None:
                return 0
            window.expire(now, bucket.seconds)
            return window.total
        slots = self._slots.get(bucket.id)
        return slots.used(now) if slots is not None else 0

    def _take(self, reservation: str, bucket: Bucket, now: float) -> None:
        if bucket.kind == FIXED:
            counter = self._fixed.get(bucket.key)
            if counter is None:
                self._fixed[bucket.key] = [bucket.amount, bucket.end]
            else:
                counter[0] += bucket.amount
                counter[1] = bucket.end
        elif bucket.kind == MOVING:
            window = self._moving.get(bucket.id)
            if window is None:
                window = self._moving[bucket.id] = _Moving(bucket.seconds)
            old = window.by_reservation.get(reservation)
            if old is not None:  # the same bucket twice in one reservation
                old[1] += bucket.amount
            else:
                entry = [now, bucket.amount, reservation]
                window.entries.append(entry)
                window.by_reservation[reservation] = entry
            window.total += bucket.amount
        else:
            slots = self._slots.get(bucket.id)
            if slots is None:
                slots = self._slots[bucket.id] = _Slots()
            slots.take(reservation, bucket.amount, now + bucket.seconds)

    def _reset(self, bucket: Bucket, now: float) -> float:
        """Seconds until ``bucket`` is whole again."""
        if bucket.kind == FIXED:
            return max(0.0, bucket.end - now)
        if bucket.kind == MOVING:
            window = self._moving.get(bucket.id)
            if window is None or not window.entries:
                return bucket.seconds if bucket.amount else 0.0
            return max(0.0, window.entries[-1][0] + bucket.seconds - now)
        return 0.0

    def _retry_after(self, bucket: Bucket, held: int, now: float) -> float:
        """Seconds until ``bucket`` has room for its amount."""
        if bucket.kind == FIXED:
            return max(0.0, bucket.end - now)
        if bucket.kind == MOVING:
            window = self._moving.get(bucket.id)
            if window is None:
                return 0.0
            need = held + bucket.amount - bucket.limit
            freed = 0
            for stamp, amount, _ in window.entries:
                freed += amount
                if freed >= need and held - freed < bucket.limit:
                    return max(0.0, stamp + bucket.seconds - now)
            return bucket.seconds
        return SLOT_RETRY
