"""
A shared store's outage, kept short for requests.

The policy gate applies ``LIMITS_ON_STORE_FAILURE`` when a store call errs
with :class:`~.store.StoreUnavailable` (``open``: count in this process;
``closed``: 503).  Each shared store bounds its own calls, but during an
outage every request would still wait that long before the gate decides.
:class:`GuardedStore` wraps the shared store (Redis, or the ``--workers``
supervisor) and, after a failure, answers :class:`StoreUnavailable` at once
for :data:`RETRY_AFTER` seconds before it asks the store again; it logs the
outage once when it starts and once when it ends, and counts every failed
or skipped call through ``failed`` (the metric).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

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

#: Seconds a failed store is left alone before it is asked again.
RETRY_AFTER = 1.0


@implementer(IPolicyStore, IKeyHealth, IStoreInfo)
class GuardedStore:
    """A shared store that is not asked again for a while after it failed.

    :param shared: the store (providing :class:`IKeyHealth` too).
    :param clock: for :data:`RETRY_AFTER`.
    :param failed: called with the store's name on every call that failed
        or was skipped because the store is down.
    """

    log = Logger()

    def __init__(
        self,
        shared: Any,
        clock: IReactorTime,
        failed: Optional[Callable[[str], None]] = None,
    ) -> None:
        self.shared = shared
        self.clock = clock
        self.failed = failed
        self.name = shared.name
        self._resting_until = 0.0
        self._down = False

    def start(self) -> None:
        """Connect now (when the service starts, after twistd forks), so the
        first requests do not wait for it."""
        self.shared.start()

    def _noted(self) -> None:
        if self.failed is not None:
            self.failed(self.name)

    def _guard(self, call: Callable[[], "Deferred[Any]"]) -> "Deferred[Any]":
        if self.clock.seconds() < self._resting_until:
            self._noted()
            return fail(StoreUnavailable(f"{self.name}: unavailable, retrying shortly"))
        d = call()

        def worked(result: Any) -> Any:
            if self._down:
                self._down = False
                self.log.info("policy store ({store}) is back", store=self.name)
            return result

        def failed(failure: Failure) -> Failure:
            if failure.check(StoreUnavailable):
                self._noted()
                self._resting_until = self.clock.seconds() + RETRY_AFTER
                if not self._down:
                    self._down = True
                    self.log.error(
                        "policy store ({store}) unavailable: {why}; "
                        "LIMITS_ON_STORE_FAILURE applies meanwhile",
                        store=self.name, why=failure.getErrorMessage(),
                    )
            return failure

        return d.addCallbacks(worked, failed)

    # ------------------------------------------------------------ IPolicyStore

    def reserve(self, reservation: str, buckets: Sequence[Bucket], now: float) -> "Deferred[Verdict]":
        return self._guard(lambda: self.shared.reserve(reservation, buckets, now))

    def settle(
        self, reservation: str, settlements: Sequence[Settlement], now: float
    ) -> "Deferred[None]":
        # A settlement is always tried: it gives back what the store holds.
        return self.shared.settle(reservation, settlements, now)

    def close(self) -> "Deferred[None]":
        return self.shared.close()

    # ------------------------------------------------------------ IKeyHealth

    def mark(self, key: str, until: Mark) -> "Deferred[None]":
        return self.shared.mark(key, until)

    def marks(self, now: float) -> "Deferred[Mapping[str, Mark]]":
        return self.shared.marks(now)

    def watch(self, callback: Callable[[str, Mark], None]) -> None:
        self.shared.watch(callback)
