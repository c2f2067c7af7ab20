"""
The outbound proxy (PROXY) and the upstream trust root (SSL_CERT_FILE).

Unit tests drive the CONNECT tunnel on a ``StringTransport`` with a
``MemoryReactorClock``; end-to-end tests put a small CONNECT/forward proxy
written here between the real plugin and the fake upstream served over TLS
with a certificate made by a throw-away CA.
"""

from __future__ import annotations

import base64
import json
import socket
from dataclasses import dataclass, field
from typing import Optional

from twisted.internet import defer, reactor
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, TimeoutError
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import AccumulatingProtocol, MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.proxy import Proxy, ProxyRequest
from twisted.web.server import Site

from twisted_forward.config import (
    ConfigError,
    ProxyURL,
    describe,
    load_config,
    parse_proxy_url,
)
from twisted_forward.outbound import (
    OutboundProxyError,
    TunnelEndpoint,
    proxy_authorization,
    read_ca_file,
)

from .fake_upstream import chat_chunks
from .harness import ConnectionTracker, ProxyTestCase, listen_tracked
from .tls_fixtures import ThrowawayCA

_CA: Optional[ThrowawayCA] = None


def shared_ca() -> ThrowawayCA:
    """One CA for the module (key generation is the slow part)."""
    global _CA
    if _CA is None:
        _CA = ThrowawayCA()
    return _CA


# ---------------------------------------------------------------- config


class ProxyURLTests(SynchronousTestCase):
    """PROXY parsing: user info is accepted here only, and never shown."""

    def test_plain(self) -> None:
        """A PROXY URL without user info parses to scheme and host:port with no credentials,
        and no Proxy-Authorization is sent."""
        url = parse_proxy_url("http://proxy.example:3128")
        self.assertEqual(url, ProxyURL("http", "proxy.example:3128", "", None))
        self.assertIsNone(proxy_authorization(url))

    def test_credentials_kept_apart_and_hidden(self) -> None:
        """Percent-encoded user info is decoded into credentials kept apart from the host,
        absent from str, repr and origin, and sent only as Basic Proxy-Authorization."""
        url = parse_proxy_url("http://tf%20user:p%40ss:w0rd@proxy.example:3128/")
        self.assertEqual(url.credentials, ("tf user", "p@ss:w0rd"))
        self.assertEqual(url.netloc, "proxy.example:3128")
        for shown in (str(url), repr(url), url.origin):
            self.assertNotIn("w0rd", shown)
            self.assertNotIn("tf user", shown)
        self.assertEqual(
            proxy_authorization(url),
            b"Basic " + base64.b64encode(b"tf user:p@ss:w0rd"),
        )

    def test_unencoded_at_in_password(self) -> None:
        """An unencoded @ in the password is read as part of the password: the host is what
        follows the last @."""
        url = parse_proxy_url("http://u:p@ss@127.0.0.1:8080")
        self.assertEqual(url.credentials, ("u", "p@ss"))
        self.assertEqual(url.netloc, "127.0.0.1:8080")

    def test_refused(self) -> None:
        """An https: or socks5: proxy, a path, a query, or a password without a user are
        refused with ValueError rather than half-used."""
        for value in (
            "https://proxy.example:3128",
            "socks5://proxy.example:1080",
            "http://proxy.example:3128/some/path",
            "http://:secret-pw@proxy.example:3128",
            "http://proxy.example:3128?x=1",
        ):
            with self.assertRaises(ValueError, msg=value):
                parse_proxy_url(value)

    def test_errors_do_not_repeat_the_password(self) -> None:
        """Every refusal of a PROXY URL (wrong scheme, bad port, path, #, /, ? in the
        password) leaves the password out of the error text."""
        for value in (
            "https://u:secret-pw@proxy.example:3128",
            "http://u:secret-pw@proxy.example:99999",
            "http://u:secret-pw@proxy.example/p",
            "http://u:secret#pw@proxy.example:3128",
            "http://u:secret/pw@proxy.example:3128",
            "http://u:secret?pw@proxy.example:3128",
        ):
            with self.assertRaises(ValueError) as caught:
                parse_proxy_url(value)
            self.assertNotIn("pw", str(caught.exception))

    def test_user_info_still_refused_elsewhere(self) -> None:
        """User info stays refused in OPENAI_BASE_URL: only PROXY may carry credentials."""
        with self.assertRaises(ConfigError):
            load_config({}, {"OPENAI_BASE_URL": "https://u:p@api.example"})

    def test_config_and_describe(self) -> None:
        """The --proxy option wins over PROXY from the environment, and the start-up
        description names the proxy without its password (nor does the config's repr)."""
        config = load_config(
            {"proxy": "http://u:secret-pw@127.0.0.1:3128"}, {"PROXY": "http://other:1"}
        )
        self.assertEqual(config.proxy, ProxyURL("http", "127.0.0.1:3128", "", ("u", "secret-pw")))
        lines = "\n".join(describe(config))
        self.assertIn("through the proxy http://127.0.0.1:3128", lines)
        self.assertNotIn("secret-pw", lines + repr(config))


class SSLCertFileTests(SynchronousTestCase):
    def test_valid(self) -> None:
        """A readable PEM CA file is accepted as SSL_CERT_FILE and kept in the config."""
        path = shared_ca().write(self.mktemp())
        config = load_config({}, {"SSL_CERT_FILE": path})
        self.assertEqual(config.ssl_cert_file, path)

    def test_bundle(self) -> None:
        """Every certificate of a bundle counts, with text between them."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"# first\n" + shared_ca().cert_pem + b"\n# second\n" + ThrowawayCA().cert_pem)
        subjects = [c.getSubject().commonName for c in read_ca_file(path)]
        self.assertEqual(subjects, [b"twisted-forward test CA"] * 2)

    def test_corrupt_certificate(self) -> None:
        """A PEM block OpenSSL cannot read stops start-up with a ConfigError saying so."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
        with self.assertRaises(ConfigError) as caught:
            load_config({}, {"SSL_CERT_FILE": path})
        self.assertIn("OpenSSL cannot read", str(caught.exception))

    def test_missing_or_empty(self) -> None:
        """A missing SSL_CERT_FILE stops start-up naming the setting, and a file with no PEM
        certificate stops it saying there is none."""
        with self.assertRaises(ConfigError) as caught:
            load_config({}, {"SSL_CERT_FILE": "/nonexistent/ca.pem"})
        self.assertIn("SSL_CERT_FILE", str(caught.exception))
        empty = self.mktemp()
        with open(empty, "w") as f:
            f.write("not a certificate\n")
        with self.assertRaises(ConfigError) as caught:
            load_config({}, {"SSL_CERT_FILE": empty})
        self.assertIn("no PEM certificate", str(caught.exception))


# ---------------------------------------------------------------- tunnel unit tests


class TunnelTests(SynchronousTestCase):
    """The CONNECT exchange, byte by byte, on a memory transport."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.inner = Factory.forProtocol(AccumulatingProtocol)
        self.inner.protocolConnectionMade = None  # type: ignore[attr-defined]  # AccumulatingProtocol's factory attribute

    def connect(
        self, authorization: Optional[bytes] = None, host: bytes = b"api.example"
    ) -> defer.Deferred:
        proxy = TCP4ClientEndpoint(self.clock, "192.0.2.7", 3128)
        endpoint = TunnelEndpoint(self.clock, proxy, host, 443, authorization, 10.0)
        return endpoint.connect(self.inner)

    def proxy_answers(self) -> tuple[Protocol, StringTransport]:
        """Accept the pending connection to the proxy on a memory transport."""
        host, port, factory, _, _ = self.clock.tcpClients[-1]
        self.assertEqual((host, port), ("192.0.2.7", 3128))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_connect_request(self) -> None:
        """The tunnel sends exactly "CONNECT host:443" with a matching Host header and the
        Proxy-Authorization given, and nothing else."""
        self.connect(b"Basic dTpw")
        _, transport = self.proxy_answers()
        self.assertEqual(
            transport.value(),
            b"CONNECT api.example:443 HTTP/1.1\r\n"
            b"Host: api.example:443\r\n"
            b"Proxy-Authorization: Basic dTpw\r\n\r\n",
        )

    def test_ipv6_target_bracketed(self) -> None:
        """An IPv6 upstream is written in brackets in the CONNECT line, as HTTP requires."""
        self.connect(host=b"2001:db8::1")
        _, transport = self.proxy_answers()
        self.assertTrue(transport.value().startswith(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n"))

    def test_open_then_pipe(self) -> None:
        """A 2xx answer (in pieces) opens the tunnel; bytes after the head and
        everything later belong to the wrapped protocol, both ways."""
        d = self.connect()
        protocol, transport = self.proxy_answers()
        transport.clear()
        protocol.dataReceived(b"HTTP/1.1 200 Connection estab")
        self.assertNoResult(d)
        protocol.dataReceived(b"lished\r\nX-Proxy: 1\r\n\r\nfirst")
        wrapped = self.successResultOf(d)
        self.assertIsInstance(wrapped, AccumulatingProtocol)
        self.assertEqual(wrapped.data, b"first")
        protocol.dataReceived(b" second")
        self.assertEqual(wrapped.data, b"first second")
        wrapped.transport.write(b"up")
        self.assertEqual(transport.value(), b"up")
        # The set-up timer is gone once the tunnel is open.
        self.clock.advance(60)
        self.assertFalse(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(wrapped.closed)

    def test_refusals(self) -> None:
        """A non-2xx answer fails the attempt with its status and cuts the
        connection; the proxy's answer body is never taken for tunnel bytes."""
        for status in (407, 403, 502):
            d = self.connect()
            protocol, transport = self.proxy_answers()
            protocol.dataReceived(
                b"HTTP/1.1 %d Nope\r\nContent-Length: 5\r\n\r\nbody!" % status
            )
            failure = self.failureResultOf(d, OutboundProxyError)
            self.assertEqual(failure.value.status, status)
            self.assertIn(f"CONNECT with {status} Nope", str(failure.value))
            self.assertTrue(transport.disconnecting)

    def test_not_http(self) -> None:
        """A proxy that answers something other than HTTP fails the tunnel with
        OutboundProxyError (no status) and the connection is closed."""
        d = self.connect()
        protocol, transport = self.proxy_answers()
        protocol.dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
        failure = self.failureResultOf(d, OutboundProxyError)
        self.assertIsNone(failure.value.status)
        self.assertTrue(transport.disconnecting)

    def test_head_too_long(self) -> None:
        """A proxy answer head that keeps growing fails the tunnel and closes the connection
        instead of buffering without bound."""
        d = self.connect()
        protocol, transport = self.proxy_answers()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        for _ in range(20):
            protocol.dataReceived(b"X-Filler: " + b"x" * 1000 + b"\r\n")
            if d.called:
                break
        self.failureResultOf(d, OutboundProxyError)
        self.assertTrue(transport.disconnecting)

    def test_closed_before_answer(self) -> None:
        """A proxy that closes before answering fails the tunnel with OutboundProxyError
        instead of leaving it waiting."""
        d = self.connect()
        protocol, _ = self.proxy_answers()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, OutboundProxyError)

    def test_timeout_waiting_for_answer(self) -> None:
        """A proxy that accepts but does not answer CONNECT within the 10 s timeout fails
        the tunnel with TimeoutError and the connection is closed; not a moment before."""
        d = self.connect()
        _, transport = self.proxy_answers()
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.failureResultOf(d, TimeoutError)
        self.assertTrue(transport.disconnecting)

    def test_timeout_while_connecting(self) -> None:
        """A proxy that cannot be connected to within the timeout fails with TimeoutError
        and the connection attempt is stopped."""
        d = self.connect()
        self.clock.advance(10)
        self.failureResultOf(d, TimeoutError)
        connector = self.clock.connectors[-1]
        self.assertTrue(connector.stoppedConnecting)

    def test_cancel_while_waiting_for_answer(self) -> None:
        """Cancelling while CONNECT awaits its answer closes the connection and leaves no
        timer behind."""
        d = self.connect()
        _, transport = self.proxy_answers()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(self.clock.getDelayedCalls())

    def test_cancel_while_connecting(self) -> None:
        """Cancelling while still connecting stops the attempt and leaves no timer behind."""
        d = self.connect()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.clock.connectors[-1].stoppedConnecting)
        self.assertFalse(self.clock.getDelayedCalls())


# ---------------------------------------------------------------- the test proxy


@dataclass
class ProxySeen:
    """One request head the test proxy received."""

    method: bytes
    target: bytes
    headers: dict[bytes, list[bytes]] = field(default_factory=dict)


class _LoopbackOnly:
    """What the forwarding half of the test proxy dials: 127.0.0.1 only."""

    def connectTCP(self, host: str, port: int, factory: Factory, *a, **kw):
        return reactor.connectTCP("127.0.0.1", port, factory)


class _ForwardRequest(ProxyRequest):
    """twisted.web's forward proxy, dialling loopback only, dropping the
    Proxy-Authorization meant for it (as real proxies do)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reactor = _LoopbackOnly()

    def process(self) -> None:
        self.requestHeaders.removeHeader(b"proxy-authorization")
        super().process()


class _ForwardChannel(Proxy):
    requestFactory = _ForwardRequest


class _Splice(Protocol):
    """The test proxy's connection to the upstream inside a tunnel."""

    def __init__(self, owner: "_ProxyProtocol") -> None:
        self.owner = owner

    def connectionMade(self) -> None:
        self.owner.spliced(self)

    def dataReceived(self, data: bytes) -> None:
        self.owner.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.owner.transport.loseConnection()


class _ProxyProtocol(Protocol):
    factory: "ScriptedProxy"

    def __init__(self) -> None:
        self.buffer = b""
        self.pending = b""
        self.connecting = False
        self.lost = False
        self.peer: Optional[_Splice] = None
        self.channel: Optional[Proxy] = None

    def dataReceived(self, data: bytes) -> None:
        if self.channel is not None:
            self.channel.dataReceived(data)
            return
        if self.peer is not None:
            self.peer.transport.write(data)
            return
        if self.connecting:
            self.pending += data
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, rest = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        method, target, _ = lines[0].split(b" ", 2)
        headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        factory = self.factory
        factory.seen.append(ProxySeen(method, target, headers))
        if factory.credentials is not None and headers.get(b"proxy-authorization") != [
            factory.credentials
        ]:
            self.answer(b"407 Proxy Authentication Required")
            return
        if method != b"CONNECT":
            self.channel = _ForwardChannel()
            self.channel.makeConnection(self.transport)
            buffered, self.buffer = self.buffer, b""
            self.channel.dataReceived(buffered)
            return
        if factory.silent:
            return
        if factory.answer is not None:
            self.answer(factory.answer)
            return
        port = int(target.rsplit(b":", 1)[1])
        self.connecting = True
        self.pending = rest
        d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), _Splice(self))
        d.addErrback(lambda _: self.answer(b"502 Bad Gateway"))

    def answer(self, status: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\nProxy-Authenticate: Basic realm=\"t\"\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        self.transport.loseConnection()

    def spliced(self, peer: _Splice) -> None:
        self.connecting = False
        self.peer = peer
        if self.lost:
            peer.transport.loseConnection()
            return
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if self.pending:
            peer.transport.write(self.pending)
            self.pending = b""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        if self.channel is not None:
            self.channel.connectionLost(reason)
        if self.peer is not None:
            self.peer.transport.loseConnection()


class ScriptedProxy(Factory):
    """An HTTP proxy for the tests: CONNECT tunnels and absolute-form
    forwarding, always to 127.0.0.1, recording every request head.

    :ivar credentials: the Proxy-Authorization value required, if any.
    :ivar answer: a status line to refuse CONNECT with (``b"403 Forbidden"``).
    :ivar silent: never answer CONNECT.
    """

    protocol = _ProxyProtocol

    def __init__(self) -> None:
        self.seen: list[ProxySeen] = []
        self.credentials: Optional[bytes] = None
        self.answer: Optional[bytes] = None
        self.silent = False


# ---------------------------------------------------------------- end to end


def _json(body: bytes) -> dict:
    return json.loads(body.decode("utf-8"))


def _unused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OutboundProxyTests(ProxyTestCase):
    """The plugin reaching the fake upstream through the test proxy."""

    def setUp(self) -> None:
        super().setUp()
        ca = shared_ca()
        self.ca_file = ca.write(self.mktemp())
        self.tls_port = self.listen_tls(ca.issue(["localhost", "127.0.0.1"]).options())
        self.outbound = ScriptedProxy()
        port, tracker = listen_tracked(self.outbound)
        self.outbound_port = port.getHost().port

        @defer.inlineCallbacks
        def stop():
            yield port.stopListening()
            yield tracker.closed()

        self.addCleanup(stop)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def listen_tls(self, options) -> int:
        """Serve the fake upstream over TLS too; its port."""
        tracker = ConnectionTracker(Site(self.fake))
        port = reactor.listenSSL(0, tracker, options, interface="127.0.0.1")

        @defer.inlineCallbacks
        def stop():
            yield port.stopListening()
            yield tracker.closed()

        self.addCleanup(stop)
        return port.getHost().port

    def https_env(self, port: Optional[int] = None, **extra: str) -> dict[str, str]:
        env = {
            "OPENAI_BASE_URL": f"https://localhost:{port or self.tls_port}",
            "PROXY": f"http://127.0.0.1:{self.outbound_port}",
            "SSL_CERT_FILE": self.ca_file,
        }
        env.update(extra)
        return env

    def logged(self) -> str:
        return "\n".join(formatEvent(e) + " " + repr(e) for e in self.events)

    @defer.inlineCallbacks
    def assert_proxy_error(self, status: int = 502, code: str = "upstream_unreachable"):
        """GET /v1/models gets the proxy's own JSON error; its body."""
        response = yield self.client.get(self.url("/v1/models"))
        body = yield response.content()
        self.assertEqual(response.code, status)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(_json(body)["error"]["code"], code)
        return body

    @defer.inlineCallbacks
    def test_https_via_connect_streams(self):
        """CONNECT to the upstream's host:port, TLS inside, SSE event by event;
        the next request reuses the pooled tunnel."""
        yield self.start_proxy(**self.https_env())
        self.fake.hold_at = 2
        response, collector = yield self.open_stream("/v1/chat/completions")
        self.assertEqual(response.code, 200)
        events = chat_chunks(self.fake.answer_text, "m")
        while len(collector.body) < len(events[0] + events[1]):
            yield collector.got_data
        self.assertEqual(collector.body, events[0] + events[1])
        self.assertFalse(self.fake.release.called)
        self.fake.release.callback(None)
        yield collector.done
        self.assertEqual(collector.body, b"".join(events))

        response = yield self.client.get(self.url("/v1/models"))
        self.assertEqual(_json((yield response.content()))["data"][0]["id"], "gpt-4o-mini")

        [connect] = self.outbound.seen
        target = b"localhost:%d" % self.tls_port
        self.assertEqual((connect.method, connect.target), (b"CONNECT", target))
        self.assertEqual(connect.headers[b"host"], [target])
        self.assertNotIn(b"proxy-authorization", connect.headers)
        self.assertEqual([s.uri for s in self.fake.seen], [b"/v1/chat/completions", b"/v1/models"])
        self.assertEqual(self.fake.seen[0].header(b"host"), target)

    @defer.inlineCallbacks
    def test_credentials_to_the_proxy_only(self):
        """PROXY's user info becomes the CONNECT's Proxy-Authorization; the
        upstream never sees it, and no log line holds it."""
        password = "s3cret-pw@x"
        token = b"Basic " + base64.b64encode(f"tf-user:{password}".encode())
        self.outbound.credentials = token
        yield self.start_proxy(
            **self.https_env(PROXY=f"http://tf-user:s3cret-pw%40x@127.0.0.1:{self.outbound_port}")
        )
        response = yield self.client.get(self.url("/echo"))
        echoed = _json((yield response.content()))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.outbound.seen[0].headers[b"proxy-authorization"], [token])
        self.assertNotIn("proxy-authorization", echoed["headers"])
        logged = self.logged()
        self.assertIn(f"through the proxy http://127.0.0.1:{self.outbound_port}", logged)
        self.assertNotIn(password, logged)
        self.assertNotIn(token.decode()[6:], logged)

    @defer.inlineCallbacks
    def test_wrong_credentials_502(self):
        """When the outbound proxy refuses the credentials (407), the client gets an
        OpenAI-shaped 502, the log says CONNECT got 407, the password is in neither, and
        nothing reaches the upstream."""
        self.outbound.credentials = b"Basic " + base64.b64encode(b"tf-user:right")
        yield self.start_proxy(
            **self.https_env(PROXY=f"http://tf-user:wrong-pw@127.0.0.1:{self.outbound_port}")
        )
        body = yield self.assert_proxy_error()
        self.assertNotIn(b"wrong-pw", body)
        self.assertIn("CONNECT with 407", self.logged())
        self.assertNotIn("wrong-pw", self.logged())
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_connect_refused_502(self):
        """A 407, 403 or 502 answer to CONNECT gives the client a 502 each time, and nothing
        reaches the upstream."""
        yield self.start_proxy(**self.https_env())
        for answer in (b"407 Proxy Authentication Required", b"403 Forbidden", b"502 Bad Gateway"):
            self.outbound.answer = answer
            yield self.assert_proxy_error()
        self.assertEqual([s.method for s in self.outbound.seen], [b"CONNECT"] * 3)
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_wrong_hostname_certificate_502(self):
        """TLS inside the tunnel is verified against the upstream's name."""
        wrong = self.listen_tls(shared_ca().issue(["wrong.example"]).options())
        yield self.start_proxy(**self.https_env(wrong))
        yield self.assert_proxy_error()
        self.assertEqual(self.outbound.seen[0].target, b"localhost:%d" % wrong)
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_untrusted_ca_502(self):
        """Without SSL_CERT_FILE the system's CAs apply, which do not know
        the test CA."""
        env = self.https_env()
        del env["SSL_CERT_FILE"]
        yield self.start_proxy(**env)
        yield self.assert_proxy_error()
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_proxy_unreachable_502(self):
        """An outbound proxy nobody listens on gives the client an OpenAI-shaped 502, not a
        hang."""
        yield self.start_proxy(**self.https_env(PROXY=f"http://127.0.0.1:{_unused_port()}"))
        yield self.assert_proxy_error()

    @defer.inlineCallbacks
    def test_silent_proxy_is_a_connect_timeout(self):
        """A proxy that never answers CONNECT costs CONNECT_TIMEOUT, then 504,
        and its connection is closed."""
        self.outbound.silent = True
        yield self.start_proxy(**self.https_env(CONNECT_TIMEOUT="0.2"))
        yield self.assert_proxy_error(status=504, code="upstream_timeout")
        self.assertEqual(len(self.outbound.seen), 1)

    @defer.inlineCallbacks
    def test_plain_http_via_proxy(self):
        """http:// upstreams: absolute-form requests to the proxy, which
        resolves the name (this one would not resolve here)."""
        token = b"Basic " + base64.b64encode(b"u:pw")
        self.outbound.credentials = token
        upstream = f"http://upstream.invalid:{self.upstream_port}"
        yield self.start_proxy(
            OPENAI_BASE_URL=upstream, PROXY=f"http://u:pw@127.0.0.1:{self.outbound_port}"
        )
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        response = yield self.client.post(
            self.url("/v1/chat/completions?x=1"),
            data=body.encode(),
            headers={b"content-type": b"application/json"},
        )
        answer = _json((yield response.content()))
        self.assertEqual(response.code, 200)
        self.assertEqual(answer["choices"][0]["message"]["content"], self.fake.answer_text)
        [seen] = self.outbound.seen
        self.assertEqual(seen.method, b"POST")
        self.assertEqual(seen.target, upstream.encode() + b"/v1/chat/completions?x=1")
        self.assertEqual(seen.headers[b"proxy-authorization"], [token])
        self.assertEqual(self.fake.seen[0].uri, b"/v1/chat/completions?x=1")
        self.assertEqual(self.fake.seen[0].header(b"host"), upstream[7:].encode())
        self.assertEqual(self.fake.seen[0].body, body.encode())

    @defer.inlineCallbacks
    def test_plain_http_proxy_407_is_502(self):
        """A 407 is for us, not for the client: it becomes a 502."""
        self.outbound.credentials = b"Basic " + base64.b64encode(b"u:right")
        yield self.start_proxy(
            OPENAI_BASE_URL=f"http://upstream.invalid:{self.upstream_port}",
            PROXY=f"http://u:wrong-pw@127.0.0.1:{self.outbound_port}",
        )
        body = yield self.assert_proxy_error()
        self.assertNotIn(b"wrong-pw", body)
        self.assertIn("answered 407", self.logged())
        self.assertNotIn("wrong-pw", self.logged())
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_direct_https_trusts_ssl_cert_file(self):
        """SSL_CERT_FILE applies without a proxy too."""
        env = self.https_env()
        del env["PROXY"]
        yield self.start_proxy(**env)
        response = yield self.client.get(self.url("/v1/models"))
        yield response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(self.outbound.seen, [])
        self.assertEqual(self.fake.seen[0].header(b"host"), b"localhost:%d" % self.tls_port)
