"""
The Redis policy store's batches and bounded waits, on a fake clock, with
txredisapi's own protocol on a StringTransport (the bytes it writes are
read back, the server's answers are fed in): the reservations of one turn
leave as one call, a wait is counted from when the call leaves, the answer
gets one more turn of the reactor when the wait runs out (more while
answers keep arriving), and a grant that arrives too late is given back.
The same behaviour against a real redis-server is in
``test_policy_redis_burst``.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.policies.redis_store import RedisStore
from twisted_forward.policies.store import FIXED, Bucket, StoreUnavailable

T0 = 1_800_000_000.0


class TurnClock(Clock):
    """A clock whose ``advance`` is one turn of a reactor: it runs the calls
    due when it starts; calls made meanwhile (``callLater(0)``) wait for
    the next ``advance``, as they wait for the reactor's next turn (and
    the I/O step before it)."""

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        now = self.seconds()
        due = sorted((c for c in self.calls if c.getTime() <= now), key=lambda c: c.getTime())
        for call in due:
            if call not in self.calls:
                continue  # cancelled by an earlier call of this turn
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


def rpm(limit: int = 10) -> Bucket:
    return Bucket("alice/rpm", FIXED, limit, 1, 60.0, T0)


class TimingTests(SynchronousTestCase):
    """One store, one connection; the test plays the server."""

    def setUp(self) -> None:
        self.clock = TurnClock()
        self.clock.advance(T0)
        self.protocol = txredisapi.RedisProtocol(convertNumbers=False)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.returned: list[int] = []
        self.store = RedisStore(lambda: self.protocol, self.clock, 0.5, gave_back=self.returned.append)

    def calls(self) -> int:
        """Script calls written so far (EVAL or EVALSHA)."""
        data = self.transport.value()
        return data.count(b"$4\r\nEVAL\r\n") + data.count(b"$7\r\nEVALSHA\r\n")

    def answer(self, *lines: str) -> None:
        """The server answers one BATCH call with these status lines."""
        self.protocol.dataReceived(
            b"*%d\r\n" % len(lines) + b"".join(b"+" + line.encode() + b"\r\n" for line in lines))

    def test_one_call_per_turn(self) -> None:
        """Three reservations asked in one turn leave as one call at the
        end of the turn, and each gets its own verdict."""
        ds = [self.store.reserve(f"r{i}", [rpm()], T0) for i in range(3)]
        self.assertEqual(self.calls(), 0)
        self.clock.advance(0)
        self.assertEqual(self.calls(), 1)
        self.answer("1 0 0 1 60000", "1 0 0 2 60000", "0 1 60000 10 60000")
        verdicts = [self.successResultOf(d) for d in ds]
        self.assertEqual([v.granted for v in verdicts], [True, True, False])
        self.assertEqual(verdicts[1].states[0].remaining, 8)
        self.assertEqual((verdicts[2].refused, verdicts[2].retry_after), (0, 60.0))
        self.assertEqual(set(self.store.open), {"r0", "r1"})

    def test_wait_counts_from_the_write(self) -> None:
        """The wait starts on the turn after the call is written (when its
        bytes leave); when it runs out the answer still gets one turn."""
        d = self.store.reserve("r", [rpm()], T0)
        self.clock.advance(0)  # the call is written
        self.clock.advance(0.3)  # a long turn before the bytes leave
        self.clock.advance(0.45)
        self.assertNoResult(d)
        self.clock.advance(0.05)  # 0.5 s since the wait began
        self.assertNoResult(d)
        self.answer("1 0 0 1 60000")  # read in that last turn's I/O
        self.clock.advance(0)
        self.assertTrue(self.successResultOf(d).granted)

    def test_no_answer_is_unavailable(self) -> None:
        """With no answer at all, the call errs with StoreUnavailable one
        turn after its wait ran out."""
        d = self.store.reserve("r", [rpm()], T0)
        self.clock.advance(0)
        self.clock.advance(0)
        self.clock.advance(0.5)
        self.assertNoResult(d)
        self.clock.advance(0)
        self.failureResultOf(d, StoreUnavailable)

    def test_answers_arriving_extend_the_grace(self) -> None:
        """While answers to earlier calls keep arriving, a later call
        queued behind them is not declared lost."""
        first = self.store.reserve("a", [rpm()], T0)
        self.clock.advance(0)
        second = self.store.reserve("b", [rpm()], T0)
        self.clock.advance(0)  # first's wait armed, second written
        self.clock.advance(0)  # second's wait armed
        self.clock.advance(0.5)  # both ran out
        self.answer("1 0 0 1 60000")  # the first's answer arrives
        self.clock.advance(0)  # grace: an answer arrived, one more turn
        self.assertTrue(self.successResultOf(first).granted)
        self.assertNoResult(second)
        self.answer("1 0 0 2 60000")
        self.clock.advance(0)
        self.assertTrue(self.successResultOf(second).granted)

    def test_a_late_grant_is_given_back(self) -> None:
        """A grant that arrives after the call erred is given back: a
        release of every bucket is sent at once."""
        d = self.store.reserve("late", [rpm()], T0)
        self.clock.advance(0)
        self.clock.advance(0)
        self.clock.advance(0.5)
        self.clock.advance(0)
        self.failureResultOf(d, StoreUnavailable)
        before = self.calls()
        self.answer("1 0 0 1 60000")
        self.assertEqual(self.returned, [1])
        self.clock.advance(0)
        self.assertEqual(self.calls(), before + 1)
        self.assertIn(b"\r\na late 1 1 f 1800000000000 1 0\r\n", self.transport.value())
        self.answer("0")
        self.assertNotIn("late", self.store.open)

    def test_settlements_join_the_turns_batch(self) -> None:
        """A settlement and a reservation asked in one turn are one call,
        applied in the order asked."""
        d = self.store.reserve("a", [rpm()], T0)
        self.clock.advance(0)
        self.answer("1 0 0 1 60000")
        self.successResultOf(d)
        settled = self.store.settle("a", [], T0)  # nothing to change: no call
        self.successResultOf(settled)
        from twisted_forward.policies.store import CONCURRENT, Settlement

        slot = Bucket("alice/parallel", CONCURRENT, 2, 1, 600.0)
        d = self.store.reserve("b", [slot], T0)
        self.clock.advance(0)
        self.answer("1 0 0 1 0")
        self.successResultOf(d)
        before = self.calls()
        s = self.store.settle("b", [Settlement(slot, 1)], T0)
        r = self.store.reserve("c", [rpm()], T0)
        self.clock.advance(0)
        self.assertEqual(self.calls(), before + 1)
        written = self.transport.value()
        self.assertLess(written.rindex(b"\r\na b 1 "), written.rindex(b"\r\nr c "))
        self.answer("0", "1 0 0 2 60000")
        self.successResultOf(s)
        self.assertTrue(self.successResultOf(r).granted)

    def test_close_leaves_nothing_on_the_clock(self) -> None:
        """A health poll waiting for an answer when the store closes is
        cancelled with its timers: nothing is left to fire."""
        self.store.watch(lambda key, until: None)
        self.clock.advance(1.0)  # the first poll
        self.clock.advance(0)  # its wait armed
        self.successResultOf(self.store.close())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def tearDown(self) -> Any:
        if self.store._renewer.running:
            self.store._renewer.stop()
