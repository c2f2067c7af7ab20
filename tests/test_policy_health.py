"""
Default keys' health follows the shared store (KeyHealthLink), on a fake
clock with the in-memory store standing for the shared one.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.keys import DefaultKeys
from twisted_forward.policies.health import KeyHealthLink
from twisted_forward.policies.memory import MemoryStore
from twisted_forward.policies.store import key_id

SECRETS = ("sk-one-0123456789", "sk-two-0123456789", "sk-three-0123456789")


class LinkTests(SynchronousTestCase):
    """Two processes' keys linked through one store."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = MemoryStore()
        self.here = DefaultKeys(SECRETS, self.clock.seconds)
        self.there = DefaultKeys(SECRETS, self.clock.seconds)

    def link(self, keys: DefaultKeys) -> KeyHealthLink:
        link = KeyHealthLink(keys, SECRETS, self.store, self.clock)
        link.start()
        return link

    def test_a_revocation_reaches_the_other_process(self) -> None:
        """A key revoked here is revoked there; the store knows it by its
        digest only."""
        self.link(self.here)
        self.link(self.there)
        self.here.revoke(1)
        self.assertEqual(self.there.revoked, frozenset({1}))
        marks = self.successResultOf(self.store.marks(self.clock.seconds()))
        self.assertEqual(marks, {key_id(SECRETS[1]): None})
        self.assertNotIn(SECRETS[1], repr(marks))

    def test_a_rest_reaches_the_other_process_and_ends(self) -> None:
        """A key resting here for 30 s comes last there too, until the rest
        is over."""
        self.link(self.here)
        self.link(self.there)
        self.here.rest(0, 30)
        self.assertEqual(self.there.states()["resting"], 1)
        self.clock.advance(31)
        self.assertEqual(self.there.states()["resting"], 0)

    def test_a_process_starting_later_learns_the_marks(self) -> None:
        """Marks made before a process linked are read when it starts."""
        self.link(self.here)
        self.here.revoke(2)
        self.here.rest(0, 60)
        self.link(self.there)
        self.assertEqual(self.there.revoked, frozenset({2}))
        self.assertEqual(self.there.states(), {"active": 1, "resting": 1, "revoked": 1})

    def test_marks_of_keys_not_configured_here_are_ignored(self) -> None:
        """Another instance's keys (not ours) change nothing here."""
        self.link(self.here)
        self.store.mark(key_id("sk-elsewhere-0123456789"), None)
        self.assertEqual(self.here.revoked, frozenset())

    def test_what_another_process_found_is_logged_once_where_it_was_learnt(self) -> None:
        """The process that learns of a revocation logs it once, by the key's
        label; the process that found it logs nothing from the store."""
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.link(self.here)
        there = self.link(self.there)
        self.here.revoke(1)
        self.store.mark(key_id(SECRETS[1]), None)
        learnt = [e for e in events if e.get("log_namespace", "").startswith(
            "twisted_forward.policies.health") and "learnt" in str(e.get("log_format"))]
        self.assertEqual([e["log_logger"].source for e in learnt], [there])
        self.assertEqual(learnt[0]["state"], "leaves the rotation")
        self.assertEqual(learnt[0]["key"], self.there.label(1))
        self.assertNotIn(SECRETS[1], repr(learnt))
