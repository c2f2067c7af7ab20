"""
LIMITS_ON_STORE_FAILURE on a fake clock: what a shared store's outage does
(:class:`twisted_forward.policies.failover.FailSafeStore`).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_forward.policies.failover import CLOSED, OPEN, RETRY_AFTER, FailSafeStore
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
    Verdict,
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


class FailSafeTests(SynchronousTestCase):
    """Both modes, on a fake clock."""

    def make(self, mode: str) -> tuple[FailSafeStore, FlakyStore, Clock, list]:
        clock = Clock()
        shared = FlakyStore()
        failures: list = []
        store = FailSafeStore(shared, mode, clock, lambda name, m: failures.append((name, m)))
        return store, shared, clock, failures

    def verdict(self, d: Deferred) -> Verdict:
        return self.successResultOf(d)

    def test_interfaces(self) -> None:
        """It is a store like the one it wraps."""
        store, *_ = self.make(OPEN)
        verifyObject(IPolicyStore, store)
        verifyObject(IKeyHealth, store)
        verifyObject(IStoreInfo, store)
        self.assertEqual(store.name, "flaky")

    def test_open_counts_locally_and_loudly(self) -> None:
        """Open: with the store down, requests are still limited, by this
        process's own counters; each failure is counted, one warning is
        logged per outage."""
        store, shared, clock, failures = self.make(OPEN)
        self.assertTrue(self.verdict(store.reserve("r1", [rpm(2)], 1.0)).granted)
        shared.down = True
        logged: list = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        verdicts = [self.verdict(store.reserve(f"r{i}", [rpm(2)], 2.0)) for i in range(2, 5)]
        self.assertEqual([v.granted for v in verdicts], [True, True, False])
        self.assertEqual(failures, [("flaky", OPEN)] * 3)
        warnings = [e for e in logged if "counted in this process" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)

    def test_open_leaves_a_failed_store_alone_for_a_while(self) -> None:
        """After a failure the store is not asked again for RETRY_AFTER
        seconds; then it is, and a working store takes over again."""
        store, shared, clock, failures = self.make(OPEN)
        shared.down = True
        store.reserve("r1", [rpm(5)], 0.0)
        store.reserve("r2", [rpm(5)], 0.0)
        self.assertEqual(shared.calls, 1)
        shared.down = False
        clock.advance(RETRY_AFTER)
        self.assertTrue(self.verdict(store.reserve("r3", [rpm(5)], 0.0)).granted)
        self.assertEqual(shared.calls, 2)

    def test_open_settles_where_it_reserved(self) -> None:
        """A reservation counted locally is settled locally, one made in the
        shared store is settled there."""
        store, shared, clock, failures = self.make(OPEN)
        bucket = Bucket("k/tpm", FIXED, 100, 100, 60.0, 0.0)
        self.assertTrue(self.verdict(store.reserve("shared", [bucket], 1.0)).granted)
        shared.down = True
        self.assertTrue(self.verdict(store.reserve("local", [bucket], 1.0)).granted)
        self.successResultOf(store.settle("local", [Settlement(bucket, 0)], 2.0))
        self.assertTrue(store.local.reserve_now("x", [bucket], 2.0).granted)
        shared.down = False
        clock.advance(RETRY_AFTER)
        self.successResultOf(store.settle("shared", [Settlement(bucket, 0)], 3.0))
        self.assertTrue(shared.inner.reserve_now("y", [bucket], 3.0).granted)

    def test_closed_refuses(self) -> None:
        """Closed: with the store down every check errs with
        StoreUnavailable (the exchange's 503), at once while it rests."""
        store, shared, clock, failures = self.make(CLOSED)
        shared.down = True
        self.failureResultOf(store.reserve("r1", [rpm(5)], 0.0), StoreUnavailable)
        self.failureResultOf(store.reserve("r2", [rpm(5)], 0.0), StoreUnavailable)
        self.assertEqual(shared.calls, 1)
        self.assertEqual(failures, [("flaky", CLOSED)] * 2)
        self.assertEqual(store.local.reserve_now("x", [rpm(1)], 0.0).granted, True)

    def test_a_lost_settlement_is_not_an_error(self) -> None:
        """Settling in a store that is down logs and counts; the request is
        not failed for it."""
        store, shared, clock, failures = self.make(CLOSED)
        self.verdict(store.reserve("r1", [rpm(5)], 0.0))
        shared.down = True
        self.assertIsNone(self.successResultOf(store.settle("r1", [Settlement(rpm(5), 1)], 1.0)))
        self.assertEqual(failures, [("flaky", CLOSED)])

    def test_health_reaches_this_process_even_when_down(self) -> None:
        """A key marked while the store is down still protects this process;
        a mark is reported to a watcher once though both stores echo it."""
        store, shared, clock, failures = self.make(OPEN)
        seen: list = []
        store.watch(lambda key, until: seen.append((key, until)))
        store.mark("k1", 30.0)
        shared.down = True
        store.mark("k2", None)
        self.assertEqual(seen, [("k1", 30.0), ("k2", None)])
        self.assertEqual(self.successResultOf(store.marks(0.0)), {"k1": 30.0, "k2": None})
