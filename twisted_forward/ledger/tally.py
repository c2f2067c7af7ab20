"""
Adding entries into rows, and grouping rows for a query: the ledger's
arithmetic, shared by every store.
"""

from __future__ import annotations

from datetime import date
from typing import Any, Iterable, Optional

from .interfaces import DIMENSIONS, GROUP_DIMENSIONS, GROUPS, UsageEntry, UsageRow, utc_day

#: A stored row's identity: (day, key_label, model, route).
RowKey = tuple[str, str, str, str]


def row_key(entry: UsageEntry) -> RowKey:
    """The row an entry adds to: its UTC day, key label, model and route."""
    return (utc_day(entry.time), entry.key_label, entry.model, entry.route)


class Tally:
    """Rows keyed by :data:`RowKey`, added to in memory.

    The batching ledgers keep one as the batch waiting to be written; the
    memory ledger keeps one as its whole store.
    """

    def __init__(self) -> None:
        self.rows: dict[RowKey, UsageRow] = {}
        #: How many entries the rows hold.
        self.entries = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: object) -> bool:
        return key in self.rows

    def add(self, entry: UsageEntry, key: Optional[RowKey] = None) -> None:
        """Add one entry to its row (``key`` if already computed)."""
        key = row_key(entry) if key is None else key
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = UsageRow(*key)
        row.add_entry(entry)
        self.entries += 1

    def merge(self, other: "Tally") -> None:
        """Add another tally's rows (a batch that failed, put back)."""
        for key, delta in other.rows.items():
            row = self.rows.get(key)
            if row is None:
                self.rows[key] = delta.copy()
            else:
                row.add(delta)
        self.entries += other.entries

    def take(self) -> "Tally":
        """Hand over the rows as a new tally and start empty."""
        taken = Tally()
        taken.rows, taken.entries = self.rows, self.entries
        self.rows, self.entries = {}, 0
        return taken


def check_group(group: str) -> None:
    """:raises ValueError: for a group that is not one of :data:`GROUPS`."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {', '.join(GROUPS)}, not {group!r}")


def select(
    rows: Iterable[UsageRow],
    since: date,
    until: date,
    key: Optional[str] = None,
    model: Optional[str] = None,
) -> list[UsageRow]:
    """The rows within the days and filters of a query."""
    first, last = since.isoformat(), until.isoformat()
    return [
        row
        for row in rows
        if first <= (row.day or "") <= last
        and (key is None or row.key_label == key)
        and (model is None or row.model == model)
    ]


def group_rows(rows: Iterable[UsageRow], group: str) -> list[UsageRow]:
    """Sum ``rows`` over the dimensions ``group`` does not keep, sorted."""
    check_group(group)
    kept = GROUP_DIMENSIONS[group]
    out: dict[tuple[Optional[str], ...], UsageRow] = {}
    for row in rows:
        dims = tuple(getattr(row, d) if d in kept else None for d in DIMENSIONS)
        total = out.get(dims)
        if total is None:
            named: dict[str, Any] = dict(zip(DIMENSIONS, dims))
            total = out[dims] = UsageRow(**named)
        total.add(row)
    return [out[k] for k in sorted(out, key=lambda k: tuple(v or "" for v in k))]
