"""
A shared store's outage on a fake clock: after a failure the store is left
alone for a while, so requests do not each wait for it
(:class:`twisted_forward.policies.failover.GuardedStore`).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_forward.policies.failover import RETRY_AFTER, GuardedStore
from twisted_forward.policies.memory import MemoryStore
from twisted_forward.policies.store import (
    FIXED,
    Bucket,
    IKeyHealth,
    IPolicyStore,
    IStoreInfo,
    Mark,
    Settlement,
    StoreUnavailable,
)


@implementer(IPolicyStore, IKeyHealth, IStoreInfo)
class FlakyStore:
    """A shared store that works (a memory store inside) until ``down``."""

    name = "flaky"

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.down = False
        self.calls = 0

    def _or_fail(self, make: Callable[[], Deferred]) -> Deferred:
        self.calls += 1
        if self.down:
            return fail(StoreUnavailable("flaky: down"))
        return make()

    def reserve(self, reservation: str, buckets: Sequence[Bucket], now: float) -> Deferred:
        return self._or_fail(lambda: self.inner.reserve(reservation, buckets, now))

    def settle(self, reservation: str, settlements: Sequence[Settlement], now: float) -> Deferred:
        return self._or_fail(lambda: self.inner.settle(reservation, settlements, now))

    def close(self) -> Deferred:
        return succeed(None)

    def mark(self, key: str, until: Mark) -> Deferred:
        return self._or_fail(lambda: self.inner.mark(key, until))

    def marks(self, now: float) -> "Deferred[Mapping[str, Mark]]":
        return self._or_fail(lambda: self.inner.marks(now))

    def watch(self, callback: Callable[[str, Mark], None]) -> None:
        self.inner.watch(callback)


def rpm(limit: int) -> Bucket:
    return Bucket("k/rpm", FIXED, limit, 1, 60.0, 0.0)


class GuardedStoreTests(SynchronousTestCase):
    """The guard around a flaky store."""

    def make(self) -> tuple[GuardedStore, FlakyStore, Clock, list]:
        clock = Clock()
        shared = FlakyStore()
        failures: list = []
        return GuardedStore(shared, clock, failures.append), shared, clock, failures

    def test_interfaces(self) -> None:
        """It is a store like the one it wraps, under its name."""
        store, *_ = self.make()
        verifyObject(IPolicyStore, store)
        verifyObject(IKeyHealth, store)
        verifyObject(IStoreInfo, store)
        self.assertEqual(store.name, "flaky")

    def test_passes_through_while_the_store_works(self) -> None:
        """Verdicts, settlements and health go to the store unchanged."""
        store, shared, clock, failures = self.make()
        self.assertTrue(self.successResultOf(store.reserve("r1", [rpm(1)], 1.0)).granted)
        self.assertFalse(self.successResultOf(store.reserve("r2", [rpm(1)], 1.0)).granted)
        self.successResultOf(store.settle("r1", [Settlement(rpm(1), 0)], 2.0))
        self.assertTrue(self.successResultOf(store.reserve("r3", [rpm(1)], 2.0)).granted)
        seen: list = []
        store.watch(lambda key, until: seen.append((key, until)))
        self.successResultOf(store.mark("k1", None))
        self.assertEqual(seen, [("k1", None)])
        self.assertEqual(self.successResultOf(store.marks(0.0)), {"k1": None})
        self.assertEqual(failures, [])

    def test_a_failed_store_is_left_alone_for_a_while(self) -> None:
        """After a failure, calls fail at once (StoreUnavailable) without
        reaching the store, for RETRY_AFTER seconds; each is counted; the
        outage is logged once, and its end once."""
        store, shared, clock, failures = self.make()
        logged: list = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        shared.down = True
        self.failureResultOf(store.reserve("r1", [rpm(5)], 0.0), StoreUnavailable)
        self.failureResultOf(store.reserve("r2", [rpm(5)], 0.0), StoreUnavailable)
        clock.advance(RETRY_AFTER / 2)
        self.failureResultOf(store.reserve("r3", [rpm(5)], 0.0), StoreUnavailable)
        self.assertEqual(shared.calls, 1)
        self.assertEqual(failures, ["flaky"] * 3)
        clock.advance(RETRY_AFTER / 2)
        self.failureResultOf(store.reserve("r4", [rpm(5)], 0.0), StoreUnavailable)
        self.assertEqual(shared.calls, 2)
        shared.down = False
        clock.advance(RETRY_AFTER)
        self.assertTrue(self.successResultOf(store.reserve("r5", [rpm(5)], 0.0)).granted)
        texts = [e.get("log_format", "") for e in logged]
        self.assertEqual(sum("unavailable:" in t for t in texts), 1, texts)
        self.assertEqual(sum(t.endswith("is back") for t in texts), 1, texts)

    def test_settlements_are_always_tried(self) -> None:
        """A settlement gives back what the store holds: it is sent even
        while the store rests."""
        store, shared, clock, failures = self.make()
        self.successResultOf(store.reserve("r1", [rpm(5)], 0.0))
        shared.down = True
        self.failureResultOf(store.reserve("r2", [rpm(5)], 0.0), StoreUnavailable)
        shared.down = False
        self.successResultOf(store.settle("r1", [Settlement(rpm(5), 0)], 0.5))
        self.assertEqual(shared.inner.reserve_now("x", [rpm(5)], 0.5).states[0].remaining, 4)
