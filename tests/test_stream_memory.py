"""
What one open stream holds: the per-connection and per-request objects keep
their state in ``__slots__`` (one pointer an attribute) instead of a hash
table each, and start with the values their Twisted bases give.

The real site is fed a streaming request through Twisted's own parser
(``buildProtocol`` + ``dataReceived`` on a ``StringTransport``) and held
open mid-answer, as the bench's open streams are.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent
from twisted.web.http import Request as HTTPRequest
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from twisted_forward.chat.record import AnswerReader, ChoiceAssembler
from twisted_forward.chat.recorder import ExchangeInfo, RequestBody
from twisted_forward.chat.sse import SSEDecoder
from twisted_forward.config import UpstreamURL, load_config
from twisted_forward.framing import ForwardChannel
from twisted_forward.site import ForwardRequest, ForwardSite, build_root
from twisted_forward.state import RequestState, state_of
from twisted_forward.upstream import BytesProducer, host_header

BODY = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Authorization: Bearer fk-x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY)
) + BODY


@implementer(IPushProducer)
class _Upstream:
    """Stands in for the relay: the request's streaming producer."""

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Streaming(Resource):
    """Starts an SSE answer and keeps it open, as a relayed stream does."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []

    def render(self, request: Any) -> Any:
        self.requests.append(request)
        state_of(request).route = "/"
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/event-stream"])
        request.registerProducer(_Upstream(), True)
        request.write(b"data: {}\n\n")
        return NOT_DONE_YET


def open_stream() -> tuple[ForwardChannel, ForwardRequest, StringTransport]:
    """A connection of the real site holding one streaming request open."""
    resource = _Streaming()
    site = ForwardSite(resource, reactor=MemoryReactorClock())
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    channel = site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    channel.makeConnection(transport)
    channel.dataReceived(REQUEST)
    assert len(resource.requests) == 1
    return channel, resource.requests[0], transport


class SlottedStateTests(SynchronousTestCase):
    """The per-stream objects keep (almost) nothing in an instance dict."""

    def test_request_dict_holds_only_what_twisted_deletes(self) -> None:
        """Mid-stream, a request's dict holds only ``channel`` and
        ``content`` (which Twisted deletes at the end, falling back to its
        class attributes); everything else is in slots."""
        _, request, _ = open_stream()
        self.assertLessEqual(set(vars(request)), {"channel", "content"})

    def test_channel_dict_is_small(self) -> None:
        """Mid-stream, a connection's dict holds only the few names that
        stay class-level defaults or bound methods (``callLater``, the
        header limits from the settings)."""
        channel, _, _ = open_stream()
        self.assertLessEqual(
            set(vars(channel)), {"callLater", "maxHeaders", "totalHeadersSize", "MAX_LENGTH"}
        )

    def test_stream_is_answered_as_before(self) -> None:
        """The slotted request and channel still frame the answer: status,
        the chunked SSE body, the upstream's headers only."""
        _, request, transport = open_stream()
        written = transport.value()
        self.assertTrue(written.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"Transfer-Encoding: chunked\r\n", written)
        self.assertIn(b"data: {}\n\n", written)
        self.assertNotIn(b"text/html", written)
        self.assertEqual(request.method, b"POST")
        self.assertEqual(request.content.read(), BODY)

    def test_request_starts_with_twisted_defaults(self) -> None:
        """A fresh request has the values Twisted's class attributes give
        (a slot hides the base's class attribute, so each is copied)."""
        channel, _, _ = open_stream()
        fresh = ForwardRequest(channel)
        for name in ("code", "code_message", "producer", "startedWriting", "chunked",
                     "sentLength", "finished", "method", "uri", "clientproto", "args"):
            self.assertEqual(getattr(fresh, name), getattr(Request, name), name)
        self.assertIsNone(fresh.head_refusal)
        self.assertEqual(fresh.body_received, 0)
        self.assertIsInstance(fresh.state, RequestState)

    def test_finished_request_falls_back_to_class_content(self) -> None:
        """After the answer ends Twisted deletes ``content`` and
        ``channel``; ``content`` reads as None again, as it did unslotted."""
        channel, request, _ = open_stream()
        request.unregisterProducer()
        request.finish()
        self.assertIsNone(request.content)
        self.assertEqual(request.finished, 1)
        self.assertEqual(channel.requests, [])

    def test_channel_starts_with_twisted_defaults(self) -> None:
        """A channel built outside a site still has Twisted's defaults."""
        channel = ForwardChannel()
        self.assertEqual(channel.persistent, 1)
        self.assertEqual(channel.length, 0)
        self.assertIsNone(channel.transport)
        self.assertIsNone(channel.limits)
        self.assertIs(channel.requestFactory, HTTPRequest)

    def test_per_stream_objects_have_no_dict(self) -> None:
        """The proxy's own per-stream objects are fully slotted."""
        for instance in (
            RequestState(),
            ExchangeInfo("r", "/", "POST", "/v1/chat/completions", "127.0.0.1", "-", 0.0,
                         RequestBody(None)),
            RequestBody(None),
            AnswerReader("chat"),
            ChoiceAssembler("chat"),
            SSEDecoder(),
            BytesProducer(b"{}"),
        ):
            self.assertFalse(hasattr(instance, "__dict__"), type(instance).__name__)

    def test_state_of_attaches_to_other_requests(self) -> None:
        """A request from another factory (a test's DummyRequest) gets one
        state, attached the first time it is asked for."""
        request = DummyRequest([b""])
        state = state_of(request)
        self.assertIsInstance(state, RequestState)
        self.assertIs(state_of(request), state)

    def test_exchange_info_keeps_positional_order(self) -> None:
        """ExchangeInfo takes its fields in the order callers give them."""
        body = RequestBody(None)
        info = ExchangeInfo("r1", "/", "POST", "/v1/x", "10.0.0.1", "team", 5.0, body)
        self.assertEqual(
            (info.request_id, info.route, info.method, info.path, info.client,
             info.key_label, info.started, info.body, info.cache),
            ("r1", "/", "POST", "/v1/x", "10.0.0.1", "team", 5.0, body, ""),
        )
        self.assertNotIn("body", repr(info))


def _agent_host(url: bytes) -> bytes:
    """The Host line Twisted's Agent writes itself for ``url`` (a request
    given without one), read off the wire of an in-memory connection."""
    reactor = MemoryReactorClock()
    Agent(reactor).request(b"GET", url)
    factory = reactor.tcpClients[0][2]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    lines = transport.value().split(b"\r\n")
    (host,) = [line for line in lines if line.lower().startswith(b"host:")]
    return host.split(b":", 1)[1].strip()


class UpstreamHostTests(SynchronousTestCase):
    """The exchange gives the upstream request its Host, so Agent sends the
    headers as they are instead of holding a copy for the whole answer."""

    def test_host_as_agent_writes_it(self) -> None:
        """host_header gives what Agent would write: the port off the
        default, IPv6 literals bracketed."""
        for base in ("http://127.0.0.1:8080", "http://upstream.test", "http://[::1]:9000",
                     "http://example.com:80", "http://[::1]"):
            scheme, netloc = base.split("://", 1)
            url = UpstreamURL(scheme, netloc, "")
            self.assertEqual(host_header(url), _agent_host(base.encode() + b"/x"), base)

    def test_https_default_port_left_out(self) -> None:
        """On https the default port 443 is left out, another is kept."""
        self.assertEqual(host_header(UpstreamURL("https", "api.openai.com", "")), b"api.openai.com")
        self.assertEqual(host_header(UpstreamURL("https", "h:8443", "")), b"h:8443")

    def test_exchange_sends_the_route_host_once(self) -> None:
        """The upstream request carries exactly one Host, the route's, never
        the client's."""
        calls: list[Headers] = []

        class Recording:
            def request(self, method: bytes, url: bytes, headers: Headers, body: Any) -> Any:
                calls.append(headers)
                return Deferred()

            def close(self) -> Any:
                return succeed(None)

        config = load_config({}, {"OPENAI_BASE_URL": "http://upstream.test:8080",
                                  "LOG_CHAT": "false"}, None)
        clock = MemoryReactorClock()
        built = build_root(config, clock, upstream=Recording())
        site = ForwardSite(built.root, reactor=clock, timeout=None)
        channel = site.buildProtocol(None)
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: proxy.example\r\n\r\n")
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0].getRawHeaders(b"host"), [b"upstream.test:8080"])


class RequestBodySharingTests(SynchronousTestCase):
    """The chat record and the upstream request share one copy of a body
    held in memory."""

    def test_whole_body_is_the_files_own_bytes(self) -> None:
        """A body read whole from an in-memory file is the object the file
        (and so the exchange's getvalue) holds, not a copy."""
        content = io.BytesIO()
        content.write(BODY[:10])
        content.write(BODY[10:])
        content.seek(0)
        body = RequestBody(content)
        whole = body.head(1 << 16)
        self.assertEqual(whole, BODY)
        self.assertIs(whole, content.getvalue())
        self.assertEqual(content.tell(), 0)

    def test_slices_still_read(self) -> None:
        """A part of the body (its head or tail) is still read as before."""
        content = io.BytesIO(BODY)
        body = RequestBody(content)
        self.assertEqual(body.head(5), BODY[:5])
        self.assertEqual(body.tail(5), BODY[-5:])


#: Run in a fresh interpreter (Twisted's classes not yet laid out): a burst
#: of upstream connections each send a request before any answer comes (as
#: at a busy start), then each reads its answer's head and a chunk; prints
#: the traced bytes per connection of a second such burst.
_BURST = """
import sys, tracemalloc
from twisted.internet.testing import StringTransport
from twisted.web.http_headers import Headers
from twisted.web._newclient import Request
from twisted_forward import _compat
from twisted_forward.upstream_http import GuardedClientProtocol
if sys.argv[1] == "primed":
    _compat.prime_instance_layouts()
class Sink:
    def makeConnection(self, t): pass
    def dataReceived(self, d): pass
    def connectionLost(self, r): pass
def burst(n):
    held = []
    for _ in range(n):
        p = GuardedClientProtocol(lambda p: None, 65536, 100)
        p.makeConnection(StringTransport())
        answers = []
        p.request(Request(b"POST", b"/v1/x", Headers({b"host": [b"u"]}), None, persistent=True)).addCallback(answers.append)
        held.append((p, answers))
    for p, answers in held:
        p.dataReceived(b"HTTP/1.1 200 OK\\r\\nContent-Type: text/event-stream\\r\\n"
                       b"Transfer-Encoding: chunked\\r\\n\\r\\n6\\r\\ndata:\\n\\r\\n")
        answers[0].deliverBody(Sink())
    return held
first = burst(64)
tracemalloc.start()
before = tracemalloc.get_traced_memory()[0]
second = burst(200)
print((tracemalloc.get_traced_memory()[0] - before) // 200)
"""


def _burst_bytes(mode: str) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", _BURST, mode], env=env, check=True,
                         capture_output=True, text=True)
    return int(out.stdout.strip())


class PrimedLayoutTests(SynchronousTestCase):
    """Twisted's upstream parser keeps its attributes inline after a burst
    of first connections when its class was laid out beforehand."""

    def test_burst_then_answers(self) -> None:
        """With the layouts primed, a connection of a later burst costs at
        least 400 bytes less on CPython 3.11+ (the parser's hash table) and
        never more elsewhere."""
        plain = _burst_bytes("plain")
        primed = _burst_bytes("primed")
        if sys.implementation.name == "cpython" and sys.version_info >= (3, 11):
            self.assertLess(primed, plain - 400, (plain, primed))
        else:
            self.assertLessEqual(primed, plain + 64, (plain, primed))

    def test_guard_pool_primes(self) -> None:
        """Building the proxy's pool lays the classes out (once)."""
        from twisted.web.client import HTTPConnectionPool

        from twisted_forward import upstream_http

        upstream_http.guard_pool(HTTPConnectionPool(MemoryReactorClock()), 1024, 10)
        self.assertTrue(upstream_http._primed)


class ReleasedHeadersTests(SynchronousTestCase):
    """Once an upstream answer's head is copied to the client's answer, its
    headers and those of the request it answers are emptied (Twisted keeps
    both objects as long as the stream)."""

    def setUp(self) -> None:
        from .test_proxy_unit import FakeUpstream

        self.clock = MemoryReactorClock()
        self.upstream = FakeUpstream()
        config = load_config({}, {"OPENAI_BASE_URL": "http://upstream.test",
                                  "LOG_CHAT": "false"}, None)
        built = build_root(config, self.clock, upstream=self.upstream)
        self.site = ForwardSite(built.root, reactor=self.clock, timeout=None)

    def stream(self, code: int = 200) -> tuple[Any, StringTransport, Any]:
        from .test_proxy_unit import FakeResponse

        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(REQUEST.replace(b"Bearer fk-x", b"Bearer sk-client"))
        [call] = self.upstream.calls
        response = FakeResponse(code, {b"content-type": [b"text/event-stream"],
                                       b"x-request-id": [b"req-1"],
                                       b"openai-processing-ms": [b"12"]})

        class Sent:
            headers = call.headers

        response.request = Sent()  # as Twisted's IClientRequest gives it
        [self.client_request] = channel.requests
        call.deferred.callback(response)
        return call, transport, response

    def test_headers_released_after_copy(self) -> None:
        """Mid-stream (after the first body write), the upstream answer's
        and request's Headers hold nothing, nor the client's request's and
        answer's, and the client's answer has the upstream's headers."""
        call, transport, response = self.stream()
        response.protocol.dataReceived(b"data: {}\n\n")
        self.assertEqual(list(response.headers.getAllRawHeaders()), [])
        self.assertEqual(list(call.headers.getAllRawHeaders()), [])
        self.assertEqual(list(self.client_request.responseHeaders.getAllRawHeaders()), [])
        self.assertEqual(list(self.client_request.requestHeaders.getAllRawHeaders()), [])
        self.assertEqual(vars(response.protocol), {})
        written = transport.value()
        self.assertIn(b"X-Request-Id: req-1\r\n", written)
        self.assertIn(b"Content-Type: text/event-stream\r\n", written)
        self.assertIn(b"Openai-Processing-Ms: 12\r\n", written)
        self.assertIn(b"data: {}\n\n", written)

    def test_client_headers_kept_until_written(self) -> None:
        """Before the first body chunk the client's answer headers are
        intact (they are not written yet); the first write sends them."""
        _, transport, response = self.stream()
        self.assertEqual(
            self.client_request.responseHeaders.getRawHeaders(b"x-request-id"), [b"req-1"]
        )
        self.assertEqual(
            self.client_request.requestHeaders.getRawHeaders(b"content-type"),
            [b"application/json"],
        )
        self.assertEqual(transport.value(), b"")
        response.protocol.dataReceived(b"data: {}\n\n")
        response.protocol.dataReceived(b"data: [DONE]\n\n")
        response.finish()
        written = transport.value()
        self.assertEqual(written.count(b"X-Request-Id: req-1\r\n"), 1)
        self.assertTrue(written.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"))

    def test_release_without_a_request(self) -> None:
        """An answer with no request object (a test double, another
        IUpstream) has its own headers emptied and nothing else touched."""
        from twisted_forward.headers import release, release_upstream_headers

        from .test_proxy_unit import FakeResponse

        response = FakeResponse(200, {b"a": [b"1"], b"b": [b"2", b"3"]})
        release_upstream_headers(response)
        self.assertEqual(list(response.headers.getAllRawHeaders()), [])
        release(None)


class LazyChoiceTests(SynchronousTestCase):
    """A choice being reassembled makes its text lists and tool-call maps
    on their first piece only: an open stream holds just the ones its
    answer uses."""

    def test_content_only_stream(self) -> None:
        """A content stream holds one list; the result is as before."""
        assembler = ChoiceAssembler("chat")
        for piece in ("Hel", "lo"):
            assembler.add({"choices": [{"index": 0, "delta": {"content": piece}}]})
        choice = assembler.choices[0]
        self.assertEqual(choice.content, ["Hel", "lo"])
        for name in ("reasoning", "refusal", "text", "transcript", "tool_calls", "tool_ids"):
            self.assertIsNone(getattr(choice, name), name)
        self.assertEqual(assembler.result(), [
            {"index": 0, "role": "assistant", "content": "Hello", "finish_reason": None},
        ])

    def test_other_parts_still_assembled(self) -> None:
        """Reasoning, refusal, transcript, tool calls and completion text
        are still gathered when they come."""
        chat = ChoiceAssembler("chat")
        chat.add({"choices": [{"index": 0, "delta": {
            "role": "assistant", "reasoning_content": "think", "refusal": "no",
            "audio": {"transcript": "said"},
            "tool_calls": [{"index": 0, "id": "c1", "type": "function",
                            "function": {"name": "f", "arguments": "{}"}}],
        }, "finish_reason": "stop"}]})
        [result] = chat.result()
        self.assertIsNone(result["content"])
        self.assertEqual(
            (result["reasoning_content"], result["refusal"], result["audio_transcript"]),
            ("think", "no", "said"),
        )
        self.assertEqual(result["tool_calls"], [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        ])
        completion = ChoiceAssembler("completion")
        self.assertEqual(completion.result(), [])
        completion.add({"choices": [{"index": 0, "finish_reason": "length"}]})
        completion.add({"choices": [{"index": 1, "text": "abc"}]})
        self.assertEqual([c["text"] for c in completion.result()], ["", "abc"])
