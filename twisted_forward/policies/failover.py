"""
``LIMITS_ON_STORE_FAILURE``: what a shared store's outage does to requests.

:class:`FailSafeStore` wraps the shared store (Redis, or the ``--workers``
supervisor) and decides, when a call fails or times out:

``open``
    serve, and count in this process's own memory store instead, with a
    warning in the log (once per outage) and each failure counted in the
    ``openai_forward_policy_store_failures`` metric.  Limits then hold per
    process until the store is back: an outage loosens them, loudly, but
    never stops traffic.
``closed``
    refuse: the call errs with :class:`~.store.StoreUnavailable`, which the
    exchange answers with a 503 (``policy_store_unavailable``), so no limit
    or quota can be overshot.

Either way no request waits longer than the store's own timeout, and after
a failure the store is left alone for :data:`RETRY_AFTER` seconds (requests
meanwhile go straight to the fallback, or are refused at once) instead of
every request paying the timeout again.

A reservation is settled where it was made: one counted locally during an
outage is settled locally, one made in the shared store is settled there
(if the store is still down, that settlement is lost: its window keeps the
reserved amount, which errs on the safe side).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .memory import MemoryStore
from .store import (
    Bucket,
    IKeyHealth,
    IPolicyStore,
    IStoreInfo,
    Mark,
    Settlement,
    StoreUnavailable,
    Verdict,
)

OPEN = "open"
CLOSED = "closed"
#: Seconds a failed store is left alone before it is tried again.
RETRY_AFTER = 1.0


@implementer(IPolicyStore, IKeyHealth, IStoreInfo)
class FailSafeStore:
    """A shared store, with this process's memory as the fallback.

    :param shared: the store every process shares (it also provides
        :class:`IKeyHealth`).
    :param mode: :data:`OPEN` or :data:`CLOSED`.
    :param clock: for :data:`RETRY_AFTER`.
    :param failed: called with ``(store name, mode)`` on every failure (the
        metric).
    """

    log = Logger()

    def __init__(
        self,
        shared: Any,
        mode: str,
        clock: IReactorTime,
        failed: Optional[Callable[[str, str], None]] = None,
        local: Optional[MemoryStore] = None,
    ) -> None:
        if mode not in (OPEN, CLOSED):
            raise ValueError(f"unknown failure mode {mode!r}")
        self.shared = shared
        self.mode = mode
        self.clock = clock
        self.failed = failed
        self.local = local if local is not None else MemoryStore()
        self.name = shared.name
        #: Reservations counted locally, during an outage.
        self._local_reservations: set[str] = set()
        #: While the store is left alone: until when.
        self._resting_until = 0.0
        self._down = False

    # ------------------------------------------------------------ outage

    def _available(self) -> bool:
        return self.clock.seconds() >= self._resting_until

    def _failure(self, why: str) -> None:
        self._resting_until = self.clock.seconds() + RETRY_AFTER
        if self.failed is not None:
            self.failed(self.name, self.mode)
        if not self._down:
            self._down = True
            if self.mode == OPEN:
                self.log.warn(
                    "policy store ({store}) unavailable: {why}; limits are counted "
                    "in this process until it is back (LIMITS_ON_STORE_FAILURE=open)",
                    store=self.name, why=why,
                )
            else:
                self.log.error(
                    "policy store ({store}) unavailable: {why}; limited requests are "
                    "refused with 503 until it is back (LIMITS_ON_STORE_FAILURE=closed)",
                    store=self.name, why=why,
                )

    def _recovered(self) -> None:
        if self._down:
            self._down = False
            self.log.info("policy store ({store}) is back", store=self.name)

    # ------------------------------------------------------------ IPolicyStore

    def reserve(self, reservation: str, buckets: Sequence[Bucket], now: float) -> "Deferred[Verdict]":
        if not self._available():
            return self._fallback(reservation, buckets, now)
        d = self.shared.reserve(reservation, buckets, now)

        def granted(verdict: Verdict) -> Verdict:
            self._recovered()
            return verdict

        def unavailable(failure: Failure) -> Any:
            failure.trap(StoreUnavailable)
            self._failure(failure.getErrorMessage())
            return self._fallback(reservation, buckets, now, failure)

        return d.addCallbacks(granted, unavailable)

    def _fallback(
        self, reservation: str, buckets: Sequence[Bucket], now: float,
        failure: Optional[Failure] = None,
    ) -> "Deferred[Verdict]":
        if self.mode == CLOSED:
            if failure is None:
                failure = Failure(StoreUnavailable(f"{self.name}: unavailable"))
                if self.failed is not None:
                    self.failed(self.name, self.mode)
            return fail(failure)
        if failure is None and self.failed is not None:
            self.failed(self.name, self.mode)
        verdict = self.local.reserve_now(reservation, buckets, now)
        if verdict.granted:
            self._local_reservations.add(reservation)
        return succeed(verdict)

    def settle(
        self, reservation: str, settlements: Sequence[Settlement], now: float
    ) -> "Deferred[None]":
        if reservation in self._local_reservations:
            self._local_reservations.discard(reservation)
            return self.local.settle(reservation, settlements, now)

        def lost(failure: Failure) -> None:
            failure.trap(StoreUnavailable)
            self._failure(failure.getErrorMessage())
            self.log.warn(
                "could not settle a reservation in the policy store ({store}): {why}",
                store=self.name, why=failure.getErrorMessage(),
            )

        return self.shared.settle(reservation, settlements, now).addErrback(lost)

    def close(self) -> "Deferred[None]":
        return self.shared.close()

    # ------------------------------------------------------------ IKeyHealth

    def mark(self, key: str, until: Mark) -> "Deferred[None]":
        # This process learns of it either way (its own watchers included).
        self.local.mark(key, until)

        def lost(failure: Failure) -> None:
            failure.trap(StoreUnavailable)
            self.log.warn("could not share a default key's health: {why}",
                          why=failure.getErrorMessage())

        return self.shared.mark(key, until).addErrback(lost)

    def marks(self, now: float) -> "Deferred[Mapping[str, Mark]]":
        def local(failure: Failure) -> Mapping[str, Mark]:
            failure.trap(StoreUnavailable)
            return self.local.marks_now(now)

        return self.shared.marks(now).addErrback(local)

    def watch(self, callback: Callable[[str, Mark], None]) -> None:
        seen: dict[str, Mark] = {}

        def once(key: str, until: Mark) -> None:
            # A mark made here comes back from the shared store too.
            if key in seen and seen[key] == until:
                return
            seen[key] = until
            callback(key, until)

        self.local.watch(once)
        self.shared.watch(once)
