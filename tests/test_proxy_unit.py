"""
The proxy's timers, cancellation, relay and failover, driven in memory: the
real HTTP parser fed bytes on a StringTransport, a MemoryReactorClock, and
an upstream whose answers the test controls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from twisted.internet import error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from twisted_forward.config import load_config
from twisted_forward.site import ForwardSite, build_root


@implementer(IResponse)
class FakeResponse:
    """An upstream answer whose body the test feeds by hand."""

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(self, code: int = 200, headers: Optional[dict] = None, length=UNKNOWN_LENGTH):
        self.code = code
        self.phrase = b"OK"
        self.headers = Headers(headers or {})
        self.length = length
        self.protocol = None
        self.transport = BodyTransport()

    def deliverBody(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def setPreviousResponse(self, response) -> None:
        pass

    def finish(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))


class BodyTransport:
    """The upstream connection as the relay sees it: a push producer."""

    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        self.stopped = True


@dataclass
class Call:
    method: bytes
    url: bytes
    headers: Headers
    body: object
    deferred: Deferred = field(init=False)
    cancelled: bool = False

    def __post_init__(self) -> None:
        def cancel(d: Deferred) -> None:
            self.cancelled = True

        self.deferred = Deferred(cancel)


class FakeUpstream:
    """Records upstream requests; each answers when the test says."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def request(self, method, url, headers, body) -> Deferred:
        call = Call(method, url, headers, body)
        self.calls.append(call)
        return call.deferred

    def close(self) -> Deferred:
        return succeed(None)


class ProxyHarness(SynchronousTestCase):
    env: dict = {}

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.upstream = FakeUpstream()
        env = {"OPENAI_BASE_URL": "http://upstream.test", "LOG_CHAT": "false", **self.env}
        self.config = load_config({}, env, None)
        self.built = build_root(self.config, self.clock, upstream=self.upstream)
        # No connection idle timeout: the clock should hold the proxy's timers only.
        self.site = ForwardSite(self.built.root, reactor=self.clock, timeout=None)

    def connect(self) -> tuple:
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def send(self, raw: bytes):
        channel, transport = self.connect()
        channel.dataReceived(raw)
        return channel, transport

    def get(self, path: bytes = b"/v1/models", headers: bytes = b""):
        return self.send(b"GET " + path + b" HTTP/1.1\r\nHost: proxy\r\n" + headers + b"\r\n")

    @staticmethod
    def status(transport: StringTransport) -> int:
        return int(transport.value().split(b" ", 2)[1])

    @staticmethod
    def body(transport: StringTransport) -> bytes:
        return transport.value().split(b"\r\n\r\n", 1)[1]

    def error_code(self, transport: StringTransport) -> str:
        return json.loads(self.body(transport))["error"]["code"]


class TimeoutTests(ProxyHarness):
    env = {"READ_TIMEOUT": "30", "IDLE_TIMEOUT": "20"}

    def test_head_timeout_is_504(self):
        """An upstream that sends no answer head within READ_TIMEOUT has its request
        cancelled and the client gets a 504 upstream_timeout, and not a second before."""
        channel, transport = self.get()
        [call] = self.upstream.calls
        self.clock.advance(29)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertTrue(call.cancelled)
        self.assertEqual(self.status(transport), 504)
        self.assertEqual(self.error_code(transport), "upstream_timeout")

    def test_head_in_time_cancels_timer(self):
        """An answer head in time relays the answer and leaves no timer behind."""
        channel, transport = self.get()
        response = FakeResponse(200, {b"content-type": [b"application/json"]}, length=2)
        self.upstream.calls[0].deferred.callback(response)
        response.protocol.dataReceived(b"{}")
        response.finish()
        self.assertEqual(self.status(transport), 200)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connect_refused_is_502(self):
        """A refused upstream connection gives the client a 502 upstream_unreachable that
        does not name the upstream's host."""
        channel, transport = self.get()
        self.upstream.calls[0].deferred.errback(error.ConnectionRefusedError())
        self.assertEqual(self.status(transport), 502)
        self.assertEqual(self.error_code(transport), "upstream_unreachable")
        self.assertNotIn(b"upstream.test", transport.value())

    def test_connect_timeout_is_504(self):
        """An upstream connection that times out gives the client a 504."""
        channel, transport = self.get()
        self.upstream.calls[0].deferred.errback(error.TimeoutError())
        self.assertEqual(self.status(transport), 504)

    def test_idle_timeout_mid_body(self):
        """Silence between chunks ends the answer; chunks reset the clock."""
        channel, transport = self.get()
        response = FakeResponse(200, {b"content-type": [b"text/event-stream"]})
        self.upstream.calls[0].deferred.callback(response)
        response.protocol.dataReceived(b"data: 1\n\n")
        self.clock.advance(15)
        response.protocol.dataReceived(b"data: 2\n\n")
        self.clock.advance(15)
        self.assertFalse(response.transport.stopped)
        self.assertFalse(transport.aborted if hasattr(transport, "aborted") else transport.disconnecting)
        self.clock.advance(5)
        self.assertTrue(response.transport.stopped)
        self.assertTrue(getattr(transport, "aborted", False) or transport.disconnecting)
        self.assertIn(b"data: 2", transport.value())
        self.assertFalse(self.built.proxies[0].open)


    def test_paused_client_restarts_idle_clock_on_resume(self):
        """While the client does not read, the upstream is paused: the
        silence that follows is the client's, and reading again restarts the
        clock."""
        channel, transport = self.get()
        response = FakeResponse(200)
        self.upstream.calls[0].deferred.callback(response)
        response.protocol.dataReceived(b"x")
        transport.producer.pauseProducing()
        self.assertEqual(response.transport.paused, 1)
        self.clock.advance(15)
        transport.producer.resumeProducing()
        self.assertEqual(response.transport.resumed, 1)
        self.clock.advance(15)
        self.assertFalse(response.transport.stopped)
        self.clock.advance(5)
        self.assertTrue(response.transport.stopped)


class ClientIdleTests(ProxyHarness):
    def test_half_sent_head_times_out(self):
        """A client trickling a request head is cut after 60 s, not 12 h."""
        site = ForwardSite(self.built.root, reactor=self.clock)
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        self.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting or getattr(transport, "aborted", False))
        self.assertEqual(self.upstream.calls, [])


class ClientGoneTests(ProxyHarness):
    def test_before_head_cancels_upstream_request(self):
        """A client that disconnects before the answer head cancels the upstream request; no
        timer and no open exchange remain."""
        channel, transport = self.get()
        call = self.upstream.calls[0]
        channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(call.cancelled)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.built.proxies[0].open)

    def test_after_head_stops_upstream(self):
        """A client that disconnects mid-stream stops the upstream body; later upstream data
        and its end are dropped without a write to the lost connection."""
        channel, transport = self.get()
        response = FakeResponse(200, {b"content-type": [b"text/event-stream"]})
        self.upstream.calls[0].deferred.callback(response)
        response.protocol.dataReceived(b"data: 1\n\n")
        channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(response.transport.stopped)
        # Late data and the end are dropped without a write after the loss.
        response.protocol.dataReceived(b"data: 2\n\n")
        response.finish()
        self.assertNotIn(b"data: 2", transport.value())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.built.proxies[0].open)


class RelayTests(ProxyHarness):
    def test_backpressure_reaches_upstream(self):
        """A client that stops reading pauses the upstream connection."""
        channel, transport = self.get()
        response = FakeResponse(200)
        self.upstream.calls[0].deferred.callback(response)
        # What a real transport does when its send buffer fills, and drains.
        transport.producer.pauseProducing()
        self.assertEqual(response.transport.paused, 1)
        transport.producer.resumeProducing()
        self.assertEqual(response.transport.resumed, 1)

    def test_chunks_written_as_they_come(self):
        """An answer of unknown length is relayed chunked, each upstream piece written as it
        arrives (not buffered), and ended with the last chunk."""
        channel, transport = self.get()
        response = FakeResponse(200, {b"content-type": [b"text/event-stream"]})
        self.upstream.calls[0].deferred.callback(response)
        response.protocol.dataReceived(b"data: first\n\n")
        self.assertIn(b"data: first", transport.value())
        self.assertIn(b"transfer-encoding: chunked", transport.value().lower())
        response.finish()
        self.assertTrue(transport.value().endswith(b"0\r\n\r\n"))

    def test_known_length_kept(self):
        """An answer with a known length is relayed with the same Content-Length and no
        chunked encoding."""
        channel, transport = self.get()
        response = FakeResponse(200, length=5)
        self.upstream.calls[0].deferred.callback(response)
        response.protocol.dataReceived(b"hello")
        response.finish()
        head = transport.value().split(b"\r\n\r\n")[0].lower()
        self.assertIn(b"content-length: 5", head)
        self.assertNotIn(b"chunked", head)

    def test_broken_body_aborts_client(self):
        """A cut-off upstream body is not passed off as a whole one."""
        channel, transport = self.get()
        response = FakeResponse(200)
        self.upstream.calls[0].deferred.callback(response)
        response.protocol.dataReceived(b"partial")
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(error.ConnectionLost())])))
        self.assertFalse(transport.value().endswith(b"0\r\n\r\n"))
        self.assertTrue(getattr(transport, "aborted", False) or transport.disconnecting)

    def test_request_line_garbage_is_400(self):
        """A request target that is not a path ("evil.com/x") gets 400 and no upstream
        request is made."""
        channel, transport = self.send(b"GET evil.com/x HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(self.status(transport), 400)
        self.assertEqual(self.upstream.calls, [])


DEAD_KEY = b'{"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}'


class FailoverTests(ProxyHarness):
    env = {"OPENAI_API_KEY": "sk-first-000 sk-second-00 sk-third-000"}

    def answer(self, call: Call, code: int, headers=None, body: bytes = b"{}") -> FakeResponse:
        response = FakeResponse(code, headers, length=len(body))
        call.deferred.callback(response)
        if response.protocol is not None and not response.transport.stopped:
            response.protocol.dataReceived(body)
            response.finish()
        return response

    def auth(self, call: Call) -> bytes:
        return call.headers.getRawHeaders(b"authorization")[0]

    def test_429_tries_next_key_and_rests_the_first(self):
        """A 429 on the first default key is discarded and the request retried with the next
        key; the first key then rests for Retry-After (30 s) and is used again only
        after."""
        channel, transport = self.get()
        first = self.upstream.calls[0]
        self.assertEqual(self.auth(first), b"Bearer sk-first-000")
        discarded = self.answer(first, 429, {b"retry-after": [b"30"]})
        self.assertTrue(discarded.transport.stopped)
        second = self.upstream.calls[1]
        self.assertEqual(self.auth(second), b"Bearer sk-second-00")
        self.answer(second, 200, body=b'{"ok": 1}')
        self.assertEqual(self.status(transport), 200)
        self.assertTrue(transport.value().endswith(b'{"ok": 1}'))
        # The first key rests 30 s: used last, if at all, until then.
        for _ in range(4):
            self.get()
            self.assertNotEqual(self.auth(self.upstream.calls[-1]), b"Bearer sk-first-000")
            self.answer(self.upstream.calls[-1], 200)
        self.clock.advance(30)
        used = set()
        for _ in range(3):
            self.get()
            used.add(self.auth(self.upstream.calls[-1]))
            self.answer(self.upstream.calls[-1], 200)
        self.assertIn(b"Bearer sk-first-000", used)

    def test_401_revokes_key(self):
        """A 401 whose code says the key is dead revokes it; the next key serves."""
        self.get()
        self.answer(self.upstream.calls[0], 401, body=DEAD_KEY)
        self.answer(self.upstream.calls[1], 200)
        self.assertEqual(self.built.keys.default.revoked, frozenset({0}))
        for _ in range(3):
            self.get()
            self.assertNotEqual(self.auth(self.upstream.calls[-1]), b"Bearer sk-first-000")
            self.answer(self.upstream.calls[-1], 200)

    def test_all_keys_fail_last_answer_relayed_scrubbed(self):
        """When every default key fails, each is tried once and the last answer is relayed
        with the key it echoes masked."""
        channel, transport = self.get()
        for call_index in range(3):
            call = self.upstream.calls[call_index]
            key = self.auth(call)[7:]
            self.answer(call, 500, body=b'{"error": {"message": "bad key ' + key + b'"}}')
        self.assertEqual(len(self.upstream.calls), 3)
        self.assertEqual(self.status(transport), 500)
        self.assertNotIn(b"sk-third-000", transport.value())
        self.assertIn(b"sk-***", transport.value())

    def test_client_key_never_retried(self):
        """A client's own key is never retried with another key: its 429 is relayed as it
        is."""
        channel, transport = self.get(headers=b"Authorization: Bearer sk-client-own\r\n")
        self.answer(self.upstream.calls[0], 429)
        self.assertEqual(len(self.upstream.calls), 1)
        self.assertEqual(self.status(transport), 429)

    def test_post_body_replayed(self):
        """A POST retried after a 503 sends the same body upstream on each attempt."""
        body = b'{"model": "m", "messages": []}'
        channel, transport = self.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        self.answer(self.upstream.calls[0], 503)
        self.answer(self.upstream.calls[1], 200)
        for call in self.upstream.calls:
            consumer = StringTransport()
            call.body.startProducing(consumer)
            self.assertEqual(consumer.value(), body)


class RevocationTests(ProxyHarness):
    """Only a 401 that says the key is dead revokes it; never a keyless request."""

    env = FailoverTests.env
    answer = FailoverTests.answer
    auth = FailoverTests.auth

    def test_request_caused_401_is_relayed_without_failover(self):
        """A 401 with another code (mismatched organisation) is this request's:
        relayed, masked, with no failover and no key revoked."""
        channel, transport = self.get()
        self.answer(
            self.upstream.calls[0], 401,
            body=b'{"error": {"message": "sk-first-000 org", "code": "mismatched_organization"}}',
        )
        self.assertEqual(len(self.upstream.calls), 1)
        self.assertEqual(self.status(transport), 401)
        self.assertNotIn(b"sk-first-000", transport.value())
        self.assertEqual(self.built.keys.default.revoked, frozenset())

    def test_no_usable_key_is_503_and_nothing_sent(self):
        """With every default key revoked, the proxy answers 503 itself."""
        for index in range(3):
            self.built.keys.default.revoke(index)
        channel, transport = self.get()
        self.assertEqual(self.upstream.calls, [])
        self.assertEqual(self.status(transport), 503)
        self.assertEqual(self.error_code(transport), "no_default_key")
        self.assertFalse(self.built.proxies[0].open)

    def test_last_key_revoked_then_503(self):
        """The last key found dead: its 401 is relayed; the next request is a 503."""
        channel, transport = self.get()
        for index in range(3):
            self.answer(self.upstream.calls[index], 401, body=DEAD_KEY)
        self.assertEqual(self.status(transport), 401)
        channel, transport = self.get()
        self.assertEqual(len(self.upstream.calls), 3)
        self.assertEqual(self.status(transport), 503)

    def test_reason_phrase_is_standard(self):
        """The upstream's reason phrase is not relayed."""
        channel, transport = self.get()
        response = FakeResponse(200, length=2)
        response.phrase = b"Key sk-first-000"
        self.upstream.calls[0].deferred.callback(response)
        response.protocol.dataReceived(b"{}")
        response.finish()
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))


class ScrubbingPathTests(ProxyHarness):
    """Error answers to default-key requests are read whole, but timed and
    stopped like any other answer."""

    env = {"OPENAI_API_KEY": "sk-first-000", "IDLE_TIMEOUT": "20"}

    def stalled_error(self):
        channel, transport = self.get()
        response = FakeResponse(400, {b"content-type": [b"application/json"]}, length=1000)
        self.upstream.calls[0].deferred.callback(response)
        response.protocol.dataReceived(b'{"error":')
        return channel, transport, response

    def test_silence_ends_the_error_answer(self):
        """IDLE_TIMEOUT of silence: the upstream connection is dropped and the
        client gets the proxy's error with the upstream's status."""
        channel, transport, response = self.stalled_error()
        self.clock.advance(19)
        self.assertFalse(response.transport.stopped)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(2)
        self.assertTrue(response.transport.stopped)
        self.assertEqual(self.status(transport), 400)
        self.assertEqual(json.loads(self.body(transport))["error"]["type"], "upstream_error")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.built.proxies[0].open)

    def test_data_restarts_the_clock(self):
        """Each chunk restarts the idle clock; the whole answer is relayed."""
        channel, transport, response = self.stalled_error()
        self.clock.advance(15)
        response.protocol.dataReceived(b' "x"}')
        self.clock.advance(15)
        self.assertFalse(response.transport.stopped)
        response.finish()
        self.assertEqual(self.body(transport), b'{"error": "x"}')

    def test_client_leaving_stops_the_upstream(self):
        """A client gone mid error answer drops the upstream connection."""
        channel, transport, response = self.stalled_error()
        channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(response.transport.stopped)
        response.finish()
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.built.proxies[0].open)

    def test_silent_401_revokes_nothing(self):
        """A default key's 401 that goes silent mid-body is ended by the idle
        timer, relayed with the proxy's error, and revokes nothing."""
        channel, transport = self.get()
        response = FakeResponse(401, {b"content-type": [b"application/json"]}, length=1000)
        self.upstream.calls[0].deferred.callback(response)
        response.protocol.dataReceived(b'{"error": {"code": "invalid_api_key"')
        self.clock.advance(21)
        self.assertTrue(response.transport.stopped)
        self.assertEqual(self.status(transport), 401)
        self.assertEqual(len(self.upstream.calls), 1)
        self.assertEqual(self.built.keys.default.revoked, frozenset())

class _WatchTap:
    """A chat tap noting what the client had received when the exchange ended."""

    def __init__(self, transport: StringTransport) -> None:
        self.transport = transport
        self.seen_at_end: Optional[bytes] = None

    def response(self, status, headers) -> None:
        pass

    def data(self, chunk: bytes) -> None:
        pass

    def end(self, outcome: str) -> None:
        self.seen_at_end = self.transport.value()


class _WatchRecorder:
    def __init__(self) -> None:
        self.taps: list[_WatchTap] = []
        self.transport: Optional[StringTransport] = None

    def begin(self, info) -> _WatchTap:
        assert self.transport is not None
        tap = _WatchTap(self.transport)
        self.taps.append(tap)
        return tap


class ReplyFirstTests(SynchronousTestCase):
    """The answer is finished (and so sent) before the exchange's
    bookkeeping (chat record, policy settle, ledger) runs."""

    def test_answer_finished_before_the_record_ends(self):
        """When the chat tap's end runs, the client's transport already
        holds the whole answer, its access line timings included."""
        clock = MemoryReactorClock()
        upstream = FakeUpstream()
        config = load_config({}, {"OPENAI_BASE_URL": "http://upstream.test", "LOG_CHAT": "false"}, None)
        recorder = _WatchRecorder()
        built = build_root(config, clock, recorder=recorder, upstream=upstream)
        site = ForwardSite(built.root, reactor=clock, timeout=None)
        channel = site.buildProtocol(None)
        transport = StringTransport()
        recorder.transport = transport
        channel.makeConnection(transport)
        body = b'{"model":"m","messages":[]}'
        channel.dataReceived(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        response = FakeResponse(200, {b"content-type": [b"application/json"]})
        upstream.calls[0].deferred.callback(response)
        clock.advance(0.25)
        response.protocol.dataReceived(b'{"ok":1}')
        response.finish()
        [tap] = recorder.taps
        self.assertIsNotNone(tap.seen_at_end)
        self.assertTrue(tap.seen_at_end.endswith(b"0\r\n\r\n"), tap.seen_at_end)


class SendNowTests(SynchronousTestCase):
    """send_now sends a descriptor's buffered bytes on this turn, as the
    reactor's doWrite would on the next."""

    def descriptor(self, fail: bool = False):
        from twisted.internet.abstract import FileDescriptor
        from twisted.internet.testing import MemoryReactor

        sent: list[bytes] = []

        class Descriptor(FileDescriptor):
            def writeSomeData(self, data):
                if fail:
                    return error.ConnectionLost()
                sent.append(bytes(data))
                return len(data)

            def fileno(self):
                return 99

        reactor = MemoryReactor()
        d = Descriptor(reactor)
        d.connected = 1
        return d, reactor, sent

    def test_buffered_bytes_sent_and_write_watch_stopped(self):
        """The bytes leave at once; the reactor no longer watches for
        writability."""
        from twisted_forward._compat import send_now

        d, reactor, sent = self.descriptor()
        d.write(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertIn(d, reactor.getWriters())
        send_now(d)
        self.assertEqual(b"".join(sent), b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertNotIn(d, reactor.getWriters())

    def test_send_error_left_to_the_reactor(self):
        """A failing send keeps the write watch, so the reactor's own turn
        finds the error and closes the connection."""
        from twisted_forward._compat import send_now

        d, reactor, sent = self.descriptor(fail=True)
        d.write(b"x")
        send_now(d)
        self.assertIn(d, reactor.getWriters())
        self.assertEqual(sent, [])

    def test_disconnecting_left_alone(self):
        """A closing transport is the reactor's to finish."""
        from twisted_forward._compat import send_now

        d, reactor, sent = self.descriptor()
        d.write(b"x")
        d.disconnecting = True
        send_now(d)
        self.assertEqual(sent, [])

    def test_other_transports_left_alone(self):
        """TLS and in-memory transports are not descriptors: nothing happens."""
        from twisted_forward._compat import send_now

        transport = StringTransport()
        transport.write(b"x")
        send_now(transport)
        send_now(None)
        self.assertEqual(transport.value(), b"x")
