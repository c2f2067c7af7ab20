"""
Streams cut because the shutdown grace ran out are recorded (chat record
and metrics) with the outcome ``shutdown``, not ``client_left``.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.testing import MemoryReactorClock
from twisted.web.http_headers import Headers

from twisted_forward.config import load_config
from twisted_forward.site import ForwardSite, build_root
from twisted_forward.tap import ProxyService

from .test_proxy_unit import FakeResponse, FakeUpstream, ProxyHarness


class Tap:
    """Remembers how its exchange ended."""

    def __init__(self) -> None:
        self.outcome: Optional[str] = None

    def response(self, status: int, headers: Headers) -> None:
        pass

    def data(self, chunk: bytes) -> None:
        pass

    def end(self, outcome: str) -> None:
        self.outcome = outcome


class Taps:
    """A recorder that hands out :class:`Tap` s."""

    def __init__(self) -> None:
        self.taps: list[Tap] = []

    def begin(self, info) -> Tap:
        tap = Tap()
        self.taps.append(tap)
        return tap


class ShutdownOutcomeTests(ProxyHarness):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.upstream = FakeUpstream()
        env = {"OPENAI_BASE_URL": "http://upstream.test", "LOG_CHAT": "false",
               "SHUTDOWN_GRACE": "30"}
        self.config = load_config({}, env, None)
        self.recorder = Taps()
        self.built = build_root(self.config, self.clock, recorder=self.recorder,
                                upstream=self.upstream)
        self.site = ForwardSite(self.built.root, reactor=self.clock, timeout=None)

    def test_stream_cut_by_grace_expiry_recorded_as_shutdown(self):
        """The grace period runs out mid-stream: outcome ``shutdown``, in
        the record and in the requests counter."""
        service = ProxyService(self.built, self.config, self.clock)
        service.startService()
        self.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        response = FakeResponse(200, {b"content-type": [b"text/event-stream"]})
        self.upstream.calls[0].deferred.callback(response)
        response.protocol.dataReceived(b"data: {}\n\n")
        stopped = service.stopService()
        self.clock.advance(30)
        self.successResultOf(stopped)
        self.assertEqual([t.outcome for t in self.recorder.taps], ["shutdown"])
        value = self.built.metrics.registry.get_sample_value(
            "openai_forward_requests_total",
            {"route": "/", "status": "200", "key": "none", "outcome": "shutdown"},
        )
        self.assertEqual(value, 1)
