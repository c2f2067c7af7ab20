"""
Graceful shutdown: stop accepting, let open streams finish within the grace
period, cut the rest, exit 0.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.web.client import ResponseDone

from twisted_forward.tap import ProxyService

from .harness import Collector, ProxyTestCase
from .processes import assert_exit
from .test_proxy_unit import FakeResponse, ProxyHarness
from .test_runmodes import listening_port, spawn_twistd


def _stream_body() -> bytes:
    return json.dumps({"model": "m", "stream": True, "messages": []}).encode()


class DrainTests(ProxyTestCase):
    @defer.inlineCallbacks
    def test_open_stream_finishes_health_says_draining(self):
        """While stopping, an open stream is finished whole, the health check answers 503
        draining, new requests get 503 shutting_down without reaching the upstream, the
        stop completes only after the stream ends, and no connection is cut (each one
        ends with a clean close)."""
        yield self.start_proxy()
        self.fake.hold_at = 2
        response, collector = yield self.open_stream()
        yield collector.got_data
        # A second connection, kept alive and idle from before the shutdown.
        response = yield self.client.get(self.url("/healthz"))
        self.assertEqual(json.loads((yield response.content())), {"status": "ok"})
        stopped = self.service.stopService()
        self.assertFalse(stopped.called)
        # The idle kept-alive connection: health says draining; new work is
        # refused with 503 and the connection closed.
        response = yield self.client.get(self.url("/healthz"))
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads((yield response.content())), {"status": "draining"})
        response = yield self.client.get(self.url("/v1/models"))
        self.assertEqual(response.code, 503)
        body = json.loads((yield response.content()))
        self.assertEqual(body["error"]["code"], "shutting_down")
        self.assertEqual(len(self.fake.seen), 1)
        self.assertFalse(stopped.called)
        self.fake.release.callback(None)
        yield collector.done
        self.assertTrue(collector.body.endswith(b"data: [DONE]\n\n"))
        self.assertIsInstance(collector.reason.value, ResponseDone, collector.reason)
        yield stopped
        # A graceful drain: every connection the proxy had ended with a
        # clean close, none was cut.
        yield self.pool.closeCachedConnections()
        yield self.proxy_tracker.closed()
        self.assertEqual(
            (self.proxy_tracker.aborts(), self.proxy_tracker.clean_closes()),
            (0, len(self.proxy_tracker.endings)),
            [e.value for e in self.proxy_tracker.endings],
        )
        self.assertGreaterEqual(self.proxy_tracker.clean_closes(), 2)


class GraceExpiryTests(ProxyHarness):
    env = {"SHUTDOWN_GRACE": "30"}

    def test_grace_expiry_cuts_open_exchanges(self):
        """A stream still open when SHUTDOWN_GRACE (30 s) runs out is cut on both sides at
        that moment and not before, and the stop then completes."""
        service = ProxyService(self.built, self.config, self.clock)
        service.startService()
        channel, transport = self.get()
        response = FakeResponse(200, {b"content-type": [b"text/event-stream"]})
        self.upstream.calls[0].deferred.callback(response)
        response.protocol.dataReceived(b"data: 1\n\n")
        stopped = service.stopService()
        self.assertTrue(self.built.health.draining)
        self.clock.advance(29)
        self.assertNoResult(stopped)
        self.assertFalse(response.transport.stopped)
        self.clock.advance(1)
        self.successResultOf(stopped)
        self.assertTrue(response.transport.stopped)
        self.assertTrue(getattr(transport, "aborted", False) or transport.disconnecting)
        self.assertFalse(self.built.proxies[0].open)

    def test_no_open_exchange_stops_at_once(self):
        """With no open exchange the service stops at once, without waiting for the grace
        period."""
        service = ProxyService(self.built, self.config, self.clock)
        service.startService()
        self.successResultOf(service.stopService())


class SigtermTests(ProxyTestCase):
    """A real twistd stopped by a signal while a stream is open."""

    timeout = 60

    def test_sigterm_with_stream_open(self):
        """SIGTERM mid-stream: the stream completes, the process exits 0."""
        return self.stop_mid_stream("TERM")

    def test_sigint_with_stream_open(self):
        """SIGINT (Ctrl-C) drains as SIGTERM does: the stream completes, exit 0."""
        return self.stop_mid_stream("INT")

    @defer.inlineCallbacks
    def stop_mid_stream(self, signal_name: str) -> Any:
        """Send ``signal_name`` to a twistd with a stream open; check the drain."""
        process = spawn_twistd(self)
        port = yield listening_port(process)
        self.fake.hold_at = 3
        arrived = self.fake.arrived
        response = yield self.client.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=_stream_body(), unbuffered=True
        )
        yield arrived
        collector = Collector()
        response.deliverBody(collector)
        yield collector.got_data
        process.signal(signal_name)
        # Released only once the proxy logged that it is draining.
        yield process.wait_for("draining 1 open request")
        self.fake.release.callback(None)
        yield collector.done
        # The whole stream, ended by the proxy's own close (not an abort).
        self.assertTrue(collector.body.endswith(b"data: [DONE]\n\n"))
        self.assertIsInstance(collector.reason.value, ResponseDone, collector.reason)
        yield process.exited()
        assert_exit(self, process, 0)

