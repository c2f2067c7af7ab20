"""
Opening the running proxy's ledger from its settings, and its metrics.

SQLite (the default) lives in ``DATA_DIR/ledger.sqlite3`` in WAL mode: with
``--workers N`` each worker writes its own batches to the same file, each
batch one short transaction of upserts that add, so nothing is lost or
counted twice and no process has to relay the others' figures.  (The
alternative, the supervisor as sole writer, would need every exchange sent
over a socket to it and a second code path for PostgreSQL; WAL lets
readers such as ``twisted-forward usage`` read while workers write.)
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..config import Config, ConfigError
from . import sql
from .batching import BatchingLedger
from .database import ThreadDatabase
from .interfaces import LedgerStats


def check_data_dir(config: Config) -> None:
    """Create DATA_DIR for a SQLite ledger and check it is writable (also
    the supervisor's check, before its workers open the ledger).

    :raises ConfigError: naming DATA_DIR.
    """
    if not config.ledger or config.database_url:
        return
    directory = config.ledger_dir
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"DATA_DIR (--data-dir): cannot create {directory} ({e.strerror})"
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"DATA_DIR (--data-dir): {directory} is not writable")


def open_ledger(config: Config, reactor: Any) -> Optional[BatchingLedger]:
    """The ledger the settings ask for (not started), None when LEDGER is off.

    :raises ConfigError: when DATA_DIR cannot hold the SQLite file.
    """
    if not config.ledger:
        return None
    check_data_dir(config)
    if config.database_url:
        dialect = sql.postgresql_dialect(config.database_url)
        database = ThreadDatabase(reactor, dialect, threads=2)
    else:
        dialect = sql.sqlite_dialect(os.path.join(config.ledger_dir, sql.SQLITE_FILE))
        database = ThreadDatabase(reactor, dialect, threads=1)
    return BatchingLedger(reactor, database, retention_days=config.ledger_retention_days)


class LedgerCollector:
    """Prometheus series of a ledger's own counters, read at each scrape."""

    def __init__(self, stats: LedgerStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        s = self.stats
        for name, help_text, value in (
            ("openai_forward_ledger_recorded", "Exchanges handed to the usage ledger.",
             s.recorded),
            ("openai_forward_ledger_written", "Exchanges whose figures the ledger stored.",
             s.written),
            ("openai_forward_ledger_dropped",
             "Exchanges the ledger dropped: its store was down past the pending bound.",
             s.dropped),
            ("openai_forward_ledger_write_failures", "Ledger writes the store refused.",
             s.write_failures),
        ):
            family = CounterMetricFamily(name, help_text, labels=["backend"])
            family.add_metric([s.backend], value)
            yield family
        gauge = GaugeMetricFamily(
            "openai_forward_ledger_pending_rows", "Ledger rows waiting to be written.",
            labels=["backend"],
        )
        gauge.add_metric([s.backend], s.pending_rows)
        yield gauge
