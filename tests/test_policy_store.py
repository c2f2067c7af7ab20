"""
The in-memory policy store on a fake clock: fixed and moving windows,
parallel slots, all-or-nothing reservations, settling and releasing, key
health; and the window arithmetic.
"""

from __future__ import annotations

import calendar

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twisted_forward.policies.memory import SLOT_RETRY, MemoryStore
from twisted_forward.policies.store import (
    CONCURRENT,
    FIXED,
    MOVING,
    Bucket,
    IKeyHealth,
    IPolicyStore,
    IStoreInfo,
    Settlement,
    Verdict,
    key_id,
)
from twisted_forward.policies.windows import day_window, fixed_window, month_window


def fixed(id: str, limit: int, amount: int, now: float, seconds: float = 60.0) -> Bucket:
    start, length = fixed_window(now, seconds)
    return Bucket(id, FIXED, limit, amount, length, start)


def moving(id: str, limit: int, amount: int, seconds: float = 60.0) -> Bucket:
    return Bucket(id, MOVING, limit, amount, seconds)


def slots(id: str, limit: int, lease: float = 600.0) -> Bucket:
    return Bucket(id, CONCURRENT, limit, 1, lease)


class Reserve:
    """Runs the store's Deferreds (they fire at once) and returns results."""

    def __init__(self, case: SynchronousTestCase, store: MemoryStore) -> None:
        self.case = case
        self.store = store
        self.n = 0

    def __call__(self, buckets, now: float, name: str = "") -> tuple[str, Verdict]:
        self.n += 1
        name = name or f"r{self.n}"
        return name, self.case.successResultOf(self.store.reserve(name, buckets, now))

    def settle(self, name: str, pairs, now: float) -> None:
        self.case.successResultOf(
            self.store.settle(name, [Settlement(b, a) for b, a in pairs], now)
        )


class InterfaceTests(SynchronousTestCase):
    """The memory store provides the store interfaces."""

    def test_provides(self):
        """verifyObject accepts MemoryStore for every store interface."""
        store = MemoryStore()
        self.assertTrue(verifyObject(IPolicyStore, store))
        self.assertTrue(verifyObject(IKeyHealth, store))
        self.assertTrue(verifyObject(IStoreInfo, store))

    def test_bucket_end_and_key(self):
        """A bucket's end and counter key are worked out when it is made;
        buckets compare and hash by their six fields alone."""
        bucket = Bucket("a/rpm", FIXED, 10, 1, 60.0, 120.0)
        self.assertEqual((bucket.end, bucket.key), (180.0, ("a/rpm", 120.0)))
        same = Bucket("a/rpm", FIXED, 10, 1, 60.0, 120.0)
        self.assertEqual(bucket, same)
        self.assertEqual(hash(bucket), hash(same))
        self.assertNotEqual(bucket, Bucket("a/rpm", FIXED, 10, 2, 60.0, 120.0))
        self.assertNotIn("key", repr(bucket))

    def test_bucket_kind_checked(self):
        """A bucket of an unknown kind cannot be made."""
        self.assertRaises(ValueError, Bucket, "x", "sliding", 1, 1, 60.0)

    def test_key_id(self):
        """A key's store name is a short digest, stable and not the key."""
        self.assertEqual(key_id("sk-abc"), key_id("sk-abc"))
        self.assertNotEqual(key_id("sk-abc"), key_id("sk-abd"))
        self.assertEqual(len(key_id("sk-abc")), 16)
        self.assertNotIn("abc", key_id("sk-abc"))


class FixedWindowTests(SynchronousTestCase):
    """A fixed window holds ``limit`` until its end, then starts empty."""

    def setUp(self):
        self.store = MemoryStore()
        self.reserve = Reserve(self, self.store)

    def test_limit_then_refused_until_end(self):
        """Three of three pass, the fourth is refused with Retry-After to
        the window's end; the next window starts empty."""
        now = 1000.0  # window [960, 1020)
        for i in range(3):
            _, v = self.reserve([fixed("a/rpm", 3, 1, now)], now)
            self.assertTrue(v.granted)
            self.assertEqual(v.states[0].remaining, 2 - i)
            self.assertEqual(v.states[0].reset, 20.0)
        _, v = self.reserve([fixed("a/rpm", 3, 1, now + 5)], now + 5)
        self.assertFalse(v.granted)
        self.assertEqual(v.refused, 0)
        self.assertEqual(v.retry_after, 15.0)
        self.assertEqual(v.states[0].remaining, 0)
        later = 1020.0
        _, v = self.reserve([fixed("a/rpm", 3, 1, later)], later)
        self.assertTrue(v.granted)
        self.assertEqual(v.states[0].remaining, 2)

    def test_separate_ids(self):
        """Buckets of different ids do not share a count."""
        now = 0.0
        self.assertTrue(self.reserve([fixed("a/rpm", 1, 1, now)], now)[1].granted)
        self.assertTrue(self.reserve([fixed("b/rpm", 1, 1, now)], now)[1].granted)
        self.assertFalse(self.reserve([fixed("a/rpm", 1, 1, now)], now)[1].granted)

    def test_settle_replaces_reserved_amount(self):
        """Settling swaps the reserved tokens for the real ones."""
        now = 0.0
        b = fixed("a/tpm", 1000, 800, now)
        name, v = self.reserve([b], now)
        self.assertEqual(v.states[0].remaining, 200)
        self.reserve.settle(name, [(b, 100)], now + 1)
        _, v = self.reserve([fixed("a/tpm", 1000, 900, now)], now + 2)
        self.assertTrue(v.granted)
        self.assertEqual(v.states[0].remaining, 0)

    def test_release(self):
        """Settling with 0 gives the whole reservation back."""
        now = 0.0
        b = fixed("a/tpm", 1000, 1000, now)
        name, _ = self.reserve([b], now)
        self.assertFalse(self.reserve([fixed("a/tpm", 1000, 1, now)], now)[1].granted)
        self.reserve.settle(name, [(b, 0)], now)
        self.assertTrue(self.reserve([fixed("a/tpm", 1000, 1000, now)], now)[1].granted)

    def test_settle_after_window_end_touches_next_window_not(self):
        """A request settled after its window ended changes nothing in the
        next window: nothing leaks across."""
        b = fixed("a/tpm", 1000, 10, 59.0)
        name, _ = self.reserve([b], 59.0)
        self.reserve.settle(name, [(b, 5000)], 61.0)
        _, v = self.reserve([fixed("a/tpm", 1000, 1000, 61.0)], 61.0)
        self.assertTrue(v.granted)

    def test_overspend_counts(self):
        """Usage beyond the reservation is counted: the window is then full
        and refuses even a small request."""
        b = fixed("a/tpm", 1000, 10, 0.0)
        name, _ = self.reserve([b], 0.0)
        self.reserve.settle(name, [(b, 1500)], 1.0)
        _, v = self.reserve([fixed("a/tpm", 1000, 1, 0.0)], 2.0)
        self.assertFalse(v.granted)
        self.assertEqual(v.states[0].remaining, 0)

    def test_settle_twice_no_double_count(self):
        """Settling a reservation the store refused changes nothing."""
        b = fixed("a/tpm", 10, 10, 0.0)
        self.reserve([b], 0.0)
        name, v = self.reserve([b], 0.0)
        self.assertFalse(v.granted)
        # A refused reservation settled by mistake on a moving window:
        m = moving("a/m", 10, 10)
        self.reserve([m], 0.0)
        self.reserve.settle("never-granted", [(m, 0)], 1.0)
        self.assertFalse(self.reserve([moving("a/m", 10, 1)], 2.0)[1].granted)


class MovingWindowTests(SynchronousTestCase):
    """A moving window frees each amount ``seconds`` after it was taken."""

    def setUp(self):
        self.store = MemoryStore()
        self.reserve = Reserve(self, self.store)

    def test_frees_one_by_one(self):
        """Taken at 0, 10, 20 with limit 3: the fourth waits until 60, then
        one more fits, not two."""
        for t in (0.0, 10.0, 20.0):
            self.assertTrue(self.reserve([moving("a/rpm", 3, 1)], t)[1].granted)
        _, v = self.reserve([moving("a/rpm", 3, 1)], 30.0)
        self.assertFalse(v.granted)
        self.assertEqual(v.retry_after, 30.0)
        self.assertEqual(v.states[0].reset, 50.0)  # the newest frees at 80
        self.assertTrue(self.reserve([moving("a/rpm", 3, 1)], 60.0)[1].granted)
        self.assertFalse(self.reserve([moving("a/rpm", 3, 1)], 60.0)[1].granted)

    def test_no_boundary_burst(self):
        """Unlike a fixed window, a burst at the end of one minute and the
        start of the next is still one window."""
        for _ in range(3):
            self.assertTrue(self.reserve([moving("a/rpm", 3, 1)], 59.0)[1].granted)
        self.assertFalse(self.reserve([moving("a/rpm", 3, 1)], 61.0)[1].granted)

    def test_retry_after_for_large_amount(self):
        """Retry-After is when enough has expired for the whole amount."""
        self.reserve([moving("a/tpm", 100, 40)], 0.0)
        self.reserve([moving("a/tpm", 100, 40)], 10.0)
        _, v = self.reserve([moving("a/tpm", 100, 70)], 20.0)
        self.assertFalse(v.granted)
        self.assertEqual(v.retry_after, 50.0)  # after the second frees at 70

    def test_settle_and_release(self):
        """Settling changes the entry's amount; 0 removes it."""
        b = moving("a/tpm", 100, 90)
        name, _ = self.reserve([b], 0.0)
        self.reserve.settle(name, [(b, 30)], 1.0)
        self.assertTrue(self.reserve([moving("a/tpm", 100, 70)], 2.0)[1].granted)
        self.assertFalse(self.reserve([moving("a/tpm", 100, 1)], 3.0)[1].granted)

    def test_settle_after_expiry(self):
        """Settling an entry that already slid out of the window is a no-op."""
        b = moving("a/tpm", 100, 90)
        name, _ = self.reserve([b], 0.0)
        self.reserve.settle(name, [(b, 500)], 61.0)
        self.assertTrue(self.reserve([moving("a/tpm", 100, 100)], 61.0)[1].granted)


class SlotTests(SynchronousTestCase):
    """Parallel slots: held while in flight, freed on settle or lease end."""

    def setUp(self):
        self.store = MemoryStore()
        self.reserve = Reserve(self, self.store)

    def test_slots(self):
        """Two slots: a third request waits for one to be settled."""
        b = slots("a/par", 2)
        first, _ = self.reserve([b], 0.0)
        self.assertTrue(self.reserve([b], 0.0)[1].granted)
        _, v = self.reserve([b], 0.0)
        self.assertFalse(v.granted)
        self.assertEqual(v.retry_after, SLOT_RETRY)
        self.reserve.settle(first, [(b, 1)], 5.0)  # any amount frees a slot
        self.assertTrue(self.reserve([b], 5.0)[1].granted)

    def test_lease_expires(self):
        """A slot nobody settles frees itself when its lease ends."""
        b = slots("a/par", 1, lease=30.0)
        self.reserve([b], 0.0)
        self.assertFalse(self.reserve([b], 29.0)[1].granted)
        self.assertTrue(self.reserve([b], 30.0)[1].granted)


class AllOrNothingTests(SynchronousTestCase):
    """A reservation takes every bucket or none."""

    def setUp(self):
        self.store = MemoryStore()
        self.reserve = Reserve(self, self.store)

    def test_refusal_takes_nothing(self):
        """When the second bucket refuses, the first is not charged."""
        rpm = fixed("a/rpm", 10, 1, 0.0)
        _, v = self.reserve([rpm, fixed("a/tpm", 100, 101, 0.0)], 0.0)
        self.assertFalse(v.granted)
        self.assertEqual(v.refused, 1)
        self.assertEqual(v.states[0].remaining, 10)
        _, v = self.reserve([rpm], 0.0)
        self.assertEqual(v.states[0].remaining, 9)

    def test_full_bucket_refuses_zero_amount(self):
        """A spent quota refuses even a request that reserves nothing."""
        self.reserve([fixed("a/day", 5, 5, 0.0, 86400)], 0.0)
        _, v = self.reserve([fixed("a/day", 5, 0, 0.0, 86400)], 1.0)
        self.assertFalse(v.granted)

    def test_first_refusal_named_with_every_state(self):
        """Of several full buckets (a fixed window, a slot, a moving window)
        the first in order is named, with its Retry-After, and every
        bucket's state is reported; nothing is taken."""
        self.reserve([fixed("a/rpm", 5, 5, 0.0), slots("a/p", 1), moving("a/m", 2, 2)], 0.0)
        buckets = [fixed("a/tpm", 100, 1, 0.0), slots("a/p", 1), moving("a/m", 2, 1),
                   fixed("a/rpm", 5, 1, 0.0)]
        _, v = self.reserve(buckets, 10.0)
        self.assertFalse(v.granted)
        self.assertEqual(v.refused, 1)
        self.assertEqual(v.retry_after, SLOT_RETRY)
        self.assertEqual([s.remaining for s in v.states], [100, 0, 0, 0])
        self.assertEqual([s.reset for s in v.states], [50.0, 0.0, 50.0, 50.0])
        _, v = self.reserve([fixed("a/tpm", 100, 1, 0.0)], 10.0)
        self.assertEqual(v.states[0].remaining, 99)

    def test_same_window_twice(self):
        """A fixed window named twice in one reservation takes both amounts;
        each state says what is left after its own amount."""
        _, v = self.reserve([fixed("a/w", 10, 3, 0.0), fixed("a/w", 10, 3, 0.0)], 0.0)
        self.assertTrue(v.granted)
        self.assertEqual([s.remaining for s in v.states], [7, 7])
        _, v = self.reserve([fixed("a/w", 10, 5, 0.0)], 1.0)
        self.assertFalse(v.granted)
        _, v = self.reserve([fixed("a/w", 10, 4, 0.0)], 1.0)
        self.assertEqual(v.states[0].remaining, 0)

    def test_kind_spelled_by_another_string(self):
        """A bucket whose kind is an equal string but not the module's own
        object (as a bucket decoded from the supervisor's AMP box) counts
        the same."""
        kind = "".join(["fix", "ed"])
        self.assertIsNot(kind, FIXED)
        start, length = fixed_window(0.0, 60.0)
        bucket = Bucket("a/k", kind, 2, 1, length, start)
        self.assertTrue(self.reserve([bucket], 0.0)[1].granted)
        self.assertEqual(self.reserve([fixed("a/k", 2, 1, 0.0)], 1.0)[1].states[0].remaining, 0)
        self.assertFalse(self.reserve([bucket], 2.0)[1].granted)

    def test_concurrent_never_overshoot(self):
        """Ten reservations of 300 against 1000: exactly three are granted,
        whatever their settling order later."""
        granted = [
            self.reserve([fixed("a/tpm", 1000, 300, 0.0)], 0.0)[1].granted for _ in range(10)
        ]
        self.assertEqual(granted.count(True), 3)

    def test_sweep_forgets_over_windows(self):
        """sweep drops ended windows, empty moving windows and free slots."""
        self.reserve([fixed("a/rpm", 1, 1, 0.0), moving("a/m", 1, 1), slots("a/p", 1, 10.0)], 0.0)
        self.store.sweep(100.0)
        self.assertEqual(self.store._fixed, {})
        self.assertEqual(self.store._moving, {})
        self.assertEqual(self.store._slots, {})


class KeyHealthTests(SynchronousTestCase):
    """Key marks: rests expire, revocations stay, watchers hear of both."""

    def test_marks(self):
        """A rest shows until it ends; a revocation for good, not undone by
        a later rest."""
        store = MemoryStore()
        heard = []
        store.watch(lambda key, until: heard.append((key, until)))
        store.mark("k1", 50.0)
        store.mark("k2", None)
        store.mark("k2", 70.0)
        self.assertEqual(self.successResultOf(store.marks(10.0)), {"k1": 50.0, "k2": None})
        self.assertEqual(self.successResultOf(store.marks(50.0)), {"k2": None})
        self.assertEqual(heard, [("k1", 50.0), ("k2", None), ("k2", 70.0)])


class WindowTests(SynchronousTestCase):
    """Window arithmetic: epoch-aligned, UTC days and months."""

    def test_fixed(self):
        """A minute window starts on the minute."""
        self.assertEqual(fixed_window(125.5, 60.0), (120.0, 60.0))
        self.assertEqual(fixed_window(120.0, 120.0), (120.0, 120.0))

    def test_day(self):
        """A day starts at 00:00 UTC."""
        t = calendar.timegm((2026, 12, 2, 15, 0, 0))
        start, length = day_window(t)
        self.assertEqual(start, calendar.timegm((2026, 12, 2, 0, 0, 0)))
        self.assertEqual(length, 86400.0)

    def test_month(self):
        """December ends on January 1st of the next year; February 2028
        has 29 days."""
        start, length = month_window(calendar.timegm((2026, 12, 31, 23, 59, 59)))
        self.assertEqual(start, calendar.timegm((2026, 12, 1, 0, 0, 0)))
        self.assertEqual(start + length, calendar.timegm((2027, 1, 1, 0, 0, 0)))
        _, length = month_window(calendar.timegm((2028, 2, 10, 0, 0, 0)))
        self.assertEqual(length, 29 * 86400.0)


class ZeroLimitTests(SynchronousTestCase):
    """A limit of 0 refuses everything, even a request that takes nothing."""

    def test_zero(self):
        """rpm 0 or a zero quota: every reservation is refused."""
        store = MemoryStore()
        reserve = Reserve(self, store)
        self.assertFalse(reserve([fixed("a/rpm", 0, 1, 0.0)], 0.0)[1].granted)
        self.assertFalse(reserve([fixed("a/day", 0, 0, 0.0, 86400)], 0.0)[1].granted)
        self.assertFalse(reserve([moving("a/m", 0, 0)], 0.0)[1].granted)
