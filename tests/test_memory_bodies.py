"""
Request bodies are never held whole in memory with the default settings
(chat records on): large chat requests and a raw audio upload through a real
``twistd -n openai-forward`` process, its peak resident size (VmHWM)
compared with its size before.

The upstream here is a sink that hashes what it gets in pieces, so the test
process does not hold the bodies either.
"""

from __future__ import annotations

import hashlib
import json
import os

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Protocol
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from .fake_upstream import chat_answer
from .harness import ProxyTestCase
from .test_memory import LIMIT, MiB, _status_kib
from .test_runmodes import listening_port, spawn_twistd


class Sink(Resource):
    """An upstream that reads each body in 1 MiB pieces and answers with
    its length and digest inside a chat completion."""

    isLeaf = True

    def render_POST(self, request) -> bytes:
        request.content.seek(0)
        digest = hashlib.sha256()
        length = 0
        while True:
            piece = request.content.read(MiB)
            if not piece:
                break
            length += len(piece)
            digest.update(piece)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(chat_answer(f"{length} {digest.hexdigest()}")).encode()

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return b'{"object": "list", "data": []}'


@implementer(IPullProducer)
class _Pieces:
    """Writes ``head`` then ``size`` bytes of body, 1 MiB at a time, as the
    socket drains (the test process never holds the body either)."""

    def __init__(self, transport, head: bytes, prefix: bytes, fill: bytes, suffix: bytes,
                 size: int) -> None:
        self.transport = transport
        self.parts = [head, prefix]
        self.fill = fill
        self.left = size - len(prefix) - len(suffix)
        self.suffix = suffix
        self.digest = hashlib.sha256(prefix)

    def resumeProducing(self) -> None:
        if self.parts:
            self.transport.write(self.parts.pop(0))
            return
        if self.left > 0:
            piece = self.fill[: self.left]
            self.left -= len(piece)
            self.digest.update(piece)
            self.transport.write(piece)
            return
        if self.suffix is not None:
            self.digest.update(self.suffix)
            self.transport.write(self.suffix)
            self.suffix = None
            return
        self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.left = 0


class Uploader(Protocol):
    """Sends one request with a large body; collects the answer."""

    def __init__(self, path: bytes, content_type: bytes, prefix: bytes, fill: bytes,
                 suffix: bytes, size: int) -> None:
        self.head = (
            b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: " + content_type + b"\r\nContent-Length: %d\r\n\r\n" % size
        )
        self.args = (prefix, fill, suffix, size)
        self.answer = b""
        self.done: defer.Deferred = defer.Deferred()
        self.producer: _Pieces

    def connectionMade(self) -> None:
        self.producer = _Pieces(self.transport, self.head, *self.args)
        self.transport.registerProducer(self.producer, False)

    def dataReceived(self, data: bytes) -> None:
        self.answer += data

    def connectionLost(self, reason=None) -> None:
        self.done.callback(self.answer)


class BodyMemoryTests(ProxyTestCase):
    """The chat recorder takes what it needs from a bounded prefix."""

    timeout = 180

    @defer.inlineCallbacks
    def start_child(self):
        sink = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        sink.factory.resource = Sink()
        self.addCleanup(sink.stopListening)
        cwd_log = os.path.abspath(self.mktemp())
        process = spawn_twistd(
            self,
            OPENAI_BASE_URL=f"http://127.0.0.1:{sink.getHost().port}",
            LOG_CHAT="true",
            LOG_DIR=cwd_log,
        )
        port = yield listening_port(process)
        response = yield self.client.get(f"http://127.0.0.1:{port}/v1/models")
        yield response.content()
        yield self.pool.closeCachedConnections()
        return process.pid, port, cwd_log

    @defer.inlineCallbacks
    def upload(self, port: int, *args) -> defer.Deferred:
        uploader = Uploader(*args)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), uploader)
        answer = yield uploader.done
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head[:200])
        return json.loads(body), uploader.producer.digest.hexdigest()

    @defer.inlineCallbacks
    def test_three_concurrent_100mib_chat_requests(self):
        """Three 100 MiB chat requests at once add less than 32 MiB (main
        read each body whole for its record: 300 MiB)."""
        pid, port, log_dir = yield self.start_child()
        before = _status_kib(pid, "VmRSS")
        size = 100 * MiB
        prefix = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
        suffix = b'"}]}'
        results = yield defer.gatherResults([
            self.upload(port, b"/v1/chat/completions", b"application/json",
                        prefix, b"a" * MiB, suffix, size)
            for _ in range(3)
        ])
        for answer, digest in results:
            self.assertEqual(answer["choices"][0]["message"]["content"], f"{size} {digest}")
        growth = _status_kib(pid, "VmHWM") - before
        self.assertLess(growth, LIMIT, f"proxy grew by {growth / MiB:.1f} MiB")

    @defer.inlineCallbacks
    def test_raw_audio_upload_100mib(self):
        """A 100 MiB raw ``application/octet-stream`` transcription upload
        adds less than 32 MiB with the chat records on."""
        pid, port, log_dir = yield self.start_child()
        before = _status_kib(pid, "VmRSS")
        size = 100 * MiB
        answer, digest = yield self.upload(
            port, b"/v1/audio/transcriptions", b"application/octet-stream",
            b"RIFF", os.urandom(MiB), b"", size,
        )
        self.assertEqual(answer["choices"][0]["message"]["content"], f"{size} {digest}")
        growth = _status_kib(pid, "VmHWM") - before
        self.assertLess(growth, LIMIT, f"proxy grew by {growth / MiB:.1f} MiB")
