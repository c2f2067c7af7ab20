"""
The admin's parts on their own: the key check, live sampling on a fake
clock, reading chat records backwards, day parsing, default-key health,
the admin key refused by the key rules, and the settings.
"""

from __future__ import annotations

import json
import os
from datetime import date

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from twisted_forward.admin.api import BadParam, parse_day, usage_csv
from twisted_forward.admin.auth import AdminAuth
from twisted_forward.admin.exchanges import lines_backwards, recent_records
from twisted_forward.admin.live import LiveFigures, LiveTally, Totals, read_totals
from twisted_forward.chat.files import file_name
from twisted_forward.config import ConfigError, load_config
from twisted_forward.keys import DefaultKeys, ForwardKeys, KeyRules
from twisted_forward.ledger import ILedger, MemoryLedger, UsageEntry, UsageRow
from twisted_forward.metrics import Metrics

ADMIN = "admin-unit-key-0123456789"


def request_with(*authorization: bytes) -> DummyRequest:
    request = DummyRequest([b""])
    if authorization:
        request.requestHeaders.setRawHeaders(b"authorization", list(authorization))
    return request


class AuthTests(SynchronousTestCase):
    """The admin key check."""

    def test_only_one_bearer_admin_key(self):
        """Exactly ``Bearer <key>`` in one header passes; nothing else."""
        auth = AdminAuth(ADMIN)
        self.assertTrue(auth.allows(request_with(b"Bearer " + ADMIN.encode())))
        self.assertTrue(auth.allows(request_with(b"bearer  " + ADMIN.encode())))
        for values in ((), (b"Bearer",), (ADMIN.encode(),), (b"Bearer " + ADMIN.encode()[:-1],),
                       (b"Bearer " + ADMIN.encode() + b" x",),
                       (b"Bearer " + ADMIN.encode(), b"Bearer " + ADMIN.encode())):
            self.assertFalse(auth.allows(request_with(*values)), values)

    def test_repr_holds_no_key(self):
        """The object shows nothing of the key."""
        self.assertNotIn(ADMIN, repr(AdminAuth(ADMIN)))
        self.assertNotIn(ADMIN.encode(), repr(vars(AdminAuth(ADMIN))).encode())


class LiveTests(SynchronousTestCase):
    """Live figures sampled on a fake clock."""

    def test_rates_between_ticks(self):
        """Rates are the change since the last sample over the time elapsed;
        listeners get every sample; history keeps the last ones."""
        clock = Clock()
        totals = [Totals(0, 0, 0, 0)]
        live = LiveFigures(lambda: totals[0], clock, interval=1.0, history=3)
        got: list = []
        live.subscribe(got.append)
        live.start()
        self.assertEqual(got[0].requests_per_s, 0.0)
        totals[0] = Totals(requests=4, errors=1, tokens=100, open=2)
        clock.advance(1)
        clock.advance(1)
        self.assertEqual(got[1].requests_per_s, 4.0)
        self.assertEqual(got[1].tokens_per_s, 100.0)
        self.assertEqual(got[1].errors_per_s, 1.0)
        self.assertEqual(got[1].open_streams, 2)
        self.assertEqual(got[2].requests_per_s, 0.0)
        self.assertEqual(got[2].requests_total, 4)
        for _ in range(5):
            clock.advance(1)
        self.assertEqual(len(live.history), 3)
        live.unsubscribe(got.append)
        clock.advance(1)
        self.assertEqual(len(got), 8)
        live.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_failing_listener_dropped(self):
        """A listener that raises is dropped; the others still hear."""
        clock = Clock()
        live = LiveFigures(lambda: Totals(), clock)
        got: list = []

        def broken(sample):
            raise RuntimeError("gone")

        live.subscribe(broken)
        live.subscribe(got.append)
        live.tick()
        self.assertEqual(live.listeners, 1)
        self.assertEqual(len(got), 1)
        self.flushLoggedErrors(RuntimeError)

    def test_totals_from_metrics_and_tally(self):
        """Requests and errors come from the metrics (statuses of 400 and
        more, no answer, refusals), tokens from the tally."""
        metrics = Metrics()
        route = metrics.for_route("/")
        for status in (200, 200, 404, 0):
            route.started()
            route.ended(status, "alice", "complete", 0.1, 10)
        route.started()  # still open
        metrics.refusals.labels("invalid_api_key").inc()
        tally = LiveTally(MemoryLedger())
        tally.record(UsageEntry(time=0, prompt_tokens=5, completion_tokens=7))
        self.assertEqual(read_totals(metrics, tally), Totals(5, 3, 12, 1))

    def test_tally_is_a_ledger(self):
        """The tally passes entries and queries through to the ledger."""
        inner = MemoryLedger()
        tally = LiveTally(inner)
        verifyObject(ILedger, tally)
        verifyObject(ILedger, LiveTally(None))
        tally.record(UsageEntry(time=0, key_label="alice", prompt_tokens=1, error=True))
        self.assertEqual((tally.entries, tally.tokens, tally.errors), (1, 1, 1))
        rows = self.successResultOf(tally.query(date(1970, 1, 1), date(1970, 1, 1)))
        self.assertEqual([(r.key_label, r.requests) for r in rows], [("alice", 1)])
        self.assertEqual(self.successResultOf(LiveTally(None).query(date.today(), date.today())), [])


class RecordsTests(SynchronousTestCase):
    """Reading the newest chat records, backwards."""

    def write(self, directory: str, day: str, records: list, index: int = 0) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, file_name(day, index)), "ab") as f:
            for record in records:
                f.write(json.dumps(record).encode() + b"\n")

    def test_lines_backwards_across_blocks(self):
        """Every line, last first, whatever the block size."""
        path = self.mktemp()
        lines = [(f"line {i} " + "x" * (i * 7)).encode() for i in range(50)]
        with open(path, "wb") as f:
            f.write(b"\n".join(lines) + b"\n")
        for block in (1, 7, 64, 1 << 16):
            self.assertEqual([line for line, _ in lines_backwards(path, block)], lines[::-1])

    def test_newest_first_over_files(self):
        """Newer days and later rotation files first; filters apply."""
        directory = self.mktemp()
        self.write(directory, "2026-12-01", [{"request_id": "a", "key_label": "alice",
                                              "messages": [{"content": "Penguins"}]}])
        self.write(directory, "2026-12-02", [{"request_id": "b", "key_label": "bob"}])
        self.write(directory, "2026-12-02", [{"request_id": "c", "key_label": "alice"}], index=1)
        with open(os.path.join(directory, file_name("2026-12-02")), "ab") as f:
            f.write(b"not json\n")
        found = recent_records(directory, 10)
        self.assertEqual([r["request_id"] for r in found.records], ["c", "b", "a"])
        self.assertFalse(found.truncated)
        self.assertEqual([r["request_id"] for r in recent_records(directory, 2).records],
                         ["c", "b"])
        self.assertEqual([r["request_id"] for r in recent_records(directory, 9, key="alice").records],
                         ["c", "a"])
        self.assertEqual([r["request_id"] for r in recent_records(directory, 9, query="penguin").records],
                         ["a"])
        self.assertEqual([r["request_id"] for r in recent_records(directory, 9, request_id="b").records],
                         ["b"])
        self.assertEqual(recent_records(self.mktemp(), 5).records, [])

    def test_budget_bounds_a_search(self):
        """A search that finds nothing stops after its byte budget and says so."""
        directory = self.mktemp()
        self.write(directory, "2026-12-01", [{"request_id": str(i), "pad": "x" * 100}
                                             for i in range(2000)])
        found = recent_records(directory, 5, query="nowhere", budget=1 << 16)
        self.assertEqual(found.records, [])
        self.assertTrue(found.truncated)
        self.assertLessEqual(found.scanned, 1 << 17)


class DayTests(SynchronousTestCase):
    """Days in usage queries."""

    def test_forms(self):
        """ISO days, today, yesterday and Nd (N days ending today)."""
        today = date(2026, 12, 2)
        self.assertEqual(parse_day("since", "2026-11-30", today), date(2026, 11, 30))
        self.assertEqual(parse_day("since", "2026-11-30T10:00:00Z", today), date(2026, 11, 30))
        self.assertEqual(parse_day("since", "today", today), today)
        self.assertEqual(parse_day("since", "yesterday", today), date(2026, 12, 1))
        self.assertEqual(parse_day("since", "7d", today), date(2026, 11, 26))
        self.assertEqual(parse_day("since", "1d", today), today)
        for bad in ("0d", "soon", "2026-02-30", ""):
            with self.assertRaises(BadParam) as caught:
                parse_day("until", bad, today)
            self.assertEqual(caught.exception.param, "until")

    def test_csv(self):
        """CSV has the kept dimensions, every figure, and one line a row."""
        rows = [UsageRow(key_label="alice", requests=2, prompt_tokens=3, completion_tokens=4,
                         cost_usd=0.5)]
        text = usage_csv(rows, "key").decode()
        header, line = text.strip().split("\r\n")
        self.assertTrue(header.startswith("key_label,requests,errors,"))
        self.assertIn("total_tokens", header)
        self.assertTrue(line.startswith("alice,2,0,3,4,"))


class KeyHealthTests(SynchronousTestCase):
    """Default keys' health, and the admin key in the key rules."""

    def test_health_by_position(self):
        """ok, resting until a time (then ok again), revoked."""
        clock = Clock()
        keys = DefaultKeys(["sk-a-0000000000", "sk-b-1111111111", "sk-c-2222222222"],
                           clock.seconds)
        keys.rest(0, 30)
        keys.revoke(1)
        health = keys.health()
        self.assertEqual([(h.label, h.state, h.until) for h in health],
                         [("default#0", "resting", 30.0), ("default#1", "revoked", None),
                          ("default#2", "ok", None)])
        clock.advance(30)
        self.assertEqual(keys.health()[0].state, "ok")
        self.assertNotIn("sk-", repr(health))

    def test_admin_key_refused_by_key_rules(self):
        """The admin key, in any credential header, is refused and never
        passed on as the client's own key; other own keys still pass."""
        rules = KeyRules(DefaultKeys([], lambda: 0.0), ForwardKeys(()), reserved=(ADMIN,))
        for name, value in ((b"authorization", b"Bearer " + ADMIN.encode()),
                            (b"api-key", ADMIN.encode()), (b"x-api-key", ADMIN.encode())):
            decision = rules.decide(Headers({name: [value]}))
            self.assertIsNotNone(decision.refusal, name)
            self.assertEqual(decision.send, ())
        decision = rules.decide(Headers({b"authorization": [b"Bearer sk-own-key-123"]}))
        self.assertIsNone(decision.refusal)


class LimitsTests(SynchronousTestCase):
    """What remains of a key's limits, from the policy store."""

    def test_peek_takes_nothing(self):
        """The limits reader provides IKeyLimits, reports the limits of a
        key's policy, and leaves the store's counts as they were."""
        from twisted_forward.admin.limits import IKeyLimits, PolicyLimits
        from twisted_forward.policies.gate import PolicyGate
        from twisted_forward.policies.memory import MemoryStore
        from twisted_forward.policies.prices import Price, PriceTable
        from twisted_forward.policies.rules import KeyPolicy, Policies

        clock = Clock()
        clock.advance(1_800_000_000)
        store = MemoryStore()
        gate = PolicyGate(
            Policies(keys={"alice": KeyPolicy(rpm=3, tokens_per_day=100, max_parallel=1)}),
            store, PriceTable.load(None, Price(0.0, 0.0, 0.0)), clock,
        )
        limits = PolicyLimits(gate, clock)
        verifyObject(IKeyLimits, limits)
        for _ in range(5):
            got = self.successResultOf(limits.describe(["alice", "bob"]))
        self.assertEqual(got["bob"], {"policy": None, "remaining": None})
        self.assertEqual(got["alice"]["policy"],
                         {"rpm": 3, "max_parallel": 1, "tokens_per_day": 100})
        remaining = got["alice"]["remaining"]
        self.assertEqual(remaining["rpm"]["remaining"], 3)
        self.assertEqual(remaining["max_parallel"]["remaining"], 1)
        self.assertEqual(remaining["tokens_per_day"]["remaining"], 100)


class SettingsTests(SynchronousTestCase):
    """ADMIN_KEY and ADMIN_PORT."""

    def load(self, **env: str):
        return load_config({}, env)

    def test_admin_key_rules(self):
        """Long, printable, not fk-…, not another key; ADMIN_PORT needs it."""
        config = self.load(ADMIN_KEY=ADMIN, ADMIN_PORT="9001")
        self.assertEqual(config.admin_key, ADMIN)
        self.assertEqual(config.admin_port, "tcp:9001:backlog=1024")
        self.assertNotIn(ADMIN, repr(config))
        for env, needle in (
            (dict(ADMIN_KEY="short"), "ADMIN_KEY"),
            (dict(ADMIN_KEY="fk-" + "a" * 20), "ADMIN_KEY"),
            (dict(ADMIN_KEY="has space " + "a" * 20), "ADMIN_KEY"),
            (dict(ADMIN_KEY=ADMIN, OPENAI_API_KEY=ADMIN), "ADMIN_KEY"),
            (dict(ADMIN_PORT="9001"), "ADMIN_PORT"),
        ):
            with self.assertRaises(ConfigError) as caught:
                self.load(**env)
            self.assertIn(needle, str(caught.exception))
            self.assertNotIn(ADMIN, str(caught.exception))
