"""
The in-memory ledger: for tests, and for a proxy told to keep no ledger
on disk (``LEDGER=memory``).  Its figures die with the process.
"""

from __future__ import annotations

from datetime import date
from typing import Optional

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from .interfaces import ILedger, LedgerStats, UsageEntry, UsageRow
from .tally import Tally, check_group, group_rows, select


@implementer(ILedger)
class MemoryLedger:
    """Every row in a dict; records and queries answer at once."""

    def __init__(self) -> None:
        self.tally = Tally()
        self.stats = LedgerStats(backend="memory")

    def record(self, entry: UsageEntry) -> None:
        """Add one exchange to its row."""
        self.stats.recorded += 1
        self.tally.add(entry)
        self.stats.written += 1

    def query(
        self,
        since: date,
        until: date,
        key: Optional[str] = None,
        model: Optional[str] = None,
        group: str = "key",
    ) -> "Deferred[list[UsageRow]]":
        """The rows of the days ``since``..``until`` (inclusive), grouped."""
        check_group(group)
        return succeed(group_rows(select(self.tally.rows.values(), since, until, key, model), group))

    def flush(self) -> "Deferred[None]":
        """Nothing is ever pending."""
        return succeed(None)
