"""
Running the ledger's blocking statements off the reactor thread.

:class:`ThreadDatabase` owns a small thread pool; each thread keeps its own
connection (opened on first use, dropped after an error so the next call
reconnects) and runs one transaction per call.  The reactor never waits on
the disk or the network: callers get a Deferred.  This is what
``twisted.enterprise.adbapi`` does, minus its global shutdown trigger (the
ledger must flush *before* the pool stops) and plus reconnecting after a
broken connection.

:class:`DirectDatabase` runs the same transactions in the calling thread:
for the command line (no reactor) and for tests on a fake clock.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from .sql import Dialect

T = TypeVar("T")


def _transaction(
    dialect: Dialect, connection: Any, work: Callable[[Any], T], write: bool = True
) -> T:
    """Run ``work(cursor)`` in one transaction on ``connection``."""
    dialect.begin(connection, write)
    cursor = connection.cursor()
    try:
        result = work(cursor)
        dialect.commit(connection)
        return result
    except BaseException:
        try:
            dialect.rollback(connection)
        except Exception:
            pass
        raise
    finally:
        try:
            cursor.close()
        except Exception:
            pass


class DirectDatabase:
    """One connection, used in the calling thread (blocking)."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.connection: Optional[Any] = None

    def run_blocking(self, work: Callable[[Any], T], write: bool = True) -> T:
        """``work(cursor)`` in one transaction; the result or the exception."""
        if self.connection is None:
            self.connection = self.dialect.connect()
        try:
            return _transaction(self.dialect, self.connection, work, write)
        except Exception:
            self.close()
            raise

    def run(self, work: Callable[[Any], T], write: bool = True) -> "Deferred[T]":
        """:meth:`run_blocking`, its outcome as a fired Deferred."""
        try:
            return succeed(self.run_blocking(work, write))
        except Exception:
            return fail()

    def start(self) -> None:
        """Nothing to start."""

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        if self.connection is not None:
            try:
                self.connection.close()
            except Exception:
                pass
            self.connection = None


class ThreadDatabase:
    """Transactions in a thread pool, one connection per thread.

    :param threads: pool size.  One is right for SQLite (one writer per
        process); PostgreSQL gets two, so a query need not wait behind a
        write.
    """

    def __init__(self, reactor: IReactorFromThreads, dialect: Dialect, threads: int = 1) -> None:
        self.reactor = reactor
        self.dialect = dialect
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="twisted-forward-ledger")
        self.local = threading.local()
        self.connections: list[Any] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        """Start the threads."""
        self.pool.start()

    def _work(self, work: Callable[[Any], T], write: bool) -> T:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.dialect.connect()
            self.local.connection = connection
            with self.lock:
                self.connections.append(connection)
        try:
            return _transaction(self.dialect, connection, work, write)
        except Exception:
            self.local.connection = None
            with self.lock:
                if connection in self.connections:
                    self.connections.remove(connection)
            try:
                connection.close()
            except Exception:
                pass
            raise

    def run(self, work: Callable[[Any], T], write: bool = True) -> "Deferred[T]":
        """``work(cursor)`` in one transaction on a pool thread (``write``:
        one that changes the ledger)."""
        return deferToThreadPool(self.reactor, self.pool, self._work, work, write)

    def close(self) -> None:
        """Stop the threads (after the work queued) and close the connections."""
        self.pool.stop()
        with self.lock:
            connections, self.connections = self.connections, []
        for connection in connections:
            try:
                connection.close()
            except Exception:
                pass


class Database(Protocol):
    """What the batching ledger needs of a database runner."""

    dialect: Dialect

    def start(self) -> None:
        """Get ready to run transactions."""

    def run(self, work: Callable[[Any], T], write: bool = True) -> "Deferred[T]":
        """``work(cursor)`` in one transaction."""

    def close(self) -> None:
        """Release threads and connections."""
