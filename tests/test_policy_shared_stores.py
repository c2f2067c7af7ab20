"""
The shared policy stores hold to the in-memory store's contract: the
``--workers`` supervisor's store (AMP over a real unix socket pair) and the
Redis store (a real redis-server).  Each scenario runs against every store,
with time given by the test.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from twisted_forward import redis_link
from twisted_forward.policies.amp_store import StoreHub, SupervisorStore
from twisted_forward.policies.memory import MemoryStore
from twisted_forward.policies.redis_store import RedisStore, connection
from twisted_forward.policies.store import (
    CONCURRENT,
    FIXED,
    MOVING,
    Bucket,
    IKeyHealth,
    IPolicyStore,
    IStoreInfo,
    Settlement,
)

from .redis_server import start_redis

#: The current minute: a store's ``close`` gives back reservations at the
#: real time, and only windows not over yet are given back.
T0 = float(int(time.time()) // 60 * 60)
DAY0 = float(int(time.time()) // 86400 * 86400)


def rpm(limit: int, start: float = T0) -> Bucket:
    return Bucket("alice/rpm", FIXED, limit, 1, 60.0, start)


def tpm(limit: int, amount: int, start: float = T0) -> Bucket:
    return Bucket("alice/tpm", FIXED, limit, amount, 60.0, start)


class StoreContract:
    """Scenarios every shared store passes; ``make_store`` gives a new
    client of one shared backend (two calls: two processes)."""

    timeout = 20

    def make_store(self) -> Any:
        raise NotImplementedError

    def test_interfaces(self) -> None:
        """The store provides the store, health and info interfaces."""
        store = self.make_store()
        verifyObject(IPolicyStore, store)
        verifyObject(IKeyHealth, store)
        verifyObject(IStoreInfo, store)

    @defer.inlineCallbacks
    def test_fixed_window_across_clients(self) -> Any:
        """Two clients share one window: exactly the limit is granted, the
        refusal says when the window ends, and the next window is fresh."""
        a, b = self.make_store(), self.make_store()
        verdicts = []
        for i in range(4):
            store = (a, b)[i % 2]
            verdicts.append((yield store.reserve(f"r{i}", [rpm(3)], T0 + i)))
        self.assertEqual([v.granted for v in verdicts], [True, True, True, False])
        self.assertEqual([v.states[0].remaining for v in verdicts[:3]], [2, 1, 0])
        self.assertEqual(verdicts[3].refused, 0)
        self.assertAlmostEqual(verdicts[3].retry_after, 57.0)
        self.assertAlmostEqual(verdicts[0].states[0].reset, 60.0)
        fresh = yield a.reserve("r9", [rpm(3, T0 + 60)], T0 + 60)
        self.assertTrue(fresh.granted)

    @defer.inlineCallbacks
    def test_all_or_nothing_and_settle(self) -> Any:
        """A refused reservation charges nothing; settling replaces the
        reserved amount by the real one, from another client's view too."""
        a, b = self.make_store(), self.make_store()
        first = yield a.reserve("r1", [rpm(10), tpm(100, 80)], T0)
        self.assertTrue(first.granted)
        refused = yield b.reserve("r2", [rpm(10), tpm(100, 30)], T0 + 1)
        self.assertEqual((refused.granted, refused.refused), (False, 1))
        self.assertEqual(refused.states[0].remaining, 9)
        self.assertEqual(refused.states[1].remaining, 20)
        yield a.settle("r1", [Settlement(rpm(10), 1), Settlement(tpm(100, 80), 25)], T0 + 2)
        fits = yield b.reserve("r3", [tpm(100, 75)], T0 + 3)
        self.assertTrue(fits.granted)
        self.assertEqual(fits.states[0].remaining, 0)
        over = yield b.reserve("r4", [tpm(100, 1)], T0 + 3)
        self.assertFalse(over.granted)

    @defer.inlineCallbacks
    def test_moving_window(self) -> Any:
        """Charges leave a moving window its length after they were made;
        the wait is until enough have left."""
        a, b = self.make_store(), self.make_store()

        def take(store: Any, name: str, amount: int, now: float) -> Any:
            return store.reserve(name, [Bucket("k/tpm", MOVING, 100, amount, 10.0)], now)

        self.assertTrue((yield take(a, "r1", 30, T0)).granted)
        self.assertTrue((yield take(b, "r2", 50, T0 + 4)).granted)
        refused = yield take(a, "r3", 60, T0 + 6)
        self.assertFalse(refused.granted)
        self.assertAlmostEqual(refused.retry_after, 8.0)
        self.assertFalse((yield take(b, "r4", 60, T0 + 10)).granted)
        self.assertTrue((yield take(b, "r5", 50, T0 + 10)).granted)
        yield b.settle("r2", [Settlement(Bucket("k/tpm", MOVING, 100, 50, 10.0), 10)], T0 + 10)
        self.assertTrue((yield take(a, "r6", 40, T0 + 10.5)).granted)
        self.assertFalse((yield take(a, "r7", 1, T0 + 10.5)).granted)

    @defer.inlineCallbacks
    def test_slots(self) -> Any:
        """max_parallel 2 across two clients: the third waits for a settle."""
        a, b = self.make_store(), self.make_store()
        slot = Bucket("k/parallel", CONCURRENT, 2, 1, 600.0)
        self.assertTrue((yield a.reserve("r1", [slot], T0)).granted)
        self.assertTrue((yield b.reserve("r2", [slot], T0)).granted)
        refused = yield a.reserve("r3", [slot], T0 + 1)
        self.assertFalse(refused.granted)
        self.assertGreater(refused.retry_after, 0)
        yield b.settle("r2", [Settlement(slot, 1)], T0 + 2)
        self.assertTrue((yield a.reserve("r4", [slot], T0 + 2)).granted)

    @defer.inlineCallbacks
    def test_settling_twice_changes_nothing(self) -> Any:
        """A second settle of the same reservation is ignored."""
        a = self.make_store()
        yield a.reserve("r1", [tpm(100, 80)], T0)
        yield a.settle("r1", [Settlement(tpm(100, 80), 30)], T0 + 1)
        yield a.settle("r1", [Settlement(tpm(100, 80), 30)], T0 + 2)
        self.assertTrue((yield a.reserve("r2", [tpm(100, 70)], T0 + 3)).granted)
        self.assertFalse((yield a.reserve("r3", [tpm(100, 1)], T0 + 3)).granted)

    @defer.inlineCallbacks
    def test_close_gives_back_open_reservations(self) -> Any:
        """A client that closes (a process shutting down) with reservations
        still open leaves nothing behind: its slot and tokens are free."""
        a, b = self.make_store(), self.make_store()
        slot = Bucket("k/parallel", CONCURRENT, 1, 1, 600.0)
        tokens = Bucket("k/tpd", FIXED, 100, 100, 86400.0, DAY0)
        moving = Bucket("k/tpm", MOVING, 100, 100, 60.0)
        self.assertTrue((yield a.reserve("r1", [slot, tokens, moving], T0)).granted)
        self.assertFalse((yield b.reserve("r2", [slot], T0 + 1)).granted)
        yield self.close_client(a)
        again = yield b.reserve("r3", [slot, tokens, moving], T0 + 2)
        self.assertTrue(again.granted, again)

    def close_client(self, store: Any) -> Any:
        return store.close()

    @defer.inlineCallbacks
    def test_key_health_reaches_every_client(self) -> Any:
        """A key one client marks is seen by the others, pushed to their
        watchers, and in ``marks``; a rest that is over is not."""
        a, b = self.make_store(), self.make_store()
        seen: list = []
        arrived: defer.Deferred = defer.Deferred()

        def watcher(key: str, until: Any) -> None:
            seen.append((key, until))
            if len(seen) == 2:
                arrived.callback(None)

        b.watch(watcher)
        yield a.mark("k1", None)
        yield a.mark("k2", T0 + 30)
        yield arrived
        self.assertEqual(sorted(seen, key=str), [("k1", None), ("k2", T0 + 30)])
        self.assertEqual((yield b.marks(T0)), {"k1": None, "k2": T0 + 30})
        self.assertEqual((yield b.marks(T0 + 31)), {"k1": None})


class SupervisorStoreTests(StoreContract, TestCase):
    """The ``--workers`` store: workers' clients talking to the
    supervisor's hub over real unix socket pairs."""

    def setUp(self) -> None:
        self.hub = StoreHub(MemoryStore(), reactor)

    def make_store(self) -> SupervisorStore:
        theirs = self.hub.pair(reactor)
        client = SupervisorStore(reactor, timeout=5.0)
        client.connect(reactor, theirs.detach())
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def test_a_dead_worker_gives_back_what_it_held(self) -> Any:
        """A worker whose connection drops without settling (it crashed)
        holds nothing afterwards."""
        before = set(self.hub.connections)
        a = self.make_store()
        (server,) = self.hub.connections - before
        b = self.make_store()
        slot = Bucket("k/parallel", CONCURRENT, 1, 1, 600.0)
        self.assertTrue((yield a.reserve("r1", [slot], T0)).granted)
        self.assertFalse((yield b.reserve("r2", [slot], T0)).granted)
        a.protocol.transport.abortConnection()
        yield server.gone
        self.assertEqual(server.open, {})
        self.assertTrue((yield b.reserve("r3", [slot], T0 + 1)).granted)

    @defer.inlineCallbacks
    def test_unavailable_when_the_supervisor_is_gone(self) -> Any:
        """With the connection gone, calls fail at once with StoreUnavailable."""
        from twisted_forward.policies.store import StoreUnavailable

        a = self.make_store()
        for server in list(self.hub.connections):
            server.transport.loseConnection()
        yield a.protocol.gone
        yield self.assertFailure(a.reserve("r1", [rpm(3)], T0), StoreUnavailable)


class RedisStoreTests(StoreContract, TestCase):
    """The Redis store on a real redis-server."""

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.server = yield start_redis(self)
        self.target = redis_link.parse_redis_url(self.server.url)

    def make_store(self) -> RedisStore:
        store = RedisStore(lambda: connection(self.target, 2.0), reactor, timeout=2.0)
        self.addCleanup(store.close)
        return store

    @defer.inlineCallbacks
    def test_unavailable_when_redis_is_down(self) -> Any:
        """With the server gone, a call fails within the timeout with
        StoreUnavailable, and works again once the server is back."""
        from twisted_forward.policies.store import StoreUnavailable

        store = RedisStore(lambda: connection(self.target, 0.3), reactor, timeout=0.3)
        self.addCleanup(store.close)
        self.assertTrue((yield store.reserve("r1", [rpm(3)], T0)).granted)
        yield self.server.kill()
        started = reactor.seconds()
        yield self.assertFailure(store.reserve("r2", [rpm(3)], T0 + 1), StoreUnavailable)
        self.assertLess(reactor.seconds() - started, 1.0)
