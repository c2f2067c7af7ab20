"""
The ledger's tables and statements, for SQLite and PostgreSQL alike.

Everything here is blocking and takes a DB-API cursor: the running proxy
calls it from a thread pool (:mod:`.database`), the command line calls it
directly.  One schema serves both databases (``BIGINT`` and ``DOUBLE
PRECISION`` mean what they should in each); the dialects differ only in
placeholders, transactions and how concurrent migrations are serialised.

Schema upgrades are versioned: :data:`MIGRATIONS` lists each version's
statements, ``schema_version`` holds the versions applied, and
:func:`migrate` applies the missing ones in one transaction at start-up.
Migrations only ever add, so an older proxy keeps working on a ledger a
newer one upgraded (it logs that the schema is newer than it knows).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import date
from typing import Any, Callable, Optional, Sequence

from .interfaces import DIMENSIONS, FIGURES, GROUP_DIMENSIONS, UsageRow
from .tally import Tally, check_group

#: The table of day rows.
TABLE = "usage_days"

#: (version, statements), in order.  Append; never edit a released entry.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        f"""CREATE TABLE {TABLE} (
            day TEXT NOT NULL,
            key_label TEXT NOT NULL,
            model TEXT NOT NULL,
            route TEXT NOT NULL,
            requests BIGINT NOT NULL DEFAULT 0,
            errors BIGINT NOT NULL DEFAULT 0,
            prompt_tokens BIGINT NOT NULL DEFAULT 0,
            completion_tokens BIGINT NOT NULL DEFAULT 0,
            cached_tokens BIGINT NOT NULL DEFAULT 0,
            cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
            request_bytes BIGINT NOT NULL DEFAULT 0,
            response_bytes BIGINT NOT NULL DEFAULT 0,
            ttfb_sum DOUBLE PRECISION NOT NULL DEFAULT 0,
            ttfb_count BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (day, key_label, model, route)
        )""",
        f"CREATE INDEX {TABLE}_key_day ON {TABLE} (key_label, day)",
        f"CREATE INDEX {TABLE}_model_day ON {TABLE} (model, day)",
    )),
)

#: The newest schema version this code knows.
SCHEMA_VERSION = MIGRATIONS[-1][0]

#: The ledger's SQLite file inside DATA_DIR.
SQLITE_FILE = "ledger.sqlite3"

#: Seconds a statement may wait: SQLite for the write lock, PostgreSQL to
#: connect and per statement.  Bounds every thread the ledger occupies.
STATEMENT_TIMEOUT = 5.0


class SchemaNewer(Exception):
    """The ledger was upgraded by a newer proxy; carries the version."""


@dataclass(frozen=True)
class Dialect:
    """How one database spells what differs.

    :ivar name: ``sqlite`` or ``postgresql``.
    :ivar connect: opens a new connection (blocking).
    :ivar where: a non-secret description for log lines (a path, or the
        URL's host and database without its password).
    """

    name: str
    connect: Callable[[], Any]
    where: str
    placeholder: str

    def begin(self, connection: Any, write: bool = True) -> None:
        """Start a transaction.  A SQLite write transaction takes the write
        lock now, so two writers queue instead of failing to upgrade a read
        lock; a read takes none (WAL readers never wait for writers)."""
        if self.name == "sqlite":
            connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def commit(self, connection: Any) -> None:
        """Commit the transaction :meth:`begin` started."""
        connection.commit()

    def rollback(self, connection: Any) -> None:
        """Abandon the transaction, leaving the connection usable."""
        connection.rollback()

    def lock_schema(self, cursor: Any) -> None:
        """Serialise migrations between processes (SQLite's BEGIN IMMEDIATE
        already does)."""
        if self.name == "postgresql":
            cursor.execute("SELECT pg_advisory_xact_lock(7370776402)")

    def sql(self, text: str) -> str:
        """``text`` with ``?`` placeholders in this dialect's style."""
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)


def sqlite_dialect(path: str) -> Dialect:
    """SQLite at ``path``, in WAL mode so several processes write to it."""

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(
            path, timeout=STATEMENT_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        connection.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous=NORMAL: a committed batch survives a crash of
        # the process; a power cut may lose the last second or so.
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    return Dialect("sqlite", connect, path, "?")


def postgresql_dialect(url: str) -> Dialect:
    """PostgreSQL at ``url`` (``postgresql://…``), through psycopg 3.

    :raises ImportError: when psycopg is not installed.
    """
    import psycopg  # here: a missing psycopg fails at start-up, not at the first write
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(url)
    where = f"postgresql {params.get('host', 'localhost')}/{params.get('dbname', '')}"

    def connect() -> Any:
        return psycopg.connect(
            url,
            connect_timeout=max(1, int(STATEMENT_TIMEOUT)),
            options=f"-c statement_timeout={int(STATEMENT_TIMEOUT * 1000)}",
            application_name="twisted-forward ledger",
        )

    return Dialect("postgresql", connect, where, "%s")


# ---------------------------------------------------------------- statements


def schema_version(cursor: Any) -> int:
    """The newest version applied (0 for an empty database)."""
    cursor.execute("SELECT MAX(version) FROM schema_version")
    row = cursor.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def schema_version_or_none(cursor: Any, dialect: Dialect) -> Optional[int]:
    """The schema version, None when the ledger has no tables yet (for
    readers, which never create them)."""
    if dialect.name == "sqlite":
        cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?",
                       (TABLE,))
    else:
        cursor.execute("SELECT to_regclass(%s)", (TABLE,))
    row = cursor.fetchone()
    if not row or row[0] is None:
        return None
    return schema_version(cursor)


def migrate(cursor: Any, dialect: Dialect) -> tuple[int, int]:
    """Apply the migrations this database lacks, inside the caller's
    transaction.

    :returns: the versions before and after.
    :raises SchemaNewer: when the database is newer than this code (after
        nothing was changed).
    """
    dialect.lock_schema(cursor)
    cursor.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        "version INTEGER PRIMARY KEY, applied TEXT NOT NULL)"
    )
    before = schema_version(cursor)
    if before > SCHEMA_VERSION:
        raise SchemaNewer(before)
    for version, statements in MIGRATIONS:
        if version <= before:
            continue
        for statement in statements:
            cursor.execute(statement)
        cursor.execute(
            dialect.sql("INSERT INTO schema_version (version, applied) VALUES (?, ?)"),
            (version, date.today().isoformat()),
        )
    return before, SCHEMA_VERSION


_COLUMNS = DIMENSIONS + FIGURES
_UPSERT = (
    f"INSERT INTO {TABLE} ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS)}) "
    f"ON CONFLICT ({', '.join(DIMENSIONS)}) DO UPDATE SET "
    + ", ".join(f"{f} = {TABLE}.{f} + excluded.{f}" for f in FIGURES)
)


def add(cursor: Any, dialect: Dialect, batch: Tally) -> None:
    """Add a batch's rows to the stored ones (an upsert adding deltas, so
    any number of writers add without losing or double-counting)."""
    params: Sequence[tuple[Any, ...]] = [
        tuple(getattr(row, c) for c in _COLUMNS)
        for row in sorted(batch.rows.values(), key=lambda r: (r.day, r.key_label, r.model, r.route))
    ]
    if params:
        # Sorted: two PostgreSQL writers lock rows in the same order (no deadlock).
        cursor.executemany(dialect.sql(_UPSERT), params)


def select(
    cursor: Any,
    dialect: Dialect,
    since: date,
    until: date,
    key: Optional[str] = None,
    model: Optional[str] = None,
    group: str = "key",
) -> list[UsageRow]:
    """The rows of days ``since``..``until`` (inclusive), summed by ``group``."""
    check_group(group)
    kept = GROUP_DIMENSIONS[group]
    kept_in_order = [d for d in DIMENSIONS if d in kept]
    where = ["day >= ?", "day <= ?"]
    params: list[Any] = [since.isoformat(), until.isoformat()]
    if key is not None:
        where.append("key_label = ?")
        params.append(key)
    if model is not None:
        where.append("model = ?")
        params.append(model)
    text = (
        f"SELECT {', '.join(kept_in_order)}, "
        + ", ".join(f"SUM({f})" for f in FIGURES)
        + f" FROM {TABLE} WHERE {' AND '.join(where)}"
        + f" GROUP BY {', '.join(kept_in_order)} ORDER BY {', '.join(kept_in_order)}"
    )
    cursor.execute(dialect.sql(text), params)
    rows = []
    for values in cursor.fetchall():
        dims = dict(zip(kept_in_order, values))
        figures = values[len(kept_in_order):]
        row = UsageRow(**dims)
        for name, value in zip(FIGURES, figures):
            kind = type(getattr(row, name))
            setattr(row, name, kind(value or 0))
        rows.append(row)
    return rows


def prune(cursor: Any, dialect: Dialect, before: date) -> int:
    """Delete the day rows older than ``before``; returns how many."""
    cursor.execute(dialect.sql(f"DELETE FROM {TABLE} WHERE day < ?"), (before.isoformat(),))
    return max(0, cursor.rowcount)
