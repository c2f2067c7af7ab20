"""
A request's header section taken whole (:func:`twisted_forward.framing.split_head`)
when it arrives in one read, fed to the real channel on a StringTransport.

The refusals themselves are :mod:`tests.test_framing`'s shapes, run both
whole and byte by byte; here: what :func:`split_head` takes and leaves, and
that a request read whole is the same request as one read line by line.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.framing import ForwardChannel, split_head

from .test_framing import Server, parse_answer

SDK_HEAD = (
    b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: proxy:8000\r\n"
    b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n"
    b"Accept: application/json\r\nContent-Type: application/json\r\n"
    b"User-Agent: OpenAI/Python 1.54.0\r\nX-Stainless-Lang: python\r\n"
    b"X-Stainless-Arch: x64\r\nAuthorization:   Bearer fk-abc \t\r\n"
    b"X-Empty:\r\nX-Dup: 1\r\nx-dup: 2\r\nX-Latin: caf\xe9\r\n"
    b"Content-Length: 5\r\n\r\n"
)


class SplitHeadTests(SynchronousTestCase):
    """What :func:`split_head` takes whole, and what it leaves to the line parser."""

    def test_whole_section(self) -> None:
        """A clean section: its pairs, values stripped of SP/HTAB, and the
        offset just past the blank line (the body starts there)."""
        data = b"Host: p\r\nX-A:\t a b \r\nX-Empty:\r\n\r\nBODY"
        fields, end = split_head(data, 100, 16384)
        self.assertEqual(fields, [(b"Host", b"p"), (b"X-A", b"a b"), (b"X-Empty", b"")])
        self.assertEqual(data[end:], b"BODY")

    def test_left_to_the_line_parser(self) -> None:
        """Anything unusual is not taken: not all here yet, no header at all,
        a bare LF or CR, a folded line, a control byte in a value, a name
        that is not a token, too many lines, too many bytes."""
        for data in [
            b"Host: p\r\nX-A: a\r\n",  # the blank line has not arrived
            b"\r\nBODY",  # no header
            b"Host: p\r\nX-A: a\nX-B: b\r\n\r\n",  # bare LF
            b"Host: p\r\nX-A: a\rb\r\n\r\n",  # bare CR
            b"Host: p\r\n folded\r\n\r\n",
            b"Host: p\r\nX-A: a\x01b\r\n\r\n",
            b"Host: p\r\nX-A: a\x7fb\r\n\r\n",
            b"Host: p\r\nX A: a\r\n\r\n",
            b"Host : p\r\n\r\n",
            b"Host: p\r\nNoColon\r\n\r\n",
        ]:
            self.assertIsNone(split_head(data, 100, 16384), data)
        three = b"A: 1\r\nB: 2\r\nC: 3\r\n\r\n"
        self.assertIsNotNone(split_head(three, 3, 16384))
        self.assertIsNone(split_head(three, 2, 16384))
        # 12 bytes of lines, CRLFs not counted (as the line parser counts).
        self.assertIsNotNone(split_head(three, 3, 12))
        self.assertIsNone(split_head(three, 3, 11))

    def test_htab_and_obs_text_kept(self) -> None:
        """HTAB inside a value and bytes over 0x7f (obs-text) are allowed,
        as the line parser allows them."""
        fields, _ = split_head(b"X-A: a\tb\xe9\r\n\r\n", 100, 16384)
        self.assertEqual(fields, [(b"X-A", b"a\tb\xe9")])


class WholeHeadChannelTests(SynchronousTestCase):
    """The channel with and without whole heads gives the resource the same request."""

    def served(self, whole: bool, chunks: list[bytes]) -> tuple[Server, list]:
        server = Server()
        server.channel.whole_heads = whole
        seen = []
        original = server.resource.render

        def render(request):
            seen.append(
                (request.method, request.uri, request.clientproto,
                 sorted(request.requestHeaders.getAllRawHeaders()))
            )
            return original(request)

        server.resource.render = render
        for chunk in chunks:
            server.feed(chunk)
        return server, seen

    def test_same_request_either_way(self) -> None:
        """A long SDK-like head, read whole and read line by line: the same
        method, target, version, headers (names, order of repeated ones,
        values) and body reach the resource."""
        raw = SDK_HEAD + b"hello"
        whole, seen_whole = self.served(True, [raw])
        lines, seen_lines = self.served(False, [raw])
        self.assertEqual(seen_whole, seen_lines)
        self.assertEqual(len(seen_whole), 1)
        headers = dict(seen_whole[0][3])
        self.assertEqual(headers[b"X-Dup"], [b"1", b"2"])
        self.assertEqual(headers[b"Authorization"], [b"Bearer fk-abc"])
        self.assertEqual([r.body for r in whole.resource.seen], [b"hello"])
        self.assertEqual(parse_answer(whole.transport.value()).status, 200)

    def test_whole_head_taken_in_one_read(self) -> None:
        """With whole heads on, the section is not fed line by line: the
        channel's ``headerReceived`` sees only the framing header."""
        server = Server()
        names = []
        original = server.channel.headerReceived

        def header_received(line: bytes) -> bool:
            names.append(line.partition(b":")[0])
            return original(line)

        server.channel.headerReceived = header_received  # type: ignore[method-assign]  # a spy
        server.feed(SDK_HEAD + b"hello")
        self.assertEqual(names, [b"Content-Length"])
        self.assertEqual([r.body for r in server.resource.seen], [b"hello"])

    def test_head_in_pieces(self) -> None:
        """A head cut anywhere (mid-line, between lines, before the blank
        line) is read line by line once cut, and served the same."""
        raw = SDK_HEAD + b"hello"
        _, expected = self.served(False, [raw])
        for cut in (40, len(SDK_HEAD) // 2, len(SDK_HEAD) - 2, len(SDK_HEAD) - 1):
            _, seen = self.served(True, [raw[:cut], raw[cut:]])
            self.assertEqual(seen, expected, cut)

    def test_pipelined_requests_in_one_read(self) -> None:
        """Three requests in one read (bodies and none) are each served, in
        order, with their own headers."""
        raw = (
            b"GET /a HTTP/1.1\r\nHost: p\r\nX-N: 1\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\nX-N: 2\r\n\r\nabc"
            b"GET /c HTTP/1.1\r\nHost: p\r\nX-N: 3\r\n\r\n"
        )
        server, seen = self.served(True, [raw])
        self.assertEqual([s[1] for s in seen], [b"/a", b"/b", b"/c"])
        self.assertEqual([dict(s[3])[b"X-N"] for s in seen], [[b"1"], [b"2"], [b"3"]])
        self.assertEqual([r.body for r in server.resource.seen], [b"", b"abc", b""])
        self.assertEqual(server.transport.value().count(b"HTTP/1.1 200 "), 3)

    def test_chunked_body_after_whole_head(self) -> None:
        """Transfer-Encoding read whole still picks the chunked decoder."""
        server, _ = self.served(
            True, [b"POST / HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n0\r\n\r\n"]
        )
        self.assertEqual([r.body for r in server.resource.seen], [b"hello"])

    def test_expect_continue_after_whole_head(self) -> None:
        """``Expect: 100-continue`` read whole still gets its interim answer
        before the body, and the body is then served."""
        server = Server()
        raw = server.feed(
            b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        self.assertTrue(raw.startswith(b"HTTP/1.1 100 Continue\r\n"), raw)
        server.feed(b"hello")
        self.assertEqual([r.body for r in server.resource.seen], [b"hello"])

    def test_default_on(self) -> None:
        """Whole heads are the channel's default."""
        self.assertTrue(ForwardChannel.whole_heads)


class BodyDeadlineTests(SynchronousTestCase):
    """A body that came whole with its head needs no deadline of its own."""

    def body_timers(self, server: Server) -> list:
        return [
            call for call in server.clock.getDelayedCalls()
            if getattr(call.func, "__name__", "") == "_body_check"
        ]

    def test_no_body_timer_when_body_in_hand(self) -> None:
        """Head and whole body in one read: served, and no body timer was
        ever started (each would be a timer made and cancelled per request)."""
        server = Server(body_timeout=60.0)
        started = []
        original = server.channel.callLater

        def call_later(delay, func, *args, **kwargs):
            started.append(getattr(func, "__name__", ""))
            return original(delay, func, *args, **kwargs)

        server.channel.callLater = call_later  # type: ignore[method-assign]  # a spy
        server.feed(b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual([r.body for r in server.resource.seen], [b"hello"])
        self.assertNotIn("_body_check", started)

    def test_body_timer_when_body_still_coming(self) -> None:
        """A body not all here with the head keeps its deadline: 408 after
        body_timeout seconds of silence."""
        server = Server(body_timeout=60.0)
        server.feed(b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n\r\nhel")
        self.assertEqual(len(self.body_timers(server)), 1)
        server.clock.advance(60)
        answer = parse_answer(server.transport.value())
        self.assertEqual((answer.status, answer.json()["error"]["code"]),
                         (408, "request_body_timeout"))
        self.assertEqual(server.resource.seen, [])
