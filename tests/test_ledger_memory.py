"""The ledger's contract and arithmetic, on the in-memory ledger."""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twisted_forward.ledger import ILedger, MemoryLedger, UsageEntry, UsageRow, utc_day


def at(text: str) -> float:
    """The POSIX time of an ISO UTC date-time."""
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


class UtcDayTests(SynchronousTestCase):
    """Rows are cut at UTC midnight, whatever the local zone."""

    def test_day_boundary(self) -> None:
        """The last microsecond of a day and its midnight fall in different days."""
        self.assertEqual(utc_day(at("2026-12-01T23:59:59.999999")), "2026-12-01")
        self.assertEqual(utc_day(at("2026-12-02T00:00:00")), "2026-12-02")


class MemoryLedgerTests(SynchronousTestCase):
    """The in-memory ledger adds, filters and groups as the interface says."""

    def setUp(self) -> None:
        self.ledger = MemoryLedger()
        self.ledger.record(UsageEntry(at("2026-12-01T23:59:59"), "alice", "gpt-4o", "/",
                                      prompt_tokens=10, completion_tokens=5, cost_usd=0.5,
                                      response_bytes=100, ttfb=0.2))
        self.ledger.record(UsageEntry(at("2026-12-02T00:00:00"), "alice", "gpt-4o", "/",
                                      prompt_tokens=1, completion_tokens=2, cached_tokens=1,
                                      cost_usd=0.25, ttfb=0.4))
        self.ledger.record(UsageEntry(at("2026-12-02T10:00:00"), "bob", "gpt-4o-mini", "/",
                                      error=True, ttfb=None))

    def query(self, *args: Any, **kwargs: Any) -> list[UsageRow]:
        return self.successResultOf(self.ledger.query(*args, **kwargs))

    def test_interface(self) -> None:
        """MemoryLedger provides ILedger."""
        self.assertTrue(verifyObject(ILedger, self.ledger))

    def test_by_day(self) -> None:
        """Grouped by day, each UTC day sums its own exchanges."""
        rows = self.query(date(2026, 12, 1), date(2026, 12, 2), group="day")
        self.assertEqual([r.day for r in rows], ["2026-12-01", "2026-12-02"])
        self.assertEqual([r.requests for r in rows], [1, 2])
        self.assertEqual(rows[1].errors, 1)
        self.assertEqual(rows[1].prompt_tokens, 1)
        self.assertIsNone(rows[0].key_label)

    def test_by_key(self) -> None:
        """Grouped by key, a key's rows over several days are summed."""
        rows = self.query(date(2026, 12, 1), date(2026, 12, 2), group="key")
        self.assertEqual([r.key_label for r in rows], ["alice", "bob"])
        alice = rows[0]
        self.assertEqual((alice.requests, alice.total_tokens, alice.cached_tokens), (2, 18, 1))
        self.assertAlmostEqual(alice.cost_usd, 0.75)
        self.assertAlmostEqual(alice.ttfb_mean or 0, 0.3)
        self.assertIsNone(rows[1].ttfb_mean)

    def test_days_inclusive(self) -> None:
        """``since`` and ``until`` are both included; days outside are not."""
        rows = self.query(date(2026, 12, 2), date(2026, 12, 2), group="model")
        self.assertEqual([(r.model, r.requests) for r in rows],
                         [("gpt-4o", 1), ("gpt-4o-mini", 1)])

    def test_filters(self) -> None:
        """``key`` and ``model`` filter before grouping."""
        rows = self.query(date(2026, 12, 1), date(2026, 12, 2), key="alice", group="detail")
        self.assertEqual([(r.day, r.key_label, r.model, r.route) for r in rows],
                         [("2026-12-01", "alice", "gpt-4o", "/"),
                          ("2026-12-02", "alice", "gpt-4o", "/")])
        self.assertEqual(self.query(date(2026, 12, 1), date(2026, 12, 2),
                                    model="nope", group="key"), [])

    def test_bad_group(self) -> None:
        """An unknown group is refused at once."""
        self.assertRaises(ValueError, self.ledger.query, date(2026, 12, 1),
                          date(2026, 12, 2), group="colour")

    def test_as_dict(self) -> None:
        """A row's dict leaves out grouped-away dimensions and adds the derived figures."""
        row = self.query(date(2026, 12, 1), date(2026, 12, 1), group="key")[0].as_dict()
        self.assertNotIn("day", row)
        self.assertEqual(row["key_label"], "alice")
        self.assertEqual(row["total_tokens"], 15)
        self.assertEqual(row["ttfb_mean"], 0.2)
        self.assertEqual(self.ledger.stats.recorded, 3)
