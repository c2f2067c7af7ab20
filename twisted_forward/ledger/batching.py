"""
The durable ledger: entries summed in memory, written in batches.

:meth:`BatchingLedger.record` only adds to an in-memory :class:`~.tally.Tally`
(no I/O on the hot path).  Every ``interval`` seconds the batch is handed to
the database as one transaction of upserts that *add* each row's figures,
so any number of processes write to one ledger without losing or counting
twice.  Stopping the service writes the last batch (twistd stops services
on SIGTERM, before the reactor goes).

A broken store degrades, never blocks: a batch that fails is put back and
tried again next time; while the store stays down the pending rows grow
(entries for a row already pending cost nothing) up to ``max_pending_rows``,
after which entries for new rows are dropped and counted
(``LedgerStats.dropped``, the ``openai_forward_ledger_dropped`` metric).
Requests are never refused nor delayed because of the ledger.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from . import sql
from .database import Database
from .interfaces import ILedger, LedgerStats, UsageEntry, UsageRow
from .tally import Tally, check_group, row_key

#: Seconds between two writes.
DEFAULT_INTERVAL = 1.0
#: Rows kept in memory while the store is down, before entries are dropped.
DEFAULT_MAX_PENDING_ROWS = 10000
#: Seconds between two retention passes.
PRUNE_EVERY = 3600.0


@implementer(ILedger)
class BatchingLedger(Service):
    """An :class:`ILedger` writing to SQLite or PostgreSQL in batches.

    :param clock: for the write timer and "today" (retention).
    :param database: runs the transactions (a thread pool in the proxy).
    :param retention_days: day rows older than this many days are deleted
        (hourly); 0 keeps them all.
    :param on_drop: called with the number of entries dropped (a metric).
    :param on_failure: called once per failed write (a metric).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        database: Database,
        interval: float = DEFAULT_INTERVAL,
        max_pending_rows: int = DEFAULT_MAX_PENDING_ROWS,
        retention_days: int = 0,
        on_drop: Optional[Callable[[int], None]] = None,
        on_failure: Optional[Callable[[], None]] = None,
    ) -> None:
        self.clock = clock
        self.database = database
        self.dialect = database.dialect
        self.interval = interval
        self.max_pending_rows = max_pending_rows
        self.retention_days = retention_days
        self.on_drop = on_drop
        self.on_failure = on_failure
        self.pending = Tally()
        self.stats = LedgerStats(backend=self.dialect.name)
        self.lock = DeferredLock()
        #: The schema is in place (migrations applied).
        self.migrated = False
        self.loop: Optional[LoopingCall] = None
        self.last_prune = float("-inf")
        self.failing = False

    # ------------------------------------------------------------ lifetime

    def startService(self) -> None:
        """Start the database, apply migrations, start the write timer."""
        super().startService()
        self.log.info("usage ledger: {backend} at {where}",
                      backend=self.dialect.name, where=self.dialect.where)
        self.database.start()
        self.lock.run(self._migrate)
        self.loop = LoopingCall(self._tick)
        self.loop.clock = self.clock
        self.loop.start(self.interval, now=False).addErrback(
            lambda f: self.log.failure("ledger write timer stopped", f)
        )

    def _migrate(self) -> "Deferred[None]":
        def done(versions: tuple[int, int]) -> None:
            self.migrated = True
            before, after = versions
            if before != after:
                self.log.info(
                    "ledger schema {before} -> {after} ({where})",
                    before=before, after=after, where=self.dialect.where,
                )

        def failed(failure: Any) -> None:
            if failure.check(sql.SchemaNewer):
                self.migrated = True
                self.log.warn(
                    "ledger schema version {found} is newer than this proxy knows "
                    "({known}); writing on (migrations only add)",
                    found=failure.value.args[0], known=sql.SCHEMA_VERSION,
                )
                return
            self._failed(
                "ledger: cannot prepare the schema at {where}: {error}; "
                "keeping figures in memory and trying again",
                failure,
            )

        return self.database.run(lambda c: sql.migrate(c, self.dialect)).addCallbacks(
            done, failed
        )

    @inlineCallbacks
    def stopService(self) -> Any:
        """Stop the timer, write what is pending, release the database."""
        super().stopService()
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        yield self.flush()
        if len(self.pending):
            self.log.error(
                "ledger: {rows} row(s) ({entries} exchanges) could not be written at exit",
                rows=len(self.pending), entries=self.pending.entries,
            )
        self.database.close()

    # ------------------------------------------------------------ writing

    def record(self, entry: UsageEntry) -> None:
        """Add one exchange to the pending batch (never blocks nor raises)."""
        try:
            self.stats.recorded += 1
            key = row_key(entry)
            if key not in self.pending and len(self.pending) >= self.max_pending_rows:
                self._drop(1)
                return
            self.pending.add(entry, key)
            self.stats.pending_rows = len(self.pending)
        except Exception:
            self.log.failure("ledger: could not record an exchange")

    def _drop(self, count: int) -> None:
        self.stats.dropped += count
        if self.on_drop is not None:
            self.on_drop(count)

    def _tick(self) -> None:
        if not self.lock.locked:
            self.flush()

    def flush(self) -> "Deferred[None]":
        """Write the pending batch (after any write in progress)."""
        return self.lock.run(self._write)

    def _write(self) -> "Deferred[None]":
        if not self.migrated:
            # The store was down at start: prepare the schema first.
            return self._migrate().addCallback(lambda _: self._write_batch())
        return self._write_batch()

    def _write_batch(self) -> "Deferred[None]":
        if not self.migrated:
            return succeed(None)  # still no schema: keep the batch
        prune_before = self._prune_day()
        if not len(self.pending) and prune_before is None:
            return succeed(None)
        batch = self.pending.take()
        self.stats.pending_rows = 0

        def work(cursor: Any) -> int:
            sql.add(cursor, self.dialect, batch)
            if prune_before is not None:
                return sql.prune(cursor, self.dialect, prune_before)
            return 0

        def written(pruned: int) -> None:
            self.stats.written += batch.entries
            if prune_before is not None:
                self.last_prune = self.clock.seconds()
                if pruned:
                    self.log.info("ledger: deleted {rows} day row(s) past retention",
                                  rows=pruned)
            if self.failing:
                self.failing = False
                self.log.info("ledger: writing again to {where}", where=self.dialect.where)

        def failed(failure: Any) -> None:
            self._failed(
                "ledger: writing to {where} failed: {error}; keeping up to {bound} "
                "row(s) in memory and trying again",
                failure,
            )
            self.pending.merge(batch)  # the transaction rolled back: nothing was added
            self.stats.pending_rows = len(self.pending)

        return self.database.run(work).addCallbacks(written, failed)

    def _failed(self, event: str, failure: Any) -> None:
        """Count a failed store call; log ``event`` once per outage, not per call."""
        self.stats.write_failures += 1
        if self.on_failure is not None:
            self.on_failure()
        if not self.failing:
            self.failing = True
            self.log.error(
                event, where=self.dialect.where, error=_describe(failure.value),
                bound=self.max_pending_rows,
            )

    def _prune_day(self) -> Optional[date]:
        """The first day to keep, when a retention pass is due."""
        if not self.retention_days:
            return None
        now = self.clock.seconds()
        if now - self.last_prune < PRUNE_EVERY:
            return None
        today = datetime.fromtimestamp(now, timezone.utc).date()
        return today - timedelta(days=self.retention_days - 1)

    # ------------------------------------------------------------ reading

    def query(
        self,
        since: date,
        until: date,
        key: Optional[str] = None,
        model: Optional[str] = None,
        group: str = "key",
    ) -> "Deferred[list[UsageRow]]":
        """The stored rows (pending ones written first), grouped."""
        check_group(group)

        def read(_: object) -> "Deferred[list[UsageRow]]":
            return self.database.run(
                lambda c: sql.select(c, self.dialect, since, until, key, model, group),
                write=False,
            )

        return self.flush().addCallback(read)


def _describe(error: BaseException) -> str:
    """A one-line, secret-free description of a database error.

    Drivers' messages name hosts, files and SQL, never the password (psycopg
    leaves it out of its connection errors); the first line is enough.
    """
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
