"""URL joining and request-target handling, hostile inputs included."""

from __future__ import annotations

from hyperlink import EncodedURL
from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.config import parse_url
from twisted_forward.target import BadTarget, split_target
from twisted_forward.upstream import join_url


def _forward(base: str, target: bytes) -> bytes:
    path, query = split_target(target)
    return join_url(parse_url(base), path, query)


class JoinTests(SynchronousTestCase):
    def test_plain(self):
        """A path and query are appended to a base URL without a path, unchanged."""
        self.assertEqual(
            _forward("https://api.openai.com", b"/v1/models?limit=2"),
            b"https://api.openai.com/v1/models?limit=2",
        )

    def test_base_path(self):
        """A base URL's path is kept in front of the request path, without a double slash."""
        self.assertEqual(
            _forward("https://example.com/openai/", b"/v1/chat/completions"),
            b"https://example.com/openai/v1/chat/completions",
        )

    def test_hostile_paths_cannot_change_host(self):
        """No request target (protocol-relative, @, encoded slashes, backslashes, fragments,
        queries naming a URL, absolute forms, user info, odd bytes) can move the upstream
        request off the configured host, port or user info: the proxy cannot be turned
        into an open proxy."""
        for target in (
            b"//evil.com/x",
            b"/@evil.com",
            b"/%2F%2Fevil.com",
            b"/\\\\evil.com/x",
            b"/x#@evil.com/",
            b"/x?@evil.com",
            b"/v1/x?next=http://evil.com",
            b"http://evil.com/v1/models",
            b"https://user@evil.com:443/v1/models",
            b"HTTP://evil.com",
            b"/v1/\xff\x00evil",
        ):
            url = _forward("https://api.openai.com:443", target)
            parsed = EncodedURL.from_text(url.decode("ascii"))
            self.assertEqual(parsed.host, "api.openai.com", (target, url))
            self.assertEqual(parsed.port, 443, (target, url))
            self.assertEqual(parsed.userinfo, "", (target, url))

    def test_absolute_form_uses_path_only(self):
        """An absolute-form target (http://evil.com/...) is reduced to its path and query on
        the configured upstream."""
        self.assertEqual(
            _forward("https://api.openai.com", b"http://evil.com/v1/models?x=1"),
            b"https://api.openai.com/v1/models?x=1",
        )
        self.assertEqual(
            _forward("https://api.openai.com", b"http://evil.com"),
            b"https://api.openai.com/",
        )

    def test_unsafe_bytes_escaped(self):
        """Non-ASCII bytes and # in a path are percent-escaped, so the upstream gets a valid
        URL with the same path."""
        self.assertEqual(
            _forward("http://h", b"/a\xc3\xa9#b"), b"http://h/a%C3%A9%23b"
        )

    def test_query_kept_raw(self):
        """The query is passed through exactly as sent, without decoding or re-encoding."""
        self.assertEqual(
            _forward("http://h", b"/a?x=%2F&&y&a+b=%20"), b"http://h/a?x=%2F&&y&a+b=%20"
        )

    def test_refused_targets(self):
        """Targets that are not origin-form paths (*, no leading slash, empty) or contain
        dot segments, also percent-encoded, are refused as BadTarget: no path traversal
        to other upstream routes."""
        for target in (b"*", b"evil.com/x", b"", b"/a/../b", b"/..", b"/a/./b", b"/%2e%2E/x",
                       b"/a/.%2e/b", b"http://h/../x"):
            self.assertRaises(BadTarget, split_target, target)

    def test_dots_inside_segments_allowed(self):
        """Dots inside a segment (a..b, .x) are ordinary characters, not dot segments, and
        are allowed."""
        self.assertEqual(split_target(b"/v1/files/a..b/.x"), (b"/v1/files/a..b/.x", b""))


class EndpointCacheTests(SynchronousTestCase):
    def test_one_endpoint_per_origin(self):
        """Requests to the same scheme, host and port share one endpoint whatever their
        path, while another scheme gets its own: connections are pooled per origin."""
        from twisted.web.client import URI

        from twisted_forward.outbound import _CachedEndpoints

        made = []

        class Factory:
            def endpointForURI(self, uri):
                made.append(uri.host)
                return object()

        cache = _CachedEndpoints(Factory())
        a = cache.endpointForURI(URI.fromBytes(b"https://api.openai.com/v1/models"))
        b = cache.endpointForURI(URI.fromBytes(b"https://api.openai.com/v1/chat/completions?x"))
        c = cache.endpointForURI(URI.fromBytes(b"http://api.openai.com/v1/models"))
        self.assertIs(a, b)
        self.assertIsNot(a, c)
        self.assertEqual(made, [b"api.openai.com", b"api.openai.com"])


class DirectEndpointTests(SynchronousTestCase):
    def endpoint(self, url: bytes):
        from twisted.internet.testing import MemoryReactorClock
        from twisted.web.client import URI, BrowserLikePolicyForHTTPS

        from twisted_forward.outbound import DirectEndpoints

        self.reactor = MemoryReactorClock()
        factory = DirectEndpoints(self.reactor, BrowserLikePolicyForHTTPS(), 7.0)
        return factory.endpointForURI(URI.fromBytes(url))

    def test_ip_literals_skip_resolution(self):
        """An IP literal connects straight to that address and port, with the
        connect timeout."""
        from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
        from twisted.internet.protocol import Factory, Protocol

        v4 = self.endpoint(b"http://127.0.0.1:8080/v1")
        self.assertIsInstance(v4, TCP4ClientEndpoint)
        v4.connect(Factory.forProtocol(Protocol))
        host, port, _factory, timeout, _bind = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 8080, 7.0))
        self.assertIsInstance(self.endpoint(b"http://[::1]:8080/v1"), TCP6ClientEndpoint)

    def test_names_resolved(self):
        """A host name goes through HostnameEndpoint (resolution, happy eyeballs)."""
        from twisted.internet.endpoints import HostnameEndpoint

        self.assertIsInstance(self.endpoint(b"http://api.openai.com/v1"), HostnameEndpoint)

    def test_https_wrapped_in_tls(self):
        """An https upstream's connection starts with a TLS ClientHello."""
        from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.testing import StringTransport

        named = self.endpoint(b"https://api.openai.com/v1")
        self.assertNotIsInstance(named, HostnameEndpoint)
        literal = self.endpoint(b"https://10.0.0.1/v1")
        self.assertNotIsInstance(literal, TCP4ClientEndpoint)
        literal.connect(Factory.forProtocol(Protocol))
        protocol = self.reactor.tcpClients[0][2].buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        # A TLS handshake record: content type 22, version 3.x.
        self.assertTrue(transport.value().startswith(b"\x16\x03"), transport.value()[:8])


class HostHeaderTests(SynchronousTestCase):
    """:meth:`Upstream.request` sets the Host Twisted's Agent would, once per
    origin, so the agent has no headers to copy."""

    def test_values(self):
        """Default ports left out, others kept, IPv6 literals bracketed."""
        from twisted_forward.upstream import host_value

        self.assertEqual(host_value(b"http://api.example"), b"api.example")
        self.assertEqual(host_value(b"https://api.example:443"), b"api.example")
        self.assertEqual(host_value(b"http://api.example:443"), b"api.example:443")
        self.assertEqual(host_value(b"https://10.0.0.1:8443"), b"10.0.0.1:8443")
        self.assertEqual(host_value(b"http://[::1]:8000"), b"[::1]:8000")

    def test_on_the_wire(self):
        """Through the real agent and pool: one Host line, the right value,
        and the agent sends the very headers it was given (no copy)."""
        from twisted.internet.testing import MemoryReactorClock, StringTransport
        from twisted.web.http_headers import Headers

        from twisted_forward.upstream import Upstream

        reactor = MemoryReactorClock()
        upstream = Upstream(reactor, 5.0)
        seen = []
        for path in (b"/v1/models", b"/v1/chat/completions?x=1"):
            headers = Headers({b"x-a": [b"1"]})
            seen.append(headers)
            upstream.request(b"GET", b"http://127.0.0.1:8000" + path, headers, None)
        wire = []
        for _, _, factory, _, _ in reactor.tcpClients:
            protocol = factory.buildProtocol(None)
            transport = StringTransport()
            protocol.makeConnection(transport)
            wire.append(transport.value())
        self.assertEqual(len(wire), 2)
        for raw in wire:
            lines = raw.split(b"\r\n\r\n")[0].lower().split(b"\r\n")
            self.assertEqual([line for line in lines if line.startswith(b"host:")], [b"host: 127.0.0.1:8000"])
        for headers in seen:
            self.assertEqual(headers.getRawHeaders(b"host"), [b"127.0.0.1:8000"])

    def test_given_host_kept(self):
        """A Host already in the headers is not replaced."""
        from twisted.internet.defer import succeed
        from twisted.web.http_headers import Headers

        from twisted_forward.upstream import Upstream

        class Agent:
            def request(self, method, url, headers, body):
                self.headers = headers
                return succeed(None)

        agent = Agent()
        Upstream(None, 5.0, agent=agent).request(  # type: ignore[arg-type]  # no reactor: the agent is given
            b"GET", b"https://api.example/v1", Headers({b"host": [b"other"]}), None
        )
        self.assertEqual(agent.headers.getRawHeaders(b"host"), [b"other"])
