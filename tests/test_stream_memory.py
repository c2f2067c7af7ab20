"""
What one open stream holds: the per-connection and per-request objects keep
their state in ``__slots__`` (one pointer an attribute) instead of a hash
table each, and start with the values their Twisted bases give.

The real site is fed a streaming request through Twisted's own parser
(``buildProtocol`` + ``dataReceived`` on a ``StringTransport``) and held
open mid-answer, as the bench's open streams are.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import Request as HTTPRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from twisted_forward.chat.record import AnswerReader, ChoiceAssembler
from twisted_forward.chat.recorder import ExchangeInfo, RequestBody
from twisted_forward.chat.sse import SSEDecoder
from twisted_forward.framing import ForwardChannel
from twisted_forward.site import ForwardRequest, ForwardSite
from twisted_forward.state import RequestState, state_of

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
