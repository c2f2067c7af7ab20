"""
The access line's upstream field, the open-relay warning's condition, and
``twistd openai-forward --version``.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import globalLogPublisher

from .harness import ProxyTestCase
from .processes import TWISTD, assert_exit, run
from .test_startup import startup_env

ACCESS = "twisted_forward.access"


class RawClient(Protocol):
    """A client that writes bytes by hand and says when the proxy closed."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.closed.callback(None)


class AccessLineTests(ProxyTestCase):
    """What operators read in the log."""

    #: They scrape /metrics on the proxy's port, without the admin key.
    proxy_settings = {"METRICS": "public"}

    def capture(self) -> list[dict]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def next_access(self, path: str) -> defer.Deferred:
        """Fires with the next access event for ``path``."""
        got: defer.Deferred = defer.Deferred()

        def observe(event: dict) -> None:
            if event.get("log_namespace") == ACCESS and event.get("path") == path:
                globalLogPublisher.removeObserver(observe)
                got.callback(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(lambda: got.called or globalLogPublisher.removeObserver(observe))
        return got

    @defer.inlineCallbacks
    def raw(self, data: bytes) -> defer.Deferred:
        """A raw connection to the proxy that has written ``data``."""
        client = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port)
        yield connectProtocol(endpoint, client)
        client.transport.write(data)
        return client

    @defer.inlineCallbacks
    def test_client_gone_before_head(self):
        """A client that leaves while the upstream has not answered gets
        exactly one access line: status 499, ``error=client_left``, the
        upstream's time so far."""
        events = self.capture()
        yield self.start_proxy()
        logged = self.next_access("/stall")
        arrived = self.fake.arrived
        client = yield self.raw(b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")
        yield arrived
        client.transport.loseConnection()
        event = yield logged
        self.assertEqual(event["status"], 499)
        self.assertEqual(event["error"], "client_left")
        self.assertRegex(event["line"], r" GET /stall 499 0B .* upstream=\d+(\.\d+)?ms error=client_left$")
        # A later request is logged too, and /stall still has its one line.
        response = yield self.client.get(self.url("/healthz"))
        yield response.content()
        paths = [e["path"] for e in events if e.get("log_namespace") == ACCESS]
        self.assertEqual(paths.count("/stall"), 1)
        self.assertEqual(paths.count("/healthz"), 1)

    @defer.inlineCallbacks
    def test_client_gone_before_upstream(self):
        """A client that leaves before its body is in never reaches the
        upstream: its line says ``upstream=-`` and ``client_left``."""
        yield self.start_proxy()
        logged = self.next_access("/v1/chat/completions")
        client = yield self.raw(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        client.transport.loseConnection()
        event = yield logged
        self.assertIn(" 499 0B ", event["line"])
        self.assertTrue(event["line"].endswith(" upstream=- error=client_left"), event["line"])
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_refused_at_head(self):
        """A body refused at head time (over MAX_REQUEST_BODY, answered by
        the channel itself before the body) has its line with the
        refusal's status and code."""
        yield self.start_proxy(MAX_REQUEST_BODY="10")
        logged = self.next_access("/v1/chat/completions")
        client = yield self.raw(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        yield client.closed
        self.assertTrue(client.received.startswith(b"HTTP/1.1 413 "), client.received)
        event = yield logged
        self.assertEqual(event["status"], 413)
        self.assertEqual(event["error"], "request_too_large")
        self.assertIn(" upstream=- ", event["line"])
        # Counted once, by the channel, not again for its line.
        response = yield self.client.get(self.url("/metrics"))
        text = (yield response.content()).decode()
        [count] = [line for line in text.splitlines()
                   if line.startswith("openai_forward_refusals_total{")
                   and "request_too_large" in line]
        self.assertTrue(count.endswith(" 1.0"), count)

    @defer.inlineCallbacks
    def test_no_upstream_is_a_dash(self):
        """A health check never went upstream: ``upstream=-``, not
        ``upstream=Nonems``; a forwarded request has its milliseconds."""
        events = self.capture()
        yield self.start_proxy()
        for path in ("/healthz", "/v1/models"):
            response = yield self.client.get(self.url(path))
            yield response.content()
        lines = [e["line"] for e in events if e.get("log_namespace") == "twisted_forward.access"]
        [health] = [line for line in lines if " /healthz " in line]
        [models] = [line for line in lines if " /v1/models " in line]
        self.assertIn(" upstream=- ", health)
        self.assertRegex(models, r" upstream=\d+(\.\d+)?ms ")

    @defer.inlineCallbacks
    def test_open_relay_warning_only_when_open(self):
        """IP_WHITELIST restricts who can spend the keys: no warning then."""
        events = self.capture()
        yield self.start_proxy(OPENAI_API_KEY="sk-access-line-test", IP_WHITELIST="127.0.0.1")
        texts = [str(e.get("log_format", "")) for e in events]
        self.assertFalse([t for t in texts if "anyone who can reach" in t])

    @defer.inlineCallbacks
    def test_version(self):
        """``twistd openai-forward --version`` names twisted-forward's version."""
        from twisted_forward import __version__

        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        process = yield run(self, [*TWISTD, "openai-forward", "--version"], startup_env(), cwd)
        assert_exit(self, process, 0)
        self.assertTrue(process.out.decode().startswith(f"twisted-forward {__version__} "))
