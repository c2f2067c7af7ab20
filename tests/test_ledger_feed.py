"""Turning exchanges into ledger entries: from chat records and counting taps."""

from __future__ import annotations

import io

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from twisted_forward.chat.recorder import ChatRecorder, ExchangeInfo, FanOut, RequestBody
from twisted_forward.ledger import MemoryLedger
from twisted_forward.ledger.feed import (
    CountingRecorder,
    Pricer,
    entry_from_record,
    feeding_recorder,
    usage_tokens,
)
from twisted_forward.policies.prices import Price, PriceTable, builtin_prices


def builtin_pricer() -> Pricer:
    """The built-in price table, unknown models free."""
    return PriceTable(builtin_prices(), Price(0.0, 0.0, 0.0)).cost_usd


class UsageTokensTests(SynchronousTestCase):
    """Every usage spelling the upstream uses gives its tokens."""

    def test_chat_usage(self) -> None:
        """Chat completions: prompt, completion and cached prompt tokens."""
        self.assertEqual(usage_tokens({"prompt_tokens": 10, "completion_tokens": 4,
                                       "prompt_tokens_details": {"cached_tokens": 6}}),
                         (10, 4, 6))

    def test_responses_usage(self) -> None:
        """The Responses API's input/output names."""
        self.assertEqual(usage_tokens({"input_tokens": 7, "output_tokens": 2,
                                       "input_tokens_details": {"cached_tokens": 1}}),
                         (7, 2, 1))

    def test_garbage(self) -> None:
        """Missing, negative, boolean or non-numeric counts are zero."""
        self.assertEqual(usage_tokens(None), (0, 0, 0))
        self.assertEqual(usage_tokens({"prompt_tokens": -3, "completion_tokens": True,
                                       "prompt_tokens_details": "x"}), (0, 0, 0))


class EntryFromRecordTests(SynchronousTestCase):
    """A chat record becomes one entry with its day, key, model and figures."""

    def test_fields(self) -> None:
        """Time, labels, tokens, cost, bytes and ttfb are taken from the record."""
        entry = entry_from_record({
            "time": "2026-12-01T23:59:59.500Z", "key_label": "team", "model": "gpt-4o",
            "route": "/openai", "status": 200, "outcome": "complete",
            "usage": {"prompt_tokens": 1000, "completion_tokens": 100},
            "request_bytes": 50, "response_bytes": 700, "ttfb": 0.25,
        }, 0.0, builtin_pricer())
        self.assertEqual(entry.time, 1796169599.5)
        self.assertEqual((entry.key_label, entry.model, entry.route), ("team", "gpt-4o", "/openai"))
        self.assertFalse(entry.error)
        self.assertAlmostEqual(entry.cost_usd, 1000 * 2.5e-6 + 100 * 10e-6)
        self.assertEqual((entry.request_bytes, entry.response_bytes, entry.ttfb), (50, 700, 0.25))

    def test_errors(self) -> None:
        """An error status or a broken answer is an error; a client leaving is not."""
        def error(status: object, outcome: str) -> bool:
            return entry_from_record({"status": status, "outcome": outcome}, 5.0,
                                     builtin_pricer()).error
        self.assertTrue(error(429, "complete"))
        self.assertTrue(error(200, "upstream_error"))
        self.assertTrue(error(None, "proxy_error"))
        self.assertFalse(error(200, "client_left"))
        self.assertFalse(error(200, "complete"))

    def test_bad_time_falls_back(self) -> None:
        """A record without a readable time is counted now."""
        self.assertEqual(entry_from_record({"time": "soon"}, 42.0, builtin_pricer()).time, 42.0)


def info(path: str) -> ExchangeInfo:
    return ExchangeInfo("r1", "/", "POST", path, "127.0.0.1", "team", 100.0,
                        RequestBody(io.BytesIO(b'{"model": "gpt-4o-mini", "messages": []}')))


class FeedingRecorderTests(SynchronousTestCase):
    """The chat record assembly and the counting taps feed one ledger, once each."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100.5)
        self.ledger = MemoryLedger()
        self.chat, self.recorder = feeding_recorder(None, self.ledger, self.clock,
                                                    builtin_pricer())

    def test_chat_counted_once(self) -> None:
        """A chat exchange reaches the ledger through its record only."""
        self.assertIsInstance(self.chat, ChatRecorder)
        self.assertIsInstance(self.recorder, FanOut)
        tap = self.recorder.begin(info("/v1/chat/completions"))
        assert tap is not None
        tap.response(200, Headers({b"content-type": [b"application/json"]}))
        tap.data(b'{"model": "gpt-4o-mini", "choices": [], '
                 b'"usage": {"prompt_tokens": 3, "completion_tokens": 2}}')
        tap.end("complete")
        [row] = self.ledger.tally.rows.values()
        self.assertEqual((row.requests, row.prompt_tokens, row.completion_tokens), (1, 3, 2))
        self.assertEqual((row.ttfb_sum, row.ttfb_count), (0.5, 1))
        self.assertEqual(row.model, "gpt-4o-mini")

    def test_other_kinds_counted(self) -> None:
        """An exchange no chat record covers gets a counting tap."""
        tap = self.recorder.begin(info("/v1/models"))
        assert tap is not None
        tap.response(404, Headers())
        tap.data(b"12345")
        tap.end("complete")
        tap.end("complete")
        [row] = self.ledger.tally.rows.values()
        self.assertEqual((row.requests, row.errors, row.response_bytes, row.model),
                         (1, 1, 5, ""))

    def test_counting_recorder_skips_covered(self) -> None:
        """The counting recorder leaves chat completions to the records."""
        counting = CountingRecorder(self.ledger, self.clock)
        self.assertIsNone(counting.begin(info("/v1/chat/completions")))
        self.assertIsNotNone(counting.begin(info("/v1/files")))
