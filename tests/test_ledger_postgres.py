"""
The ledger on a real PostgreSQL: a throwaway cluster (tests/pg_cluster.py)
per test class, a fresh database per test.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from datetime import datetime, timezone
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from twisted_forward.cli import main
from twisted_forward.ledger import UsageEntry, sql
from twisted_forward.ledger.batching import BatchingLedger
from twisted_forward.ledger.database import ThreadDatabase
from twisted_forward.tap import Options, makeService

from .harness import ProxyTestCase, listeners, proxy_env
from .pg_cluster import Cluster

_databases = itertools.count(1)
ADMIN_DOWN = "admin-db-down-0123456789abcdef"
TODAY = datetime.now(timezone.utc).date()


class PostgresCase(TestCase):
    """Starts a cluster for each test (about 2 s: initdb with no fsync);
    :meth:`database` makes a fresh database in it."""

    def setUp(self) -> None:
        self.cluster = Cluster()
        self.addCleanup(self.cluster.stop)
        self.cluster.start()

    def database(self) -> str:
        """The URL of a new, empty database."""
        name = f"ledger_{next(_databases)}"
        self.cluster.execute(f"CREATE DATABASE {name}")
        return self.cluster.url.replace("/postgres?", f"/{name}?")

    def rows(self, url: str, statement: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(url, autocommit=True) as connection:
            return connection.execute(statement).fetchall()

    def ledger(self, url: str, **kwargs: Any) -> BatchingLedger:
        ledger = BatchingLedger(
            reactor, ThreadDatabase(reactor, sql.postgresql_dialect(url), threads=2), **kwargs
        )
        ledger.startService()
        self.addCleanup(lambda: ledger.stopService() if ledger.running else None)
        return ledger


class PostgresLedgerTests(PostgresCase):
    """The batching ledger's contract, on PostgreSQL."""

    @defer.inlineCallbacks
    def test_round_trip(self) -> None:
        """Entries written in a batch come back summed by key, model and day,
        the schema's version is recorded, and ``twisted-forward usage`` reads
        the rows."""
        url = self.database()
        ledger = self.ledger(url)
        now = datetime.now(timezone.utc).timestamp()
        ledger.record(UsageEntry(now, "a", "gpt-4o", prompt_tokens=3, completion_tokens=1,
                                 cost_usd=0.5, ttfb=0.1))
        ledger.record(UsageEntry(now, "a", "gpt-4o-mini", prompt_tokens=2, error=True))
        ledger.record(UsageEntry(now, "b", "gpt-4o", cached_tokens=0, response_bytes=9))
        by_key = yield ledger.query(TODAY, TODAY, group="key")
        self.assertEqual([(r.key_label, r.requests, r.errors, r.prompt_tokens)
                          for r in by_key], [("a", 2, 1, 5), ("b", 1, 0, 0)])
        by_model = yield ledger.query(TODAY, TODAY, key="a", group="model")
        self.assertEqual([(r.model, r.requests) for r in by_model],
                         [("gpt-4o", 1), ("gpt-4o-mini", 1)])
        self.assertAlmostEqual(by_model[0].cost_usd, 0.5)
        self.assertAlmostEqual(by_model[0].ttfb_mean or 0, 0.1)
        self.assertEqual(self.rows(url, "SELECT version FROM schema_version"),
                         [(sql.SCHEMA_VERSION,)])
        # The command line reads the same rows, with no proxy running.
        yield ledger.stopService()
        out, err = io.StringIO(), io.StringIO()
        status = main(["usage", "--database-url", url, "--env-file", os.devnull, "--csv",
                       "--since", "1d"], out, err)
        self.assertEqual((status, err.getvalue()), (0, ""))
        self.assertEqual([line.split(",")[:3] for line in out.getvalue().splitlines()],
                         [["key_label", "requests", "errors"], ["a", "2", "1"], ["b", "1", "0"]])

    @defer.inlineCallbacks
    def test_two_writers_and_concurrent_migration(self) -> None:
        """Two ledgers starting together on an empty database migrate once;
        their batches add up, none lost, none doubled."""
        url = self.database()
        first, second = self.ledger(url), self.ledger(url)
        now = datetime.now(timezone.utc).timestamp()
        for i in range(50):
            (first if i % 2 else second).record(
                UsageEntry(now, "team", "gpt-4o", prompt_tokens=1, completion_tokens=2))
            if i % 10 == 0:
                yield defer.gatherResults([first.flush(), second.flush()])
        yield first.stopService()
        yield second.stopService()
        self.assertEqual(self.rows(url, "SELECT COUNT(*) FROM schema_version"), [(1,)])
        self.assertEqual(
            self.rows(url, "SELECT requests, prompt_tokens, completion_tokens FROM usage_days"),
            [(50, 50, 100)])

    @defer.inlineCallbacks
    def test_store_down(self) -> None:
        """With nothing listening, writes fail fast, are counted, and the
        figures wait in memory; a query fails instead of hanging."""
        url = self.cluster.url.replace(f"host={self.cluster.dir}", "host=/nonexistent")
        ledger = self.ledger(url)
        ledger.record(UsageEntry(0.0, "a", "m"))
        yield ledger.flush()
        self.assertGreaterEqual(ledger.stats.write_failures, 1)
        self.assertEqual(ledger.stats.pending_rows, 1)
        yield self.assertFailure(ledger.query(TODAY, TODAY), Exception)


class TwoProxiesTests(PostgresCase, ProxyTestCase):
    """Two proxy instances share one PostgreSQL ledger."""

    def setUp(self) -> None:
        PostgresCase.setUp(self)
        ProxyTestCase.setUp(self)

    def start_second(self, url: str) -> Any:
        options = Options()
        options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--env-file", "/dev/null"])
        service = makeService(options, reactor=reactor, environ=proxy_env(
            self.upstream_port, DATABASE_URL=url, FORWARD_KEY="two:fk-two-0123456789abcdef",
            OPENAI_API_KEY="sk-two-default-0123456789"))
        [listener] = listeners(service)
        service.startService()
        port = listener.endpoint.port
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return defer.succeed((service, f"http://127.0.0.1:{port.getHost().port}"))

    @defer.inlineCallbacks
    def test_two_instances_one_ledger(self) -> None:
        """Requests through either proxy land in the same rows, counted once."""
        url = self.database()
        yield self.start_proxy(DATABASE_URL=url, FORWARD_KEY="two:fk-two-0123456789abcdef",
                               OPENAI_API_KEY="sk-two-default-0123456789")
        second, second_base = yield self.start_second(url)
        body = json.dumps({"model": "gpt-4o-mini",
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        headers = {b"content-type": [b"application/json"],
                   b"authorization": [b"Bearer fk-two-0123456789abcdef"]}
        for base in (self.base, second_base, self.base):
            response = yield self.client.post(base + "/v1/chat/completions", data=body,
                                              headers=headers)
            self.assertEqual(response.code, 200)
            yield response.content()
        yield self.service.stopService()
        yield second.stopService()
        self.assertEqual(
            self.rows(url, "SELECT key_label, model, requests, prompt_tokens, completion_tokens "
                           "FROM usage_days"),
            [("two", "gpt-4o-mini", 3, 15, 9)])


class AdminWhileDatabaseDownTests(PostgresCase, ProxyTestCase):
    """The admin usage API while PostgreSQL is down: the documented 503,
    one log line when it starts and one when it ends, no traceback."""

    def setUp(self) -> None:
        PostgresCase.setUp(self)
        ProxyTestCase.setUp(self)

    @defer.inlineCallbacks
    def usage(self) -> Any:
        response = yield self.client.get(
            self.url("/_admin/api/usage"),
            headers={b"authorization": [b"Bearer " + ADMIN_DOWN.encode()]})
        return response.code, json.loads((yield response.content()))

    @defer.inlineCallbacks
    def test_one_line_per_state_change(self) -> None:
        """Usage read (200); database stopped: three requests get 503
        admin_unavailable, counted, and the log has one error line naming
        the cause and no traceback; database back: 200 and one line saying
        so."""
        from twisted.logger import LogLevel, formatEvent, globalLogPublisher

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        yield self.start_proxy(DATABASE_URL=self.database(), ADMIN_KEY=ADMIN_DOWN)
        code, _ = yield self.usage()
        self.assertEqual(code, 200)

        self.cluster.halt()
        for _ in range(3):
            code, body = yield self.usage()
            self.assertEqual(code, 503)
            self.assertEqual(body["error"]["code"], "admin_unavailable")
        admin = [e for e in events if "admin API" in formatEvent(e)]
        self.assertEqual(len(admin), 1, [formatEvent(e) for e in admin])
        self.assertEqual(admin[0]["log_level"], LogLevel.error)
        self.assertRegex(formatEvent(admin[0]),
                         r"^admin API: cannot read the figures \(\w+: .+\); answering 503")
        self.assertFalse([e for e in events if "log_failure" in e
                          and "admin" in e.get("log_namespace", "")])
        response = yield self.client.get(
            self.url("/metrics"), headers={b"authorization": [b"Bearer " + ADMIN_DOWN.encode()]})
        text = (yield response.content()).decode()
        self.assertIn('openai_forward_admin_refusals_total{reason="admin_unavailable"} 3.0', text)

        self.cluster.resume()
        code, _ = yield self.usage()
        self.assertEqual(code, 200)
        admin = [formatEvent(e) for e in events if "admin API" in formatEvent(e)]
        self.assertEqual(admin[1:], ["admin API: the figures can be read again"])
