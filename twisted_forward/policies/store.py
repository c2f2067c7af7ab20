"""
Where the policy counters live: the store interface, and what goes in and out.

A request draws on a few *buckets* (its key's requests per minute, tokens
per minute, parallel slots, tokens or dollars per day...).  It reserves all
of them at once, before anything goes upstream, and settles them with the
real amounts when its answer is over:

- :meth:`IPolicyStore.reserve` takes every bucket or none (atomic), and says
  how full each one is, for the ``x-ratelimit-*`` headers, or which one
  refused and when to retry;
- :meth:`IPolicyStore.settle` replaces each reserved amount by the real one
  (``0`` gives everything back: a failed request, a client gone, a shutdown).

So N requests of one key in flight together can never exceed its limit by
more than what one of them spent over its reservation.

The same interface has three implementations, one per deployment: in
memory (:class:`~twisted_forward.policies.memory.MemoryStore`, one process),
the ``--workers`` supervisor, and Redis (several instances).  Window
arithmetic that needs no shared state (where a fixed window or a calendar
month starts and ends) is done by the caller; a store only counts.

The store also shares *key health*: a default key the upstream revoked
(401) or told to rest (429), so one process's discovery protects all
(:class:`IKeyHealth`).  Keys are named there by :func:`key_id`, a digest,
never by the key.

Every store method returns a Deferred that fires in bounded time: a store
that cannot answer errs with :class:`StoreUnavailable`, and the caller
applies ``LIMITS_ON_STORE_FAILURE``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

#: A window that resets all at once at its end (its start is given).
FIXED = "fixed"
#: A window that slides: what was taken more than ``seconds`` ago is free.
MOVING = "moving"
#: Slots held while a request is in flight (``max_parallel``).
CONCURRENT = "concurrent"

KINDS = frozenset({FIXED, MOVING, CONCURRENT})


class StoreUnavailable(Exception):
    """The store did not answer (down, unreachable, or too slow)."""


@dataclass(frozen=True)
class Bucket:
    """One counter a request draws on, and how much it takes from it.

    :ivar id: a stable, non-secret name, the same in every process and
        instance (``"alice/rpm"``, ``"alice/usd_per_month"``); never a key.
    :ivar kind: :data:`FIXED`, :data:`MOVING` or :data:`CONCURRENT`.
    :ivar limit: what the bucket holds (requests, tokens, micro-dollars, slots).
    :ivar amount: what this request takes now (clamped by the caller to
        ``limit``, so one request alone always fits an empty bucket).
    :ivar seconds: the window length; for :data:`CONCURRENT`, the lease of
        a slot (a slot nobody settles frees itself after this long, so a
        crashed process leaks nothing for ever).
    :ivar start: :data:`FIXED` only: when this window began (seconds since
        the epoch); it ends at ``start + seconds``.  Windows of different
        ``start`` are different counters.
    """

    id: str
    kind: str
    limit: int
    amount: int
    seconds: float
    start: float = 0.0
    #: When a fixed window resets (``start + seconds``).
    end: float = field(init=False, repr=False, compare=False)
    #: ``(id, start)``: the counter a fixed window is kept under.
    key: tuple[str, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown bucket kind {self.kind!r}")
        # Worked out once: a bucket serves every request of its window.
        object.__setattr__(self, "end", self.start + self.seconds)
        object.__setattr__(self, "key", (self.id, self.start))


# The answers (states, verdicts, settlements) are made for every request:
# named tuples, immutable like a frozen dataclass and made in a third of
# the time.
class BucketState(NamedTuple):
    """How full one bucket is, as the ``x-ratelimit-*`` headers say it.

    :ivar limit: the bucket's limit.
    :ivar remaining: what is left (after this request, if it was granted).
    :ivar reset: seconds until the bucket is whole again.
    """

    limit: int
    remaining: int
    reset: float


class Verdict(NamedTuple):
    """A store's answer to :meth:`IPolicyStore.reserve`.

    :ivar granted: every bucket was reserved; else none was.
    :ivar states: one per bucket, in the order given.
    :ivar refused: the index of the first bucket that had no room, or None.
    :ivar retry_after: seconds until that bucket has room for the request
        (0 when granted).
    """

    granted: bool
    states: tuple[BucketState, ...]
    refused: Optional[int] = None
    retry_after: float = 0.0


class Settlement(NamedTuple):
    """The real amount for one bucket of a reservation.

    :ivar bucket: the bucket exactly as it was reserved.
    :ivar amount: what the request really took; ``0`` releases all of it.
    """

    bucket: Bucket
    amount: int


class IPolicyStore(Interface):
    """Counts what keys take from their buckets, atomically."""

    def reserve(reservation: str, buckets: Sequence[Bucket], now: float) -> "Deferred[Verdict]":
        """Take ``bucket.amount`` from every bucket, or from none.

        A bucket refuses when what it holds plus the amount exceeds its
        limit, or when it is already full.

        :param reservation: a name unique to this request in every process
            (used to settle it; moving windows and slots are kept under it).
        :param now: the time, seconds since the epoch.
        :returns: the verdict; errs with :class:`StoreUnavailable` when the
            store cannot answer in bounded time.
        """

    def settle(
        reservation: str, settlements: Sequence[Settlement], now: float
    ) -> "Deferred[None]":
        """Replace reserved amounts by real ones (``0``: release).

        A fixed window that has ended since is left alone (it is gone);
        slots are freed whatever the amount.  Settling twice, or settling a
        reservation the store never granted, changes nothing.
        """

    def close() -> "Deferred[None]":
        """Let go of connections; called once, at shutdown."""


class IImmediateStore(IPolicyStore):
    """A store that answers within the call (in this process's memory).

    The gate asks it directly, with no Deferred in between: the in-memory
    path is the one every request of a single-process proxy takes.
    """

    def reserve_now(reservation: str, buckets: Sequence[Bucket], now: float) -> Verdict:
        """:meth:`IPolicyStore.reserve`, answered at once."""

    def settle_now(reservation: str, settlements: Sequence[Settlement], now: float) -> None:
        """:meth:`IPolicyStore.settle`, done at once."""


#: What :meth:`IKeyHealth.marks` maps a key to: resting until this time, or
#: None when revoked.
Mark = Optional[float]


class IKeyHealth(Interface):
    """Default keys' health, shared by every process using the same keys."""

    def mark(key: str, until: Mark) -> "Deferred[None]":
        """Tell every process that key ``key`` (a :func:`key_id`) rests
        until ``until`` (seconds since the epoch), or, with None, is revoked."""

    def marks(now: float) -> "Deferred[Mapping[str, Mark]]":
        """Every key resting after ``now`` or revoked, by :func:`key_id`."""

    def watch(callback: Callable[[str, Mark], None]) -> None:
        """Call ``callback(key, until)`` for marks made from now on, by any
        process (this one included); a store that cannot push may poll."""


class IStoreInfo(Interface):
    """What a store says about itself, for start-up lines and metrics."""

    name = Attribute("A short name: 'memory', 'supervisor', 'redis'.")


def key_id(key: str) -> str:
    """A default key's name in a shared store: 16 hex digits of its SHA-256.

    The same in every process for the same key, whatever order the keys are
    configured in; it tells nothing about the key.
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
