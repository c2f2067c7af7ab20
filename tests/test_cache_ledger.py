"""
A cache hit in the usage ledger: counted as an exchange, with zero upstream
tokens and no cost.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.ledger.feed import entry_from_record

from .test_ledger_feed import builtin_pricer


class CacheHitLedgerTests(SynchronousTestCase):
    """entry_from_record and the record's ``cache`` field."""

    record = {
        "time": "2026-12-02T12:00:00Z", "key_label": "team-a", "model": "gpt-4o-mini",
        "route": "/", "status": 200, "outcome": "complete",
        "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500},
    }

    def test_hit_counts_no_tokens(self) -> None:
        """The replayed answer's usage is not counted again, nor charged."""
        entry = entry_from_record(dict(self.record, cache="hit"), 0.0, builtin_pricer())
        self.assertEqual(
            (entry.prompt_tokens, entry.completion_tokens, entry.cached_tokens, entry.cost_usd),
            (0, 0, 0, 0),
        )
        self.assertFalse(entry.error)
        self.assertEqual(entry.key_label, "team-a")

    def test_miss_counts_its_tokens(self) -> None:
        """A miss (the upstream answered) counts its usage as any exchange."""
        entry = entry_from_record(dict(self.record, cache="miss"), 0.0, builtin_pricer())
        self.assertEqual((entry.prompt_tokens, entry.completion_tokens), (1000, 500))
        self.assertGreater(entry.cost_usd, 0)
