"""
The per-request work of the policy gate, cut where it can be done once: a
store that answers at once (memory) is asked with no Deferred in between,
a key's rules are looked up once per (label, level, path), the buckets that
are the same for every request of a window are made once per window, the
calendar month is worked out once per month, and the memory store keeps
its count of slots instead of summing them per request.  Each change keeps
the answers the slower path gave.
"""

from __future__ import annotations

import calendar

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_forward.policies import gate as gate_module
from twisted_forward.policies.memory import MemoryStore
from twisted_forward.policies.rules import KeyPolicy, Policies, Rate, RouteRate
from twisted_forward.policies.store import (
    CONCURRENT,
    Bucket,
    IImmediateStore,
    Settlement,
)

from .test_policy_gate import T0, GateTestCase, facts


@implementer(IImmediateStore)
class CountingStore:
    """A memory store that counts how it is asked."""

    def __init__(self) -> None:
        self.memory = MemoryStore()
        self.calls: list[str] = []

    def reserve(self, reservation, buckets, now) -> Deferred:
        self.calls.append("reserve")
        return self.memory.reserve(reservation, buckets, now)

    def reserve_now(self, reservation, buckets, now):
        self.calls.append("reserve_now")
        return self.memory.reserve_now(reservation, buckets, now)

    def settle(self, reservation, settlements, now) -> Deferred:
        self.calls.append("settle")
        return self.memory.settle(reservation, settlements, now)

    def settle_now(self, reservation, settlements, now) -> None:
        self.calls.append("settle_now")
        self.memory.settle_now(reservation, settlements, now)

    def close(self) -> Deferred:
        return self.memory.close()


class CountingPolicies(Policies):
    """Policies that count the rule lookups."""

    lookups = 0

    def policy_for(self, label):
        type(self).lookups += 1
        return super().policy_for(label)


class ImmediateStoreTests(GateTestCase):
    """A store that answers at once is asked directly."""

    def test_memory_store_provides_it(self):
        """The memory store provides IImmediateStore."""
        self.assertTrue(verifyObject(IImmediateStore, MemoryStore()))

    def test_asked_directly_and_settled_directly(self):
        """Admission and settlement use reserve_now and settle_now; the
        admission's Deferred has fired when admit returns."""
        store = CountingStore()
        gate = self.gate(Policies(keys={"alice": KeyPolicy(rpm=5, max_parallel=1)}), store)
        d = gate.admit(facts())
        self.assertTrue(d.called)
        admission = self.successResultOf(d)
        self.assertIsNone(admission.refusal)
        admission.finish(True)
        self.assertEqual(store.calls, ["reserve_now", "settle_now"])
        # The slot was given back: another request fits.
        self.assertIsNone(self.admit(gate, facts(n=2)).refusal)

    def test_a_store_set_later_is_asked_its_way(self):
        """Replacing the gate's store with one that does not answer at
        once makes the gate use its Deferreds."""
        from .test_policy_gate import BrokenStore

        gate = self.gate(Policies(keys={"alice": KeyPolicy(rpm=5)}))
        gate.store = BrokenStore(hang=True)
        d = gate.admit(facts())
        self.assertNoResult(d)
        self.assertEqual(len(gate.store.pending), 1)


class RouteCacheTests(GateTestCase):
    """A key's rules are looked up once per (label, level, path)."""

    def test_looked_up_once(self):
        """Three requests of one key on one path look its policy up once;
        another path looks it up again."""
        CountingPolicies.lookups = 0
        gate = self.gate(CountingPolicies(keys={"alice": KeyPolicy(rpm=10)}))
        for i in range(3):
            self.assertIsNone(self.admit(gate, facts(n=i)).refusal)
        self.assertEqual(CountingPolicies.lookups, 1)
        self.admit(gate, facts(n=9, path="/v1/embeddings"))
        self.assertEqual(CountingPolicies.lookups, 2)

    def test_bounded(self):
        """Past ROUTE_CACHE paths the memory starts again."""
        self.patch(gate_module, "ROUTE_CACHE", 3)
        gate = self.gate(Policies(keys={"alice": KeyPolicy(rpm=100)}))
        for i in range(7):
            self.admit(gate, facts(n=i, path=f"/v1/x{i}"))
            self.assertLessEqual(len(gate._routes), 3)

    def test_path_spellings_still_count_together(self):
        """The cache is by the path as sent, but a route's counter is by its
        one spelling: REQ_RATE_LIMIT 2/minute on the chat route, over three
        spellings of it, refuses the third."""
        rule = RouteRate("/v1/chat/completions", 0, (Rate(2, 60.0),))
        gate = self.gate(Policies(route_rates=(rule,)))
        paths = ["/v1/chat/completions", "/v1//chat/completions/", "/v1/chat%2Fcompletions"]
        codes = [self.admit(gate, facts(n=i, path=p, substituted=False, client_key="c")).refusal
                 for i, p in enumerate(paths)]
        self.assertIsNone(codes[0])
        self.assertIsNone(codes[1])
        self.assertEqual(codes[2].code, "rate_limit_exceeded")


class BucketReuseTests(GateTestCase):
    """Buckets that are the same for a whole window are made once."""

    def test_same_window_same_bucket(self):
        """Two requests in one minute draw on the very same rpm and slot
        buckets; the next minute's rpm bucket is a new one."""
        store = CountingStore()
        gate = self.gate(Policies(keys={"alice": KeyPolicy(rpm=100, max_parallel=5)}), store)
        seen: list[tuple[Bucket, ...]] = []
        original = store.memory.reserve_now

        def record(reservation, buckets, now):
            seen.append(tuple(buckets))
            return original(reservation, buckets, now)

        store.memory.reserve_now = record
        self.admit(gate, facts(n=1))
        self.clock.advance(10)
        self.admit(gate, facts(n=2))
        self.clock.advance(60)
        self.admit(gate, facts(n=3))
        self.assertIs(seen[0][0], seen[1][0])
        self.assertIs(seen[0][1], seen[1][1])
        self.assertIsNot(seen[1][0], seen[2][0])
        self.assertEqual(seen[2][0].start, T0 + 60)

    def test_bounded(self):
        """Past BUCKET_CACHE buckets the memory starts again."""
        self.patch(gate_module, "BUCKET_CACHE", 2)
        gate = self.gate(Policies(keys={"alice": KeyPolicy(rpm=100)}))
        for i in range(5):
            gate._bucket(f"k{i}/rpm", "fixed", 10, 1, 60.0, T0)
            self.assertLessEqual(len(gate._buckets), 2)


class MonthTests(GateTestCase):
    """The calendar month is worked out once and again when it ends."""

    def test_month_changes_at_its_end(self):
        """The last second of January is in January; the next is February."""
        gate = self.gate(Policies())
        end_of_january = float(calendar.timegm((2027, 1, 31, 23, 59, 59)))
        start, length = gate._month_window(end_of_january)
        self.assertEqual(start, float(calendar.timegm((2027, 1, 1, 0, 0, 0))))
        start, length = gate._month_window(end_of_january + 1)
        self.assertEqual((start, length), (end_of_january + 1, 28 * 86400.0))


class SlotCountTests(SynchronousTestCase):
    """The memory store's slots: a count kept, leases looked at when one
    may have ended."""

    def slot(self, limit: int = 2, lease: float = 100.0) -> Bucket:
        return Bucket("k/parallel", CONCURRENT, limit, 1, lease)

    def test_take_release_and_lease_end(self):
        """Two slots taken fill the bucket; a release frees one; a lease
        that ended frees its slot by itself."""
        store = MemoryStore()
        self.assertTrue(store.reserve_now("a", [self.slot()], 0.0).granted)
        self.assertTrue(store.reserve_now("b", [self.slot(lease=10.0)], 1.0).granted)
        refused = store.reserve_now("c", [self.slot()], 2.0)
        self.assertFalse(refused.granted)
        store.settle_now("a", [Settlement(self.slot(), 0)], 3.0)
        self.assertTrue(store.reserve_now("d", [self.slot()], 4.0).granted)
        self.assertFalse(store.reserve_now("e", [self.slot()], 5.0).granted)
        # b's lease ends at 11.
        self.assertTrue(store.reserve_now("f", [self.slot()], 11.0).granted)
        self.assertEqual(store._slots["k/parallel"].total, 2)
