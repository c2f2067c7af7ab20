"""
End to end: an upstream that frames its answers badly or hostilely, through
the real plugin (issue 10, items 6 and 7): a HEAD (or 204, 304) answered
with a whole second response must not reach the next request on the
connection; an answer head too large, too long, or holding control bytes is
a 502.  The upstream is tests/raw_upstream.py, which writes bytes by hand.
"""

from __future__ import annotations

from twisted.internet import defer

from .raw_upstream import answer
from .test_e2e_hostile_upstream import HostileCase, _json

# ------------------------------------------------------------------ item 6


class BodilessAnswers(HostileCase):
    """A connection is not reused after an answer that ends with its head."""

    @defer.inlineCallbacks
    def check_no_smuggling(self, method: bytes, status: bytes):
        yield self.start_raw()
        smuggled = answer(b"200 OK", [(b"X-Smuggled", b"1")], b"smuggled")

        def handler(connection, request):
            if request.method == method and request.target == b"/first":
                # The answer, then a whole second one "in its body" (sent
                # late, as a later TCP segment would arrive).
                connection.write(answer(status, [(b"Content-Length", b"%d" % len(smuggled))]))
                connection.smuggle = True
                return
            if getattr(connection, "smuggle", False):
                connection.smuggle = False
                connection.write(smuggled)
                return
            connection.write(answer(b"200 OK", [(b"X-Honest", b"1")], b"honest"))

        self.raw.handler = handler
        response, _ = yield self.request(method, "/first")
        self.assertEqual(response.code, int(status[:3]))
        for _ in range(3):
            response, body = yield self.request(b"GET", "/second")
            self.assertIsNone(response.headers.getRawHeaders(b"x-smuggled"))
            self.assertEqual(body, b"honest")
        first = [s.connection for s in self.raw.seen if s.target == b"/first"]
        later = [s.connection for s in self.raw.seen if s.target == b"/second"]
        self.assertNotIn(first[0], later)

    def test_head_answer_does_not_reach_the_next_request(self):
        """HEAD answered with a body forming a second response: the next
        request does not get it (the connection was not pooled)."""
        return self.check_no_smuggling(b"HEAD", b"200 OK")

    def test_204_answer_does_not_reach_the_next_request(self):
        """The same after a 204, which has no body either."""
        return self.check_no_smuggling(b"GET", b"204 No Content")

    def test_304_answer_does_not_reach_the_next_request(self):
        """The same after a 304."""
        return self.check_no_smuggling(b"GET", b"304 Not Modified")


# ------------------------------------------------------------------ item 7


class AnswerHeadLimits(HostileCase):
    """The upstream's answer head is bounded and clean, or the client gets 502."""

    @defer.inlineCallbacks
    def check_502(self, head_lines: list[tuple[bytes, bytes]], code: str, **env: str):
        yield self.start_raw(**env)
        self.raw.handler = lambda connection, request: connection.write(
            answer(b"200 OK", head_lines, b"{}")
        )
        response, body = yield self.request(b"GET", "/v1/models")
        self.assertEqual(response.code, 502)
        self.assertEqual(_json(body)["error"]["code"], code)
        yield self.raw.all_closed()
        # And the proxy serves on.
        self.raw.handler = lambda connection, request: connection.write(
            answer(b"200 OK", [], b"{}")
        )
        response, body = yield self.request(b"GET", "/v1/models")
        self.assertEqual(response.code, 200)

    def test_too_many_header_lines(self):
        """5,000 header lines (default cap: 100) are a 502."""
        return self.check_502(
            [(b"X-Many-%d" % i, b"v") for i in range(5000)], "upstream_head_too_large"
        )

    def test_header_lines_cap_is_a_setting(self):
        """MAX_UPSTREAM_HEADERS lowers the line cap."""
        return self.check_502(
            [(b"X-Some-%d" % i, b"v") for i in range(20)], "upstream_head_too_large",
            MAX_UPSTREAM_HEADERS="10",
        )

    def test_head_too_large(self):
        """A head over MAX_UPSTREAM_HEAD bytes (in few lines) is a 502."""
        return self.check_502(
            [(b"X-Big-%d" % i, b"v" * 8000) for i in range(4)], "upstream_head_too_large",
            MAX_UPSTREAM_HEAD="16KiB",
        )

    def test_control_byte_in_a_header_value(self):
        """A control byte in a header value is a 502, not relayed."""
        return self.check_502([(b"X-Bad", b"a\x01b")], "upstream_bad_head")

    def test_nul_in_a_header_value(self):
        """So is a NUL."""
        return self.check_502([(b"X-Bad", b"a\x00b")], "upstream_bad_head")

    def test_bad_header_name(self):
        """A header name that is not a token is a 502."""
        return self.check_502([(b"X Bad", b"1")], "upstream_bad_head")

    @defer.inlineCallbacks
    def test_ordinary_head_passes(self):
        """Tabs, obs-text and 90 headers are fine."""
        yield self.start_raw()
        lines = [(b"X-Ok-%d" % i, b"v\tw\xe9") for i in range(90)]
        self.raw.handler = lambda connection, request: connection.write(
            answer(b"200 OK", lines, b"{}")
        )
        response, body = yield self.request(b"GET", "/v1/models")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-ok-3"), [b"v\tw\xe9"])
