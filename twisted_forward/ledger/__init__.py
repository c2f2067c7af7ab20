"""
The usage ledger: requests, tokens, cost, bytes and time to first byte per
key label × model × UTC day × route, durable in SQLite or PostgreSQL.

:class:`~.interfaces.ILedger` is the contract the exchange feeds and the
admin API and command line read; :class:`~.memory.MemoryLedger` keeps it in
memory.  See ``docs/ledger.md``.
"""

from .interfaces import (
    DIMENSIONS,
    FIGURES,
    GROUPS,
    ILedger,
    LedgerStats,
    UsageEntry,
    UsageRow,
    utc_day,
)
from .memory import MemoryLedger

__all__ = [
    "DIMENSIONS",
    "FIGURES",
    "GROUPS",
    "ILedger",
    "LedgerStats",
    "MemoryLedger",
    "UsageEntry",
    "UsageRow",
    "utc_day",
]
