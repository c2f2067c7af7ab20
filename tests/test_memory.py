"""
Memory stays flat: a 200 MiB answer to a slow reader and a 100 MiB upload
through a real ``twistd -n openai-forward`` process, its peak resident size
(VmHWM) compared with its size before.
"""

from __future__ import annotations

import hashlib
import json
import os

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from .harness import ProxyTestCase
from .test_runmodes import listening_port, spawn_twistd

MiB = 1024 * 1024
#: Allowed growth of the proxy's peak resident memory (the issue's bound).
LIMIT = 32 * MiB


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(field)


class SlowReader(Protocol):
    """Reads an HTTP answer slowly: pauses after every 256 KiB."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = 0
        self.since_pause = 0
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.since_pause += len(data)
        if self.since_pause >= 256 * 1024:
            self.since_pause = 0
            self.transport.pauseProducing()
            reactor.callLater(0.001, self.transport.resumeProducing)

    def connectionLost(self, reason) -> None:
        self.done.callback(self.received)


class MemoryTests(ProxyTestCase):
    timeout = 120

    @defer.inlineCallbacks
    def start_child(self):
        process = spawn_twistd(self)
        port = yield listening_port(process)
        # Warm up: import and allocate what every request needs.
        response = yield self.client.get(f"http://127.0.0.1:{port}/v1/models")
        yield response.content()
        yield self.pool.closeCachedConnections()
        return process.pid, port

    @defer.inlineCallbacks
    def test_slow_reader_200mib(self):
        """A 200 MiB answer to a client that reads slowly grows the proxy's peak memory by
        less than LIMIT: back-pressure holds the upstream instead of buffering the body."""
        pid, port = yield self.start_child()
        before = _status_kib(pid, "VmRSS")
        size = 200 * MiB
        reader = SlowReader(
            b"GET /big/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size
        )
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), reader)
        received = yield reader.done
        self.assertGreater(received, size)  # the body and the head
        growth = _status_kib(pid, "VmHWM") - before
        self.assertLess(growth, LIMIT, f"proxy grew by {growth / MiB:.1f} MiB")

    @defer.inlineCallbacks
    def test_upload_100mib(self):
        """A 100 MiB multipart upload reaches the upstream intact (same length and SHA-256)
        while the proxy's peak memory grows by less than LIMIT: the body is streamed,
        never parsed or held whole."""
        pid, port = yield self.start_child()
        before = _status_kib(pid, "VmRSS")
        size = 100 * MiB
        chunk = os.urandom(MiB)
        digest = hashlib.sha256()

        class Uploader(Protocol):
            def __init__(self):
                self.answer = b""
                self.done = defer.Deferred()

            def connectionMade(self):
                self.transport.write(
                    b"POST /sink HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    # multipart: Twisted itself would parse such a body
                    # into request.args, in memory, unless told not to.
                    b"Content-Type: multipart/form-data; boundary=xyzzy\r\n"
                    b"Content-Length: %d\r\n\r\n" % size
                )
                for _ in range(size // MiB):
                    digest.update(chunk)
                    self.transport.write(chunk)

            def dataReceived(self, data):
                self.answer += data

            def connectionLost(self, reason):
                self.done.callback(self.answer)

        uploader = Uploader()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), uploader)
        answer = yield uploader.done
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(body, {"length": size, "sha256": digest.hexdigest()})
        growth = _status_kib(pid, "VmHWM") - before
        self.assertLess(growth, LIMIT, f"proxy grew by {growth / MiB:.1f} MiB")
        self.fake.seen.clear()  # 100 MiB the fake kept
