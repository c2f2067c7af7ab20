"""The batching ledger on a fake clock, writing to real SQLite files."""

from __future__ import annotations

import os
import sqlite3
from datetime import date, datetime, timezone
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twisted_forward.ledger import ILedger, UsageEntry, UsageRow, sql
from twisted_forward.ledger.batching import BatchingLedger
from twisted_forward.ledger.database import DirectDatabase


def at(text: str) -> float:
    """The POSIX time of an ISO UTC date-time."""
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


DAY1, DAY2 = date(2026, 12, 1), date(2026, 12, 2)


class BatchingTests(SynchronousTestCase):
    """Entries are summed in memory and written once a second, and at stop."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, sql.SQLITE_FILE)
        self.clock = Clock()
        self.clock.advance(at("2026-12-01T23:59:58"))
        self.ledger = self.make()
        self.ledger.startService()
        self.addCleanup(self.stop, self.ledger)

    def make(self, path: str = "", **kwargs: Any) -> BatchingLedger:
        return BatchingLedger(
            self.clock, DirectDatabase(sql.sqlite_dialect(path or self.path)), **kwargs
        )

    def stop(self, ledger: BatchingLedger) -> None:
        if ledger.running:
            self.successResultOf(ledger.stopService())

    def stored(self, group: str = "detail") -> list[UsageRow]:
        """What another connection reads from the file now."""
        return DirectDatabase(sql.sqlite_dialect(self.path)).run_blocking(
            lambda c: sql.select(c, sql.sqlite_dialect(self.path), DAY1, DAY2, group=group)
        )

    def entry(self, **kwargs: object) -> UsageEntry:
        fields: dict[str, object] = dict(
            time=self.clock.seconds(), key_label="alice", model="gpt-4o",
            prompt_tokens=3, completion_tokens=4, cost_usd=0.125, ttfb=0.5,
        )
        fields.update(kwargs)
        return UsageEntry(**fields)  # type: ignore[arg-type]  # fields of every type, by name

    def test_interface(self) -> None:
        """BatchingLedger provides ILedger."""
        self.assertTrue(verifyObject(ILedger, self.ledger))

    def test_schema_versioned(self) -> None:
        """Start-up creates the schema and records its version once."""
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("SELECT version FROM schema_version").fetchall(),
                             [(sql.SCHEMA_VERSION,)])
            self.assertEqual(db.execute("PRAGMA journal_mode").fetchone(), ("wal",))
        other = self.make()
        other.startService()
        self.addCleanup(self.stop, other)
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("SELECT COUNT(*) FROM schema_version").fetchone(), (1,))

    def test_batched_each_interval(self) -> None:
        """Nothing reaches the file before the interval; then one row sums the batch."""
        self.ledger.record(self.entry())
        self.ledger.record(self.entry(ttfb=None, error=True))
        self.assertEqual(self.stored(), [])
        self.clock.advance(1)
        [row] = self.stored()
        self.assertEqual((row.requests, row.errors, row.prompt_tokens, row.completion_tokens),
                         (2, 1, 6, 8))
        self.assertEqual((row.ttfb_sum, row.ttfb_count), (0.5, 1))
        self.assertAlmostEqual(row.cost_usd, 0.25)
        self.assertEqual(self.ledger.stats.written, 2)

    def test_adds_to_stored_rows(self) -> None:
        """A later batch adds to the row already stored."""
        self.ledger.record(self.entry())
        self.clock.advance(1)
        self.ledger.record(self.entry())
        self.clock.advance(0.5)
        self.ledger.record(self.entry())
        self.clock.advance(0.5)
        [row] = self.stored()
        self.assertEqual(row.requests, 3)

    def test_utc_day_boundary(self) -> None:
        """Exchanges either side of UTC midnight land in two day rows."""
        self.ledger.record(self.entry())  # 23:59:58
        self.clock.advance(2)
        self.ledger.record(self.entry())  # 00:00:00
        self.clock.advance(1)
        self.assertEqual([(r.day, r.requests) for r in self.stored("day")],
                         [("2026-12-01", 1), ("2026-12-02", 1)])

    def test_flush_on_stop(self) -> None:
        """Stopping the service writes the pending batch at once."""
        self.ledger.record(self.entry())
        self.successResultOf(self.ledger.stopService())
        self.assertEqual([r.requests for r in self.stored()], [1])

    def test_query_includes_pending(self) -> None:
        """A query writes the pending batch first, then reads it back grouped."""
        self.ledger.record(self.entry(key_label="bob"))
        self.ledger.record(self.entry(model="gpt-4o-mini"))
        rows = self.successResultOf(self.ledger.query(DAY1, DAY2, group="key"))
        self.assertEqual([(r.key_label, r.requests, r.model) for r in rows],
                         [("alice", 1, None), ("bob", 1, None)])
        rows = self.successResultOf(self.ledger.query(DAY1, DAY2, key="alice", group="model"))
        self.assertEqual([(r.model, r.requests) for r in rows], [("gpt-4o-mini", 1)])

    def test_two_writers(self) -> None:
        """Two ledgers on one file (as two workers) add up, neither lost nor doubled."""
        other = self.make()
        other.startService()
        self.addCleanup(self.stop, other)
        for _ in range(3):
            self.ledger.record(self.entry())
            other.record(self.entry())
        self.clock.advance(1)
        self.ledger.record(self.entry())
        self.clock.advance(1)
        [row] = self.stored()
        self.assertEqual(row.requests, 7)
        self.assertEqual(row.prompt_tokens, 21)

    def test_retention(self) -> None:
        """With a retention of N days, rows older than the last N UTC days (today included) go."""
        old = self.make(retention_days=3)  # at its first pass, today is 2026-12-02
        self.ledger.record(self.entry(time=at("2026-11-28T12:00:00")))
        self.ledger.record(self.entry(time=at("2026-11-30T12:00:00")))
        self.ledger.record(self.entry())
        self.clock.advance(1)
        old.startService()
        self.addCleanup(self.stop, old)
        self.clock.advance(1)
        with sqlite3.connect(self.path) as db:
            days = [d for (d,) in db.execute("SELECT day FROM usage_days ORDER BY day")]
        self.assertEqual(days, ["2026-11-30", "2026-12-01"])


class BrokenStoreTests(SynchronousTestCase):
    """A store that cannot be written keeps figures in memory, bounded, then catches up."""

    def test_degrade_and_recover(self) -> None:
        """Rows wait in memory while the directory is missing; past the bound new
        rows are dropped and counted; once the store works everything kept is written."""
        base = self.mktemp()
        path = os.path.join(base, "missing", sql.SQLITE_FILE)
        clock = Clock()
        clock.advance(at("2026-12-01T12:00:00"))
        drops: list[int] = []
        failures: list[None] = []
        ledger = BatchingLedger(clock, DirectDatabase(sql.sqlite_dialect(path)),
                                max_pending_rows=2, on_drop=drops.append,
                                on_failure=lambda: failures.append(None))
        ledger.startService()
        for label in ("a", "b", "a", "c"):
            ledger.record(UsageEntry(clock.seconds(), label, "m", prompt_tokens=1))
        clock.advance(1)
        clock.advance(1)
        self.assertEqual(ledger.stats.dropped, 1)
        self.assertEqual(drops, [1])
        self.assertGreaterEqual(len(failures), 2)
        self.assertEqual(ledger.stats.pending_rows, 2)
        os.makedirs(os.path.dirname(path))
        ledger.record(UsageEntry(clock.seconds(), "b", "m", prompt_tokens=1))
        clock.advance(1)
        self.assertEqual(ledger.stats.pending_rows, 0)
        rows = self.successResultOf(ledger.query(DAY1, DAY1, group="key"))
        self.assertEqual([(r.key_label, r.requests) for r in rows], [("a", 2), ("b", 2)])
        self.successResultOf(ledger.stopService())

    def test_newer_schema(self) -> None:
        """A ledger upgraded by a newer proxy is still written to."""
        path = os.path.join(self.mktemp())
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied TEXT)")
            for _version, statements in sql.MIGRATIONS:
                for statement in statements:
                    db.execute(statement)
            db.execute("INSERT INTO schema_version VALUES (?, 'x')", (sql.SCHEMA_VERSION + 1,))
        clock = Clock()
        ledger = BatchingLedger(clock, DirectDatabase(sql.sqlite_dialect(path)))
        ledger.startService()
        ledger.record(UsageEntry(0.0, "a", "m"))
        self.successResultOf(ledger.stopService())
        with sqlite3.connect(path) as db:
            self.assertEqual(db.execute("SELECT requests FROM usage_days").fetchall(), [(1,)])
