"""
The framing refusals, fed to the real HTTP/1.1 parser.

Each shape is written to a :class:`ForwardSite` channel on a
:class:`StringTransport`, as twisted.web's own tests do.  A refused shape must
get its OpenAI-style JSON answer and never reach the resource; an accepted
shape must reach it with the body the framing says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from io import BytesIO
from typing import Optional

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from twisted_forward import framing
from twisted_forward.framing import ForwardChannel, Refusal
from twisted_forward.site import ForwardSite

CAP = 1000


class HalfCloseTransport(StringTransport):
    """A StringTransport that, like a TCP socket, can close its write side."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


@dataclass
class Rendered:
    """One request as the resource got it."""

    method: bytes
    uri: bytes
    body: bytes
    content_type: type
    args: dict


class Recording(Resource):
    """Records what it renders and answers ``ok``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Rendered] = []

    def render(self, request: Request) -> bytes:
        request.content.seek(0)
        self.seen.append(
            Rendered(
                request.method,
                request.uri,
                request.content.read(),
                type(request.content),
                request.args,
            )
        )
        return b"ok"


@dataclass
class Answer:
    """One HTTP response, parsed."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def parse_answer(raw: bytes) -> Answer:
    """The first response in ``raw`` (after any 100 Continue)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return Answer(status, headers, body)


class Server:
    """A ForwardSite channel connected to a transport, on a memory clock."""

    def __init__(
        self,
        half_close: bool = True,
        max_request_body: Optional[int] = CAP,
        now: float = 0.0,
        **site_args,
    ) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(now)
        self.resource = Recording()
        self.site = ForwardSite(
            self.resource, reactor=self.clock, max_request_body=max_request_body, **site_args
        )
        self.channel: ForwardChannel = self.site.buildProtocol(None)
        self.transport = HalfCloseTransport() if half_close else StringTransport()
        self.channel.makeConnection(self.transport)

    def feed(self, data: bytes) -> bytes:
        if isinstance(data, Bytewise):
            for i in range(len(data)):
                self.channel.dataReceived(data[i : i + 1])
        else:
            self.channel.dataReceived(data)
        return self.transport.value()


def post(extra: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return (
        b"POST /v1/chat/completions " + version + b"\r\nHost: proxy\r\n" + extra + b"\r\n" + body
    )


SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n"
CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"


@dataclass
class Shape:
    """A request Twisted's parser gets, and the answer it must have."""

    name: str
    raw: bytes
    status: int
    code: str


#: Shapes Twisted 26.10 accepts and the proxy refuses.
ADDED = [
    Shape(
        "te_identity_smuggles_body",
        post(b"Transfer-Encoding: identity\r\n", SMUGGLED),
        400,
        "invalid_transfer_encoding",
    ),
    Shape(
        "te_identity_then_cl",
        post(b"Transfer-Encoding: identity\r\nContent-Length: 5\r\n", b"hello"),
        400,
        "invalid_transfer_encoding",
    ),
    Shape(
        "cl_then_te_identity",
        post(b"Content-Length: 5\r\nTransfer-Encoding: identity\r\n", b"hello"),
        400,
        "invalid_transfer_encoding",
    ),
    Shape(
        "te_lines_chunked_identity",
        post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", CHUNKED_HELLO),
        400,
        "invalid_transfer_encoding",
    ),
    Shape(
        "te_lines_identity_chunked",
        post(b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n", CHUNKED_HELLO),
        501,
        "unsupported_transfer_coding",
    ),
    Shape(
        "te_chunked_on_http10",
        post(b"Transfer-Encoding: chunked\r\n", CHUNKED_HELLO, b"HTTP/1.0"),
        400,
        "invalid_transfer_encoding",
    ),
    Shape(
        "te_identity_on_http10",
        post(b"Transfer-Encoding: identity\r\nContent-Length: 5\r\n", b"hello", b"HTTP/1.0"),
        400,
        "invalid_transfer_encoding",
    ),
    Shape(
        "obs_fold_transfer_encoding",
        post(b"Transfer-Encoding:\r\n chunked\r\n", CHUNKED_HELLO),
        400,
        "obsolete_line_folding",
    ),
    Shape(
        "obs_fold_tab",
        post(b"X-A: a\r\n\tb\r\nContent-Length: 5\r\n", b"hello"),
        400,
        "obsolete_line_folding",
    ),
    Shape(
        "space_before_first_header",
        b"POST / HTTP/1.1\r\n Transfer-Encoding: chunked\r\nHost: p\r\n\r\n" + CHUNKED_HELLO,
        400,
        "obsolete_line_folding",
    ),
    Shape(
        "ctl_in_value",
        b"GET / HTTP/1.1\r\nHost: p\r\nX-A: a\x01b\r\n\r\n",
        400,
        "invalid_header_value",
    ),
    Shape(
        "esc_in_value",
        b"GET / HTTP/1.1\r\nHost: p\r\nX-A: \x1b[31m\r\n\r\n",
        400,
        "invalid_header_value",
    ),
    Shape(
        "del_in_value",
        b"GET / HTTP/1.1\r\nHost: p\r\nX-A: a\x7f\r\n\r\n",
        400,
        "invalid_header_value",
    ),
    Shape(
        "vtab_in_transfer_encoding",
        post(b"Transfer-Encoding: \x0bchunked\r\n", CHUNKED_HELLO),
        400,
        "invalid_header_value",
    ),
    Shape(
        "del_in_target",
        b"GET /v1/a\x7fb HTTP/1.1\r\nHost: p\r\n\r\n",
        400,
        "invalid_request_target",
    ),
    Shape(
        "high_byte_in_target",
        b"GET /v1/a\xa0b HTTP/1.1\r\nHost: p\r\n\r\n",
        400,
        "invalid_request_target",
    ),
    Shape(
        "fragment_in_target",
        b"GET /v1/models#x HTTP/1.1\r\nHost: p\r\n\r\n",
        400,
        "invalid_request_target",
    ),
    Shape(
        "userinfo_in_absolute_target",
        b"GET http://user:pw@proxy/v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n",
        400,
        "invalid_request_target",
    ),
    Shape(
        "userinfo_in_absolute_target_https",
        b"GET HTTPS://evil@proxy HTTP/1.1\r\nHost: proxy\r\n\r\n",
        400,
        "invalid_request_target",
    ),
    Shape("no_host_on_http11", b"GET /v1/models HTTP/1.1\r\n\r\n", 400, "missing_host"),
    Shape("two_hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "invalid_host"),
    Shape("host_list", b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", 400, "invalid_host"),
    Shape("host_userinfo", b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400, "invalid_host"),
    Shape("host_path", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400, "invalid_host"),
    Shape(
        "trailer_with_nul",
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nX-T: \x00\r\n\r\n"),
        400,
        "invalid_trailer",
    ),
    Shape(
        "trailer_without_colon",
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nnocolon\r\n\r\n"),
        400,
        "invalid_trailer",
    ),
    Shape(
        "content_length_over_cap",
        post(b"Content-Length: %d\r\n" % (CAP + 1)),
        413,
        "request_too_large",
    ),
    Shape(
        "content_length_absurd",
        post(b"Content-Length: 99999999999999999999999999\r\n"),
        413,
        "request_too_large",
    ),
    Shape(
        "chunked_over_cap",
        post(
            b"Transfer-Encoding: chunked\r\n",
            b"%x\r\n%s\r\n0\r\n\r\n" % (CAP + 1, b"a" * (CAP + 1)),
        ),
        413,
        "request_too_large",
    ),
    Shape(
        "gzip_chunked",
        post(b"Transfer-Encoding: gzip, chunked\r\n", CHUNKED_HELLO),
        501,
        "unsupported_transfer_coding",
    ),
    Shape(
        "chunked_twice",
        post(b"Transfer-Encoding: chunked, chunked\r\n", CHUNKED_HELLO),
        400,
        "invalid_transfer_encoding",
    ),
    Shape(
        "chunked_not_final",
        post(b"Transfer-Encoding: chunked, identity\r\n", CHUNKED_HELLO),
        400,
        "invalid_transfer_encoding",
    ),
    Shape(
        "te_empty_element",
        post(b"Transfer-Encoding: chunked,\r\n", CHUNKED_HELLO),
        400,
        "invalid_transfer_encoding",
    ),
    Shape(
        "te_quoted",
        post(b'Transfer-Encoding: "chunked"\r\n', CHUNKED_HELLO),
        400,
        "invalid_transfer_encoding",
    ),
    Shape(
        "cl_with_chunked",
        post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", CHUNKED_HELLO),
        400,
        "invalid_content_length",
    ),
    Shape(
        "chunked_with_cl",
        post(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", CHUNKED_HELLO),
        400,
        "invalid_content_length",
    ),
    Shape(
        "huge_header",
        b"GET / HTTP/1.1\r\nHost: p\r\nX-A: " + b"a" * 20000 + b"\r\n\r\n",
        431,
        "request_header_fields_too_large",
    ),
    Shape(
        "too_many_headers",
        b"GET / HTTP/1.1\r\nHost: p\r\n"
        + b"".join(b"X-%d: a\r\n" % i for i in range(101))
        + b"\r\n",
        431,
        "request_header_fields_too_large",
    ),
    Shape(
        "head_too_large",
        b"GET / HTTP/1.1\r\nHost: p\r\n"
        + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(17))
        + b"\r\n",
        431,
        "request_header_fields_too_large",
    ),
    Shape(
        "request_line_too_long",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: p\r\n\r\n",
        414,
        "uri_too_long",
    ),
]

#: Shapes Twisted refuses already, with a bare 400: now the JSON answer.
TWISTED = [
    Shape("cl_plus", post(b"Content-Length: +5\r\n", b"hello"), 400, "malformed_request"),
    Shape("cl_minus", post(b"Content-Length: -1\r\n", b"hello"), 400, "malformed_request"),
    Shape("cl_list", post(b"Content-Length: 5, 5\r\n", b"hello"), 400, "malformed_request"),
    Shape(
        "cl_twice_same",
        post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
        400,
        "malformed_request",
    ),
    Shape("cl_hex", post(b"Content-Length: 0x5\r\n", b"hello"), 400, "malformed_request"),
    Shape(
        "chunk_size_0x",
        post(b"Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n"),
        400,
        "malformed_request",
    ),
    Shape(
        "chunk_size_leading_space",
        post(b"Transfer-Encoding: chunked\r\n", b" 5\r\nhello\r\n0\r\n\r\n"),
        400,
        "malformed_request",
    ),
    Shape(
        "chunk_size_trailing_junk",
        post(b"Transfer-Encoding: chunked\r\n", b"5g\r\nhello\r\n0\r\n\r\n"),
        400,
        "malformed_request",
    ),
    Shape(
        "chunk_size_bare_lf",
        post(b"Transfer-Encoding: chunked\r\n", b"5\nhello\r\n0\r\n\r\n"),
        400,
        "malformed_request",
    ),
    Shape(
        "chunk_data_bare_lf",
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\n0\r\n\r\n"),
        400,
        "malformed_request",
    ),
    Shape(
        "chunk_ext_bare_lf",
        post(b"Transfer-Encoding: chunked\r\n", b"5;a\nb\r\nhello\r\n0\r\n\r\n"),
        400,
        "malformed_request",
    ),
    Shape(
        "chunk_longer_than_size",
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhelloXX\r\n0\r\n\r\n"),
        400,
        "malformed_request",
    ),
    Shape("space_before_colon", b"GET / HTTP/1.1\r\nHost : p\r\n\r\n", 400, "malformed_request"),
    Shape(
        "te_space_before_colon",
        post(b"Transfer-Encoding : chunked\r\n", CHUNKED_HELLO),
        400,
        "malformed_request",
    ),
    Shape(
        "nul_in_name", b"GET / HTTP/1.1\r\nHost: p\r\nX-\x00A: a\r\n\r\n", 400, "malformed_request"
    ),
    Shape(
        "bare_lf_after_request_line", b"GET / HTTP/1.1\nHost: p\r\n\r\n", 400, "bare_line_feed"
    ),
    Shape(
        "bare_lf_between_headers",
        b"GET / HTTP/1.1\r\nHost: p\r\nX-A: a\nX-B: b\r\n\r\n",
        400,
        "bare_line_feed",
    ),
    Shape(
        "bare_lf_ending_head",
        b"GET / HTTP/1.1\r\nHost: p\r\nX-A: a\r\n\n",
        400,
        "bare_line_feed",
    ),
    Shape("http_12", b"GET / HTTP/1.2\r\nHost: p\r\n\r\n", 400, "malformed_request"),
    Shape("double_space", b"GET  / HTTP/1.1\r\nHost: p\r\n\r\n", 400, "malformed_request"),
    Shape("h2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "malformed_request"),
]

#: Shapes that must be served, with the body they carry.
ACCEPTED = [
    ("chunked", post(b"Transfer-Encoding: chunked\r\n", CHUNKED_HELLO), b"hello"),
    ("chunked_any_case", post(b"Transfer-Encoding: ChUnKeD\r\n", CHUNKED_HELLO), b"hello"),
    ("chunked_tab_ows", post(b"Transfer-Encoding:\tchunked\t\r\n", CHUNKED_HELLO), b"hello"),
    (
        "chunk_extension",
        post(b"Transfer-Encoding: chunked\r\n", b"5;a=b\r\nhello\r\n0\r\n\r\n"),
        b"hello",
    ),
    (
        "trailer",
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"),
        b"hello",
    ),
    ("content_length_leading_zeros", post(b"Content-Length: 005\r\n", b"hello"), b"hello"),
    ("content_length_at_cap", post(b"Content-Length: %d\r\n" % CAP, b"a" * CAP), b"a" * CAP),
    (
        "chunked_at_cap",
        post(
            b"Transfer-Encoding: chunked\r\n",
            b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (600, b"a" * 600, CAP - 600, b"b" * (CAP - 600)),
        ),
        b"a" * 600 + b"b" * (CAP - 600),
    ),
    ("utf8_in_value", b"GET / HTTP/1.1\r\nHost: p\r\nX-A: caf\xc3\xa9\r\n\r\n", b""),
    ("empty_host", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", b""),
    ("host_ipv6_port", b"GET / HTTP/1.1\r\nHost: [::1]:8000\r\n\r\n", b""),
    ("absolute_target", b"GET http://proxy/v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n", b""),
    ("at_in_absolute_path", b"GET http://proxy/v1/@x?y=@ HTTP/1.1\r\nHost: proxy\r\n\r\n", b""),
    ("http10_without_host", b"GET / HTTP/1.0\r\n\r\n", b""),
    ("leading_empty_line", b"\r\nGET / HTTP/1.1\r\nHost: p\r\n\r\n", b""),
    (
        "hundred_headers",
        b"GET / HTTP/1.1\r\n"
        + b"".join(b"X-%d: a\r\n" % i for i in range(99))
        + b"Host: p\r\n\r\n",
        b"",
    ),
]


class ShapeTests(SynchronousTestCase):
    """Every shape, refused or served; generated one test a shape."""

    def check_refused(self, shape: Shape) -> None:
        server = Server()
        answer = parse_answer(server.feed(shape.raw))
        self.assertEqual(server.resource.seen, [])
        self.assertEqual(
            (answer.status, answer.json()["error"]["code"]), (shape.status, shape.code)
        )
        self.assertEqual(answer.json()["error"]["type"], "invalid_request_error")
        self.assertEqual(answer.headers[b"connection"], b"close")
        self.assertTrue(server.transport.write_closed)

    def check_served(self, raw: bytes, body: bytes) -> None:
        server = Server()
        answer = parse_answer(server.feed(raw))
        self.assertEqual(answer.status, 200)
        self.assertEqual([r.body for r in server.resource.seen], [body])
        self.assertFalse(server.transport.write_closed)


class BytewiseShapeTests(ShapeTests):
    """Every shape again, fed one byte at a time: the header section is then
    never whole in one read, so it takes the line-by-line way
    (:func:`~twisted_forward.framing.split_head` is for whole ones), and
    must be judged the same."""

    def check_refused(self, shape: Shape) -> None:
        super().check_refused(Shape(shape.name, Bytewise(shape.raw), shape.status, shape.code))

    def check_served(self, raw: bytes, body: bytes) -> None:
        super().check_served(Bytewise(raw), body)


class Bytewise(bytes):
    """Marks bytes :class:`Server.feed` gives the channel one at a time."""


for _case in (ShapeTests, BytewiseShapeTests):
    for _shape in ADDED + TWISTED:
        setattr(
            _case,
            f"test_refused_{_shape.name}",
            lambda self, shape=_shape: self.check_refused(shape),
        )
    for _name, _raw, _body in ACCEPTED:
        setattr(
            _case,
            f"test_served_{_name}",
            lambda self, raw=_raw, body=_body: self.check_served(raw, body),
        )


class RefusalTests(SynchronousTestCase):
    """What happens around a refusal."""

    def test_answer_shape(self):
        """Status line, Date, JSON type and length, close; OpenAI error body."""
        server = Server(now=1_700_000_000)
        raw = server.feed(b"GET / HTTP/1.1\r\n\r\n")
        answer = parse_answer(raw)
        self.assertTrue(raw.startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertEqual(answer.headers[b"date"], b"Tue, 14 Nov 2023 22:13:20 GMT")
        self.assertEqual(answer.headers[b"content-type"], b"application/json")
        self.assertEqual(int(answer.headers[b"content-length"]), len(answer.body))
        self.assertEqual(
            answer.json(),
            {
                "error": {
                    "message": "HTTP/1.1 requests must carry a Host header.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "missing_host",
                }
            },
        )

    def test_reason_phrase_431(self):
        """A request with too many header lines is refused with the status line "431 Request
        Header Fields Too Large", the standard reason phrase."""
        [shape] = [s for s in ADDED if s.name == "too_many_headers"]
        raw = Server().feed(shape.raw)
        self.assertTrue(raw.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"))

    def test_pipelined_request_after_refusal_not_served(self):
        """The body Twisted would take for the next request is never parsed."""
        server = Server()
        server.feed(post(b"Transfer-Encoding: identity\r\n", SMUGGLED))
        server.feed(SMUGGLED)
        self.assertEqual(server.resource.seen, [])
        self.assertEqual(server.transport.value().count(b"HTTP/1.1 "), 1)

    def test_served_then_refused_on_one_connection(self):
        """On one kept-alive connection a good request is served and a following malformed
        one refused with 400; the bytes smuggled after it never become a request."""
        server = Server()
        server.feed(b"GET /first HTTP/1.1\r\nHost: p\r\n\r\n")
        server.feed(b"GET /second HTTP/1.1\r\nHost: p\r\nX: \x01\r\n\r\n" + SMUGGLED)
        self.assertEqual([r.uri for r in server.resource.seen], [b"/first"])
        self.assertIn(b"HTTP/1.1 400 Bad Request", server.transport.value())

    def test_lingers_then_aborts(self):
        """After the answer the write side closes; what the client still
        sends is dropped until the linger time is over."""
        server = Server()
        server.feed(post(b"Content-Length: 5000\r\n"))
        answered = server.transport.value()
        self.assertTrue(server.transport.write_closed)
        self.assertFalse(server.transport.disconnecting)
        server.feed(b"a" * 4000 + SMUGGLED)
        self.assertEqual(server.transport.value(), answered)
        self.assertEqual(server.resource.seen, [])
        server.clock.advance(server.channel.linger_seconds - 0.1)
        self.assertFalse(server.transport.disconnecting)
        server.clock.advance(0.1)
        self.assertTrue(server.transport.disconnected)

    def test_linger_bounded_in_bytes(self):
        """After a refusal the channel reads and discards at most linger_bytes of the
        unwanted body, then closes, leaving no timer: a refused client cannot keep the
        connection busy."""
        server = Server()
        server.feed(post(b"Content-Length: 5000\r\n"))
        server.feed(b"a" * server.channel.linger_bytes)
        self.assertFalse(server.transport.disconnecting)
        server.feed(b"a")
        self.assertTrue(server.transport.disconnected)
        self.assertEqual(server.clock.getDelayedCalls(), [])

    def test_connection_lost_cancels_linger(self):
        """A refused connection that closes while lingering cancels the linger timer, so no
        call is left on the reactor."""
        server = Server()
        server.feed(post(b"Content-Length: 5000\r\n"))
        # The idle timeout is off; the linger timer is the one call left.
        calls = [c.getTime() for c in server.clock.getDelayedCalls() if c.active()]
        self.assertEqual(calls, [server.channel.linger_seconds])
        server.channel.connectionLost(None)
        self.assertFalse(any(c.active() for c in server.clock.getDelayedCalls()))

    def test_without_half_close_closes(self):
        """A transport that cannot close one side (TLS) is closed whole."""
        server = Server(half_close=False)
        answer = parse_answer(server.feed(post(b"Transfer-Encoding: identity\r\n")))
        self.assertEqual(answer.status, 400)
        self.assertTrue(server.transport.disconnecting)

    def test_refusal_logged_without_request_details(self):
        """A refusal is logged with its status, code and peer only: the request target
        (which may hold a key) is not in the event."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        Server().feed(b"GET /v1/models?key=sk-secret HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        [event] = [
            e for e in events if e.get("log_namespace") == "twisted_forward.framing.ForwardChannel"
        ]
        self.assertEqual((event["status"], event["code"]), (400, "invalid_host"))
        self.assertEqual(event["peer"], "192.168.1.1")
        self.assertNotIn("sk-secret", repr(event))


class BodyCapTests(SynchronousTestCase):
    """MAX_REQUEST_BODY, enforced while the body arrives."""

    def test_content_length_over_cap_before_100_continue(self):
        """No ``100 Continue``: the client never sends the body."""
        server = Server()
        raw = server.feed(post(b"Content-Length: %d\r\nExpect: 100-continue\r\n" % (CAP + 1)))
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw)
        self.assertNotIn(b"100 Continue", raw)

    def test_content_length_under_cap_gets_100_continue(self):
        """A request with Expect: 100-continue and a Content-Length at the cap gets "100
        Continue", so the client sends its body."""
        server = Server()
        raw = server.feed(post(b"Content-Length: %d\r\nExpect: 100-continue\r\n" % CAP))
        self.assertEqual(raw, b"HTTP/1.1 100 Continue\r\n\r\n")

    def test_chunked_refused_once_over(self):
        """The cap counts decoded bytes as they come, across chunks."""
        server = Server()
        server.feed(post(b"Transfer-Encoding: chunked\r\n", b"258\r\n" + b"a" * 600 + b"\r\n"))
        self.assertEqual(server.transport.value(), b"")
        request = server.channel.requests[-1]
        self.assertEqual(request.body_received, 600)
        server.feed(b"258\r\n" + b"a" * 300)
        self.assertEqual(server.transport.value(), b"")
        server.feed(b"a" * 101)
        self.assertEqual(parse_answer(server.transport.value()).status, 413)
        self.assertEqual(server.resource.seen, [])
        # Nothing past the cap was kept.
        self.assertLessEqual(request.content.tell(), CAP)

    def test_one_chunk_declaring_more_than_cap(self):
        """A chunk-size line alone does not refuse; its data does."""
        server = Server()
        server.feed(post(b"Transfer-Encoding: chunked\r\n", b"fffffffffff\r\n"))
        self.assertEqual(server.transport.value(), b"")
        server.feed(b"a" * (CAP + 1))
        self.assertEqual(parse_answer(server.transport.value()).status, 413)

    def test_no_cap(self):
        """With no MAX_REQUEST_BODY a 5000-byte body is read and served whole."""
        server = Server(max_request_body=None)
        server.feed(post(b"Content-Length: 5000\r\n", b"a" * 5000))
        self.assertEqual([len(r.body) for r in server.resource.seen], [5000])

    def test_large_bodies_spooled_to_a_file(self):
        """Twisted keeps a body of 100 kB or more, and every chunked body, in
        a temporary file: the proxy never holds a large body in memory."""
        server = Server(max_request_body=1 << 20)
        server.feed(post(b"Content-Length: 200000\r\n", b"a" * 200_000))
        server.feed(post(b"Transfer-Encoding: chunked\r\n", CHUNKED_HELLO))
        server.feed(post(b"Content-Length: 5\r\n", b"hello"))
        kinds = [issubclass(r.content_type, BytesIO) for r in server.resource.seen]
        self.assertEqual(kinds, [False, False, True])


class FormBodyTests(SynchronousTestCase):
    """Bodies are the upstream's to read: Twisted does not parse forms."""

    def test_malformed_multipart_served(self):
        """Twisted would answer 400 itself after reading it all into memory."""
        body = b"no parts here"
        server = Server()
        server.feed(
            post(
                b"Content-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: %d\r\n" % len(body),
                body,
            )
        )
        self.assertEqual([r.body for r in server.resource.seen], [body])

    def test_form_not_parsed_into_args(self):
        """A urlencoded form body is left as bytes for the upstream: request.args holds only
        the query's arguments, not the form's."""
        body = b"a=1&b=2"
        server = Server()
        server.feed(
            b"POST /v1/x?q=1 HTTP/1.1\r\nHost: p\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        [rendered] = server.resource.seen
        self.assertEqual((rendered.args, rendered.body), ({b"q": [b"1"]}, body))


class LimitTests(SynchronousTestCase):
    """Header limits come from the site."""

    def test_site_limits(self):
        """The channel takes its header-count and head-size caps from the site: one header
        over the count, or one line over the size, is refused with 431; a head within
        both is served."""
        server = Server(max_headers=3, max_header_bytes=200)
        self.assertEqual(
            (
                server.channel.maxHeaders,
                server.channel.totalHeadersSize,
                server.channel.MAX_LENGTH,
            ),
            (3, 200, 200),
        )
        raw = server.feed(b"GET / HTTP/1.1\r\nHost: p\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
        self.assertEqual(parse_answer(raw).status, 431)
        server = Server(max_headers=3, max_header_bytes=200)
        raw = server.feed(b"GET / HTTP/1.1\r\nHost: p\r\nA: " + b"a" * 200 + b"\r\n\r\n")
        self.assertEqual(parse_answer(raw).status, 431)
        server = Server(max_headers=3, max_header_bytes=200)
        server.feed(b"GET / HTTP/1.1\r\nHost: p\r\nA: 1\r\nB: 2\r\n\r\n")
        self.assertEqual(len(server.resource.seen), 1)


class CheckTests(SynchronousTestCase):
    """The decision table of RFC 9112 §6.1 for transfer codings."""

    def test_transfer_codings(self):
        """Transfer-Encoding is accepted only as absent or exactly "chunked": identity, gzip
        alone, chunked twice, chunked not last or an empty coding get 400, and an
        unsupported coding before chunked gets 501 (RFC 9112 §6.1); names are split
        case-blind."""
        def code(*codings: bytes) -> Optional[int]:
            refusal: Optional[Refusal] = framing.check_transfer_codings(list(codings))
            return None if refusal is None else refusal.status

        self.assertIsNone(code())
        self.assertIsNone(code(b"chunked"))
        self.assertEqual(code(b"identity"), 400)
        self.assertEqual(code(b"gzip"), 400)
        self.assertEqual(code(b"chunked", b"gzip"), 400)
        self.assertEqual(code(b"chunked", b"chunked"), 400)
        self.assertEqual(code(b""), 400)
        self.assertEqual(code(b"gzip", b"chunked"), 501)
        self.assertEqual(code(b"identity", b"chunked"), 501)
        self.assertEqual(framing.split_codings(b"GZip ,\tChunked"), [b"gzip", b"chunked"])
