"""
Per-request work done once: each body parsed once for all its readers (the
policies and the chat record), the answer head written as one string, the
gate's plan made once per window, and the gate's answer given without a
Deferred when it is known at once.  Every change keeps the bytes sent and
the records and counts made.
"""

from __future__ import annotations

import io
import json
from typing import Any, Callable

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

from twisted_forward.chat.recorder import ChatRecorder
from twisted_forward.config import load_config
from twisted_forward.framing import ForwardChannel
from twisted_forward.policies.gate import Admission, PolicyGate, RequestFacts
from twisted_forward.policies.memory import MemoryStore
from twisted_forward.policies.prices import Price, PriceTable
from twisted_forward.policies.rules import Policies, parse_key_policy_json
from twisted_forward.policies.usage import Usage
from twisted_forward.sharedjson import SharedParse
from twisted_forward.site import ForwardSite, build_root

from .test_chat_request_body import Records
from .test_proxy_unit import FakeResponse, FakeUpstream

ALICE = "fk-alice-0123456789"
DEFAULT = "sk-default-0123456789abcdef"
REQUEST = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
).encode()
ANSWER = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
}).encode()


class SharedParseTests(SynchronousTestCase):
    """The hand-over between two readers of one body."""

    def test_second_reader_gets_the_first_readers_value(self):
        """A kept parse is given to the next reader of equal bytes (not
        parsed again: the very same object), and then let go."""
        shared = SharedParse()
        value = json.loads(ANSWER)
        shared.keep(ANSWER, value)
        self.assertIs(shared.loads(bytes(bytearray(ANSWER)), str), value)
        self.assertEqual(len(shared), 0)
        self.assertIsNot(shared.loads(ANSWER), value)  # let go: parsed anew

    def test_other_bytes_parsed(self):
        """A reader of other bytes gets their own parse, and the kept one
        stays for its reader."""
        shared = SharedParse()
        kept = json.loads(REQUEST)
        shared.keep(REQUEST, kept)
        self.assertEqual(shared.loads(ANSWER), json.loads(ANSWER))
        self.assertIs(shared.loads(REQUEST), kept)

    def test_constants_not_handed_on(self):
        """A body with NaN or Infinity is parsed by each reader its own way
        (the chat record turns them into strings, the policies do not)."""
        for body in (b'{"model": NaN}', b'{"t": -Infinity}', b'{"s": "NaN is fine"}'):
            shared = SharedParse()
            shared.keep(body, json.loads(body))
            self.assertEqual(len(shared), 0, body)
        shared = SharedParse()
        shared.keep(b'{"model": NaN}', json.loads(b'{"model": NaN}'))
        self.assertEqual(shared.loads(b'{"model": NaN}', str), {"model": "NaN"})


class OneExchange(SynchronousTestCase):
    """One non-stream chat through the real resource tree in memory, with
    a token-counting policy and the chat record on."""

    policy = {"alice": {"tpm": 100000, "rpm": 1000}}

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_800_000_000.0)
        self.upstream = FakeUpstream()
        env = {
            "OPENAI_BASE_URL": "http://upstream.test", "LOG_CHAT": "false",
            "OPENAI_API_KEY": DEFAULT, "FORWARD_KEY": f"alice:{ALICE}",
        }
        if self.policy:
            env["KEY_POLICY"] = json.dumps(self.policy)
        self.records = Records()
        config = load_config({}, env, None)
        self.built = build_root(
            config, self.clock, recorder=ChatRecorder(self.clock, [self.records]),
            upstream=self.upstream,
        )
        self.site = ForwardSite(self.built.root, reactor=self.clock, timeout=None)
        self.parses: list[bytes] = []

    def count_parses(self) -> None:
        """Count every ``json.loads`` from here on."""
        loads = json.loads

        def counting(text: Any, *args: Any, **kwargs: Any) -> Any:
            self.parses.append(text.encode() if isinstance(text, str) else bytes(text))
            return loads(text, *args, **kwargs)

        self.patch(json, "loads", counting)

    def post(self, request: bytes) -> StringTransport:
        """Send ``request`` as alice's chat on a new connection; returns the
        connection's transport."""
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
            b"Authorization: Bearer " + ALICE.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(request), request)
        )
        return transport

    def exchange(self, request: bytes = REQUEST, answer: bytes = ANSWER) -> bytes:
        transport = self.post(request)
        call = self.upstream.calls[-1]
        response = FakeResponse(200, {"content-type": ["application/json"]}, length=len(answer))
        call.deferred.callback(response)
        response.protocol.dataReceived(answer)
        response.finish()
        return transport.value()


class OneParseTests(OneExchange):
    def test_each_body_parsed_once(self):
        """With a token-counting policy and the chat record both reading the
        request and the answer, each body is parsed once: the gate's parses
        are the record's (twice as many before)."""
        self.count_parses()
        sent = self.exchange()
        self.assertIn(b"hello", sent)
        self.assertEqual(sorted(self.parses), sorted([REQUEST, ANSWER]))

    def test_record_and_settlement_from_the_one_parse(self):
        """The record has the request's messages and the answer's usage, and
        the tokens counted are the answer's usage (not the estimate)."""
        self.exchange()
        record = self.records.records[-1]
        self.assertEqual(record["messages"], [{"role": "user", "content": "hi"}])
        self.assertEqual(record["params"], {"max_tokens": 50})
        self.assertEqual(record["usage"]["total_tokens"], 15)
        self.assertEqual(record["choices"][0]["content"], "hello")
        # The next answer's remaining tokens: the limit less the 15 settled,
        # less this request's estimate.
        sent = self.exchange()
        estimate = -(-len(REQUEST) // 4) + 50
        self.assertIn(b"X-Ratelimit-Remaining-Tokens: %d\r\n" % (100000 - 15 - estimate), sent)

    def test_rate_headers_bytes(self):
        """The ``x-ratelimit-*`` lines are written as before: canonical
        names, in order, after the upstream's headers."""
        sent = self.exchange()
        head = sent.split(b"\r\n\r\n", 1)[0]
        estimate = -(-len(REQUEST) // 4) + 50
        lines = head.split(b"\r\n")
        self.assertEqual(lines[:2], [b"HTTP/1.1 200 OK", b"Content-Type: application/json"])
        self.assertTrue(lines[2].startswith(b"Date: "), lines[2])
        self.assertEqual(lines[3:], [
            b"X-Ratelimit-Limit-Requests: 1000",
            b"X-Ratelimit-Remaining-Requests: 999",
            b"X-Ratelimit-Reset-Requests: 1m0s",
            b"X-Ratelimit-Limit-Tokens: 100000",
            b"X-Ratelimit-Remaining-Tokens: %d" % (100000 - estimate),
            b"X-Ratelimit-Reset-Tokens: 1m0s",
            b"Content-Length: %d" % len(ANSWER),
        ])

    def test_upstream_rate_headers_replaced_in_place(self):
        """An upstream that sends its own ``x-ratelimit-*`` (as OpenAI does)
        has them replaced by the proxy's, each in the upstream's place, the
        others after its headers: the head ``setRawHeaders`` made."""
        transport = self.post(REQUEST)
        response = FakeResponse(200, {
            "x-ratelimit-remaining-tokens": ["7"], "content-type": ["application/json"],
            "X-RateLimit-Limit-Requests": ["5"], "date": ["Thu, 01 Jan 2026 00:00:00 GMT"],
        }, length=len(ANSWER))
        self.upstream.calls[-1].deferred.callback(response)
        response.protocol.dataReceived(ANSWER)
        response.finish()
        estimate = -(-len(REQUEST) // 4) + 50
        head = transport.value().split(b"\r\n\r\n", 1)[0]
        self.assertEqual(head.split(b"\r\n"), [
            b"HTTP/1.1 200 OK",
            b"X-Ratelimit-Remaining-Tokens: %d" % (100000 - estimate),
            b"Content-Type: application/json",
            b"X-Ratelimit-Limit-Requests: 1000",
            b"Date: Thu, 01 Jan 2026 00:00:00 GMT",
            b"X-Ratelimit-Remaining-Requests: 999",
            b"X-Ratelimit-Reset-Requests: 1m0s",
            b"X-Ratelimit-Limit-Tokens: 100000",
            b"X-Ratelimit-Reset-Tokens: 1m0s",
            b"Content-Length: %d" % len(ANSWER),
        ])

    def test_nan_request_parsed_by_each_reader(self):
        """A request with ``NaN`` is parsed by the gate and the record each
        their way: the policy sees no model, the record a string."""
        self.count_parses()
        body = b'{"model": "gpt-4o-mini", "temperature": NaN, "messages": []}'
        self.exchange(body)
        self.assertEqual(self.parses.count(body), 2)
        self.assertEqual(self.records.records[-1]["params"]["temperature"], "NaN")

    def test_stream_request_not_held(self):
        """A streamed request's parse is not kept for its record (a stream
        can last minutes): the record parses it again at the end."""
        self.count_parses()
        body = b'{"model": "gpt-4o-mini", "stream": true, "messages": []}'
        channel = self.site.buildProtocol(None)
        channel.makeConnection(StringTransport())
        channel.dataReceived(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
            b"Authorization: Bearer " + ALICE.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        call = self.upstream.calls[-1]
        response = FakeResponse(200, {"content-type": ["text/event-stream"]})
        call.deferred.callback(response)
        response.protocol.dataReceived(b'data: {"choices": []}\n\ndata: [DONE]\n\n')
        response.finish()
        self.assertEqual(self.parses.count(body), 2)


class NoPolicyTests(OneExchange):
    """Without policies the record alone reads each body: once."""

    policy: dict = {}

    def test_each_body_parsed_once(self):
        """One parse of the request and one of the answer, as before."""
        self.count_parses()
        self.exchange()
        self.assertEqual(sorted(self.parses), sorted([REQUEST, ANSWER]))


class HeadWriteTests(SynchronousTestCase):
    """The answer head, written as one string."""

    def test_same_bytes_as_twisted(self):
        """``ForwardChannel.writeHeaders`` writes what ``HTTPChannel``'s
        does, for several headers, a header of several values, and none;
        in one write."""
        for headers in (
            Headers({b"content-type": [b"application/json"], b"x-a": [b"1", b"2"],
                     b"x-ratelimit-limit-requests": [b"10"]}),
            Headers(),
        ):
            ours, theirs = StringTransport(), StringTransport()
            writes: list[bytes] = []
            write: Callable[[bytes], None] = ours.write

            def counted(data: bytes, write: Callable[[bytes], None] = write,
                        writes: list[bytes] = writes) -> None:
                writes.append(data)
                write(data)

            ours.write = counted  # type: ignore[method-assign]  # on this one transport: counts its writes
            channel = ForwardChannel()
            channel.makeConnection(ours)
            channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
            reference = HTTPChannel()
            reference.makeConnection(theirs)
            reference.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
            self.assertEqual(ours.value(), theirs.value())
            self.assertEqual(len(writes), 1)


class GateDecideTests(SynchronousTestCase):
    """The gate's answer without a Deferred, and its plans made once."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_800_000_000.0)
        self.gate = PolicyGate(
            Policies(keys=parse_key_policy_json('{"alice": {"rpm": 3, "tpm": 1000}}')),
            MemoryStore(), PriceTable({}, Price(1.0, 1.0, 1.0)), self.clock,
        )

    def facts(self, n: int) -> RequestFacts:
        return RequestFacts(
            label="alice", level=0, substituted=True, method=b"POST",
            path="/v1/chat/completions", content=io.BytesIO(REQUEST),
            content_type=b"application/json", reservation=f"r{n}",
        )

    def test_memory_store_answers_within_the_call(self):
        """With the memory store ``decide`` gives the admission itself, the
        same one ``admit`` gives in a Deferred."""
        decided = self.gate.decide(self.facts(1))
        self.assertIsInstance(decided, Admission)
        admitted = self.successResultOf(self.gate.admit(self.facts(2)))
        self.assertEqual(
            [name for name, _ in decided.headers], [name for name, _ in admitted.headers]
        )

    def test_plan_reused_within_its_window_only(self):
        """Requests of one key, route and estimate share one plan while its
        minute lasts; the next minute makes a new plan, and counts anew."""
        first = self.gate.decide(self.facts(1))
        self.assertIsInstance(first, Admission)
        self.assertEqual(len(self.gate._plans), 1)
        plan = next(iter(self.gate._plans.values()))
        self.gate.decide(self.facts(2))
        self.assertIs(next(iter(self.gate._plans.values())), plan)
        third = self.gate.decide(self.facts(3))
        assert isinstance(third, Admission)
        self.assertIsNone(third.refusal)
        fourth = self.gate.decide(self.facts(4))
        assert isinstance(fourth, Admission)
        assert fourth.refusal is not None
        self.assertEqual(fourth.refusal.code, "rate_limit_exceeded")
        self.clock.advance(60)
        fifth = self.gate.decide(self.facts(5))
        assert isinstance(fifth, Admission)
        self.assertIsNone(fifth.refusal)
        self.assertIsNot(next(iter(self.gate._plans.values())), plan)

    def test_usage_settled(self):
        """The answer's usage, read through the admission, is what the
        token bucket keeps."""
        admission = self.gate.decide(self.facts(1))
        assert isinstance(admission, Admission)
        admission.answer_started(200, False)
        admission.relay(ANSWER)
        admission.finish(True)
        estimate = -(-len(REQUEST) // 4) + 50
        after = self.gate.decide(self.facts(2))
        assert isinstance(after, Admission)
        self.assertIn(
            (b"x-ratelimit-remaining-tokens", b"%d" % (1000 - 15 - estimate)), after.headers
        )
        self.assertEqual(Usage(11, 4).total, 15)


class KeyDecidedOnceTests(OneExchange):
    """The key rules' decision on the head is the one the render uses."""

    def test_decided_once(self):
        """One decision per request (the head check's), not one more when
        the request is rendered; the exchange still goes through."""
        from twisted_forward.keys import KeyRules

        calls: list[object] = []
        decide = KeyRules.decide

        def counting(rules: KeyRules, headers: Headers) -> Any:
            calls.append(headers)
            return decide(rules, headers)

        self.patch(KeyRules, "decide", counting)
        self.assertIn(b"hello", self.exchange())
        self.assertEqual(len(calls), 1)


class ResetBytesTests(SynchronousTestCase):
    """The ``x-ratelimit-reset-*`` values formatted once per whole second."""

    def test_same_as_format_reset(self):
        """Below a second, at whole seconds, between them, and past a day,
        asked twice (the second time from the memory): what
        ``format_reset`` writes."""
        from twisted_forward.policies.gate import _reset_bytes, format_reset

        for seconds in (0.0, 0.02, 0.999, 1.0, 1.2, 59.01, 60.0, 61.5, 3600.5, 86399.2, 90000.0):
            for _ in range(2):
                self.assertEqual(_reset_bytes(seconds), format_reset(seconds).encode(), seconds)
