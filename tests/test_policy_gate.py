"""
The policy gate on a fake clock: which buckets a request draws on, the
refusals and their headers, settling and releasing, and a store that is
down or hangs (LIMITS_ON_STORE_FAILURE open and closed).
"""

from __future__ import annotations

import io
import json
from typing import Optional

from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_forward.policies.gate import (
    STORE_TIMEOUT,
    UNLIMITED,
    Admission,
    IExchangePolicy,
    PolicyGate,
    RequestFacts,
    format_reset,
)
from twisted_forward.policies.memory import MemoryStore
from twisted_forward.policies.prices import Price, PriceTable
from twisted_forward.policies.rules import KeyPolicy, Policies, Rate, RouteRate
from twisted_forward.policies.store import IPolicyStore, StoreUnavailable

from .fake_upstream import chat_chunks

T0 = 1_800_000_000.0  # a whole minute


def facts(label: str = "alice", body: Optional[bytes] = None, n: int = 0, **kw) -> RequestFacts:
    if body is None:
        body = json.dumps({"model": "gpt-4o-mini", "messages": [], "max_tokens": 10}).encode()
    return RequestFacts(
        label=label, level=kw.pop("level", 0), substituted=kw.pop("substituted", True),
        method=b"POST", path=kw.pop("path", "/v1/chat/completions"),
        content=io.BytesIO(body), content_type=b"application/json",
        reservation=f"r{n}", **kw,
    )


@implementer(IPolicyStore)
class BrokenStore:
    """A store that errs, or never answers."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.pending: list[Deferred] = []

    def reserve(self, reservation, buckets, now):
        if self.hang:
            d: Deferred = Deferred()
            self.pending.append(d)
            return d
        return fail(StoreUnavailable("connection refused"))

    def settle(self, reservation, settlements, now):
        return fail(StoreUnavailable("connection refused"))

    def close(self):
        return fail(StoreUnavailable("connection refused"))


class GateTestCase(SynchronousTestCase):
    def gate(self, policies: Policies, store=None, on_store_failure: str = "closed"):
        self.clock = MemoryReactorClock()
        self.clock.advance(T0)
        self.refused: list[tuple[str, str]] = []
        self.failures = 0

        def failed() -> None:
            self.failures += 1

        self.store = store if store is not None else MemoryStore()
        return PolicyGate(
            policies, self.store, PriceTable({}, Price(1.0, 1.0, 1.0)), self.clock,
            on_store_failure=on_store_failure,
            refused=lambda label, reason: self.refused.append((label, reason)),
            store_failed=failed,
        )

    def admit(self, gate: PolicyGate, f: RequestFacts) -> Admission:
        return self.successResultOf(gate.admit(f))


class GateTests(GateTestCase):
    """Requests of limited keys, and of keys without policy."""

    def test_interface(self):
        """The gate provides the exchange's hook."""
        self.assertTrue(verifyObject(IExchangePolicy, self.gate(Policies())))

    def test_unlimited_touches_nothing(self):
        """A key without policy gets UNLIMITED at once: no body read, no store."""
        gate = self.gate(Policies(keys={"alice": KeyPolicy(rpm=1)}), BrokenStore())
        f = facts("bob", body=b"not read")
        self.assertIs(self.admit(gate, f), UNLIMITED)
        assert f.content is not None
        self.assertEqual(f.content.tell(), 0)
        self.assertIs(self.admit(gate, facts("alice", substituted=False)), UNLIMITED)

    def test_rpm_fixed_window(self):
        """rpm 2: two admitted, then 429 with Retry-After to the minute's end."""
        gate = self.gate(Policies(keys={"alice": KeyPolicy(rpm=2)}))
        for i in range(2):
            a = self.admit(gate, facts(n=i))
            self.assertIsNone(a.refusal)
        self.clock.advance(15)
        a = self.admit(gate, facts(n=3))
        self.assertEqual((a.refusal.status, a.refusal.code), (429, "rate_limit_exceeded"))
        self.assertEqual(a.refusal.retry_after, 45)
        self.assertIn((b"retry-after", b"45"), a.headers)
        self.assertIn((b"x-ratelimit-reset-requests", b"45s"), a.headers)
        self.assertEqual(self.refused, [("alice", "rate_limit_exceeded")])
        self.clock.advance(45)
        self.assertIsNone(self.admit(gate, facts(n=4)).refusal)

    def test_tpm_reserve_settle_release(self):
        """The estimate is reserved; settling puts in the real usage;
        a failed request gives its tokens back."""
        gate = self.gate(Policies(keys={"alice": KeyPolicy(tpm=1000)}))
        body = json.dumps({"model": "m", "messages": [], "max_tokens": 100}).encode()
        reserve = -(-len(body) // 4) + 100
        a = self.admit(gate, facts(body=body, n=1))
        self.assertIn((b"x-ratelimit-remaining-tokens", b"%d" % (1000 - reserve)), a.headers)
        a.answer_started(200, streamed=False)
        a.relay(b'{"usage": {"prompt_tokens": 7, "completion_tokens": 3}}')
        a.finish(True)
        b = self.admit(gate, facts(body=body, n=2))
        self.assertIn((b"x-ratelimit-remaining-tokens", b"%d" % (1000 - 10 - reserve)), b.headers)
        b.finish(False)  # upstream failed: released
        c = self.admit(gate, facts(body=body, n=3))
        self.assertIn((b"x-ratelimit-remaining-tokens", b"%d" % (1000 - 10 - reserve)), c.headers)

    def test_complete_without_usage_keeps_reservation(self):
        """An answer whose usage cannot be read keeps its reservation."""
        gate = self.gate(Policies(keys={"alice": KeyPolicy(tokens_per_day=500)}))
        a = self.admit(gate, facts(n=1))
        a.answer_started(200, streamed=False)
        a.relay(b"not json")
        a.finish(True)
        body = facts().content.getvalue()
        reserve = -(-len(body) // 4) + 10
        b = self.admit(gate, facts(n=2))
        self.assertIn((b"x-ratelimit-remaining-tokens", b"%d" % (500 - 2 * reserve)), b.headers)

    def test_quota_refusal(self):
        """A spent daily quota: insufficient_quota, Retry-After to midnight UTC."""
        gate = self.gate(Policies(keys={"alice": KeyPolicy(tokens_per_day=10)}))
        a = self.admit(gate, facts(n=1))
        a.answer_started(200, streamed=False)
        a.relay(b'{"usage": {"prompt_tokens": 10, "completion_tokens": 0}}')
        a.finish(True)
        a = self.admit(gate, facts(n=2))
        self.assertEqual(a.refusal.code, "insufficient_quota")
        midnight = (T0 // 86400 + 1) * 86400
        self.assertEqual(a.refusal.retry_after, int(midnight - T0))

    def test_models(self):
        """A model outside the key's patterns: 403 naming the model."""
        gate = self.gate(Policies(keys={"alice": KeyPolicy(models=("gpt-4o-mini*",))}))
        self.assertIs(self.admit(gate, facts()), UNLIMITED)  # allowed, nothing to count
        body = json.dumps({"model": "o1", "messages": []}).encode()
        a = self.admit(gate, facts(body=body))
        self.assertEqual((a.refusal.status, a.refusal.code), (403, "model_not_allowed"))
        self.assertIn("'o1'", a.refusal.message)

    def test_streamed_usage_requested(self):
        """A streamed request of a token-limited key is rewritten to ask for
        usage; the answer is stripped back and settled with the usage."""
        gate = self.gate(Policies(keys={"alice": KeyPolicy(tpm=100000)}))
        body = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
        a = self.admit(gate, facts(body=body, n=1))
        self.assertEqual(json.loads(a.body)["stream_options"], {"include_usage": True})
        self.assertTrue(a.answer_started(200, streamed=True))
        out = b"".join(a.relay(e) for e in chat_chunks("x y", include_usage=True)) + a.relay_end()
        self.assertEqual(out, b"".join(chat_chunks("x y")))
        a.finish(True)
        b = self.admit(gate, facts(body=body, n=2))
        remaining = int(dict(b.headers)[b"x-ratelimit-remaining-tokens"])
        self.assertEqual(100000 - remaining - 7, -(-len(body) // 4) + 1024)

    def test_settlements_by_outcome(self):
        """With tokens, dollars and a slot: an answer without a readable
        usage frees the slot and leaves the estimates standing; one with a
        usage settles tokens and dollars at the real amounts; a failure
        gives everything back."""
        gate = self.gate(Policies(keys={"alice": KeyPolicy(
            tokens_per_day=100000, usd_per_day=1.0, max_parallel=1)}))
        reserve = -(-len(facts().content.getvalue()) // 4) + 10

        def remaining(a: Admission) -> int:
            return int(dict(a.headers)[b"x-ratelimit-remaining-tokens"])

        a = self.admit(gate, facts(n=1))
        self.assertEqual(remaining(a), 100000 - reserve)
        a.answer_started(200, streamed=False)
        a.relay(b"not json")
        a.finish(True)
        b = self.admit(gate, facts(n=2))  # the slot is free again
        self.assertIsNone(b.refusal)
        self.assertEqual(remaining(b), 100000 - 2 * reserve)
        b.answer_started(200, streamed=False)
        b.relay(b'{"usage": {"prompt_tokens": 7, "completion_tokens": 3}}')
        b.finish(True)
        c = self.admit(gate, facts(n=3))
        self.assertEqual(remaining(c), 100000 - reserve - 10 - reserve)
        c.finish(False)
        d = self.admit(gate, facts(n=4))
        self.assertEqual(remaining(d), 100000 - reserve - 10 - reserve)
        d.finish(False)
        # Dollars: at a dollar per million tokens of each kind, a token is a
        # micro-dollar: the same amounts in both quotas.
        held = {b.id: b for b in gate._plans[next(iter(gate._plans))].buckets}
        for name in ("tokens_per_day", "usd_per_day"):
            # The probe takes an estimate too: a's and its own, and b's 10.
            v = self.store.reserve_now("probe", [held[f"alice/{name}"]], T0)
            self.assertEqual(v.states[0].remaining, held[f"alice/{name}"].limit - 2 * reserve - 10, name)

    def test_headers_from_the_tightest_buckets(self):
        """Of a route's request rate and the key's rpm, the headers report
        the one with less left; of tpm and a daily quota, tpm (the quota
        stands in only without it)."""
        rule = RouteRate("/v1/chat/completions", 0, (Rate(3, 60.0),))
        gate = self.gate(Policies(keys={"alice": KeyPolicy(rpm=100, tpm=5000, tokens_per_day=10)},
                                  route_rates=(rule,)))
        a = dict(self.admit(gate, facts(n=1)).headers)
        self.assertEqual((a[b"x-ratelimit-limit-requests"], a[b"x-ratelimit-remaining-requests"]),
                         (b"3", b"2"))
        self.assertEqual(a[b"x-ratelimit-limit-tokens"], b"5000")
        self.assertEqual(a[b"x-ratelimit-reset-requests"], b"1m0s")
        only_quota = self.gate(Policies(keys={"alice": KeyPolicy(tokens_per_day=100000)}))
        b = dict(self.admit(only_quota, facts(n=1)).headers)
        self.assertEqual(b[b"x-ratelimit-limit-tokens"], b"100000")
        self.assertNotIn(b"x-ratelimit-limit-requests", b)

    def test_parallel_released(self):
        """A slot is held while in flight and freed at the end, whatever the outcome."""
        gate = self.gate(Policies(keys={"alice": KeyPolicy(max_parallel=1)}))
        a = self.admit(gate, facts(n=1))
        self.assertEqual(self.admit(gate, facts(n=2)).refusal.code, "rate_limit_exceeded")
        a.finish(False)
        self.assertIsNone(self.admit(gate, facts(n=3)).refusal)


class StoreFailureTests(GateTestCase):
    """LIMITS_ON_STORE_FAILURE: closed answers 503, open counts locally."""

    def test_closed(self):
        """A store that errs: 503 limits_unavailable, counted."""
        gate = self.gate(Policies(keys={"alice": KeyPolicy(rpm=1)}), BrokenStore())
        a = self.admit(gate, facts())
        self.assertEqual((a.refusal.status, a.refusal.code), (503, "limits_unavailable"))
        self.assertEqual(self.failures, 1)
        self.assertEqual(self.refused, [("alice", "limits_unavailable")])

    def test_hanging_store_times_out(self):
        """A store that never answers: refused after STORE_TIMEOUT, not hung."""
        store = BrokenStore(hang=True)
        gate = self.gate(Policies(keys={"alice": KeyPolicy(rpm=1)}), store)
        d = gate.admit(facts())
        self.assertNoResult(d)
        self.clock.advance(STORE_TIMEOUT)
        self.assertEqual(self.successResultOf(d).refusal.status, 503)

    def test_open_counts_locally(self):
        """Open: served, and still limited, by this process's own counts."""
        gate = self.gate(Policies(keys={"alice": KeyPolicy(rpm=1)}), BrokenStore(), "open")
        a = self.admit(gate, facts(n=1))
        self.assertIsNone(a.refusal)
        a.finish(True)
        self.assertEqual(self.admit(gate, facts(n=2)).refusal.code, "rate_limit_exceeded")
        self.assertEqual(self.failures, 2)


class FormatTests(SynchronousTestCase):
    """OpenAI's duration format for x-ratelimit-reset-*."""

    def test_format(self):
        """ms under a second, then s, m and h."""
        self.assertEqual(format_reset(0.02), "20ms")
        self.assertEqual(format_reset(17), "17s")
        self.assertEqual(format_reset(360), "6m0s")
        self.assertEqual(format_reset(3723), "1h2m3s")


class ResponsesAPITests(GateTestCase):
    """Only chat and legacy completions are asked for streamed usage."""

    def test_responses_stream_untouched(self):
        """A streamed Responses API request goes as sent; its usage is read
        from its last event."""
        gate = self.gate(Policies(keys={"alice": KeyPolicy(tpm=100000)}))
        body = json.dumps({"model": "m", "input": "hi", "stream": True}).encode()
        a = self.admit(gate, facts(body=body, path="/v1/responses"))
        self.assertIsNone(a.body)
        self.assertFalse(a.answer_started(200, streamed=True))
        event = {"type": "response.completed",
                 "response": {"usage": {"input_tokens": 3, "output_tokens": 4}}}
        self.assertEqual(a.relay(b"data: " + json.dumps(event).encode() + b"\n\n")[:6], b"data: ")
        a.finish(True)
        b = self.admit(gate, facts(body=body, n=2, path="/v1/responses"))
        remaining = int(dict(b.headers)[b"x-ratelimit-remaining-tokens"])
        self.assertEqual(100000 - remaining - 7, -(-len(body) // 4) + 1024)
