"""
A fake OpenAI API for the tests: a twisted.web resource on a loopback port.

It records every request it sees and answers by path:

- ``POST /v1/chat/completions``: a JSON answer, or SSE when ``"stream": true``.
  Streams pause before the event index ``hold_at`` until the test fires
  :attr:`FakeOpenAI.release` (so a test can see the first events arrive
  while the upstream is provably not finished).
- ``GET /v1/models``, ``DELETE /v1/files/<id>``: small JSON answers.
- ``POST /v1/files``: echoes the raw body and its content type.
- ``/echo``: the request as the upstream saw it, as JSON.
- ``/status/<code>``: that status with an OpenAI-style error body (a 401
  says ``invalid_api_key``, as the real API does for a dead key).
- ``/stall``: never answers (until the test fires :attr:`stall`).
- ``/drop``: sends half a declared body, then closes the connection.
- ``/reset``: one SSE event, then resets the connection when the test fires
  :attr:`FakeOpenAI.reset`.
- ``/gzip``: a gzip-encoded body with ``Content-Encoding: gzip``.
- ``/cookie``: sets a cookie.
- ``/hop``: answers with hop-by-hop headers that must not reach the client.
- ``/big/<n>``: ``n`` bytes, streamed in 64 KiB pieces with backpressure.
"""

from __future__ import annotations

import base64
import gzip
import json
from dataclasses import dataclass
from typing import Callable, Optional

from twisted.internet import defer
from twisted.internet import reactor as default_reactor
from twisted.internet.interfaces import IListeningPort
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes
    client_port: int = 0

    def header(self, name: bytes) -> Optional[bytes]:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None


def sse_event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chat_chunks(
    text: str, model: str = "gpt-4o-mini", include_usage: bool = False
) -> list[bytes]:
    """SSE events of a streamed chat answer, one word a delta, then [DONE].

    With ``include_usage``, as OpenAI does for ``stream_options.include_usage``:
    every chunk carries ``"usage": null`` and one more chunk, with no
    choices, carries the usage.
    """
    if include_usage:
        plain = chat_chunks(text, model)
        with_usage = [
            e[: -len(b"}\n\n")] + b', "usage": null}\n\n' for e in plain[:-1]
        ]
        words = len(text.split(" "))
        with_usage.append(
            sse_event(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 5, "completion_tokens": words,
                        "total_tokens": 5 + words,
                    },
                }
            )
        )
        return with_usage + plain[-1:]
    words = text.split(" ")
    events = [
        sse_event(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
            }
        )
    ]
    for i, word in enumerate(words):
        events.append(
            sse_event(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"content": word if i == 0 else " " + word},
                            "finish_reason": None,
                        }
                    ],
                }
            )
        )
    events.append(
        sse_event(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
        )
    )
    events.append(b"data: [DONE]\n\n")
    return events


def chat_answer(text: str, model: str = "gpt-4o-mini") -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


class FakeOpenAI(Resource):
    """The fake upstream's single (leaf) resource."""

    isLeaf = True

    def __init__(self, clock=default_reactor) -> None:
        super().__init__()
        self.clock = clock
        self.seen: list[Seen] = []
        self.answer_text = "Hello from the fake upstream"
        self.hold_at: Optional[int] = None
        self.release: defer.Deferred = defer.Deferred()
        self.stall: defer.Deferred = defer.Deferred()
        self.reset: defer.Deferred = defer.Deferred()
        #: Fires with each request as it arrives (then is replaced).
        self.arrived: defer.Deferred = defer.Deferred()
        self.override: Optional[Callable[[Request], object]] = None
        self.open_requests: list[Request] = []

    def render(self, request: Request):
        request.content.seek(0)
        seen = Seen(
            request.method,
            request.uri,
            request.requestHeaders.copy(),
            request.content.read(),
            getattr(request.getClientAddress(), "port", 0),
        )
        self.seen.append(seen)
        arrived, self.arrived = self.arrived, defer.Deferred()
        arrived.callback(seen)
        if self.override is not None:
            return self.override(request)
        path = request.path
        if path == b"/v1/chat/completions" and request.method == b"POST":
            return self._chat(request, seen)
        if path == b"/v1/models":
            return self._json(request, {"object": "list", "data": [{"id": "gpt-4o-mini"}]})
        if path.startswith(b"/v1/files/") and request.method == b"DELETE":
            file_id = path.rsplit(b"/", 1)[1].decode()
            return self._json(request, {"id": file_id, "object": "file", "deleted": True})
        if path == b"/v1/files" and request.method == b"POST":
            return self._json(
                request,
                {
                    "content_type": seen.header(b"content-type").decode("latin-1"),
                    "body_b64": base64.b64encode(seen.body).decode(),
                },
            )
        if path == b"/echo":
            return self._json(request, self.describe(seen))
        if path.startswith(b"/status/"):
            code = int(path.rsplit(b"/", 1)[1])
            request.setResponseCode(code)
            auth = (seen.header(b"authorization") or b"").decode()
            return self._json(
                request,
                {
                    "error": {
                        "message": f"status {code}; key used: {auth[7:]}",
                        "type": "test",
                        # A 401 as the real API gives it for a dead key.
                        "code": "invalid_api_key" if code == 401 else None,
                    }
                },
                code=code,
            )
        if path == b"/stall":
            self.stall.addCallback(lambda _: (request.write(b"late"), request.finish()))
            return NOT_DONE_YET
        if path == b"/drop":
            # Half the declared body, then the connection closes.
            request.setHeader(b"content-length", b"1000")
            request.write(b"x" * 500)
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        if path == b"/reset":
            # One SSE event, then a reset (RST) when the test fires ``reset``.
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(sse_event({"n": 1}))
            self.reset.addCallback(lambda _: request.channel.transport.abortConnection())
            return NOT_DONE_YET
        if path == b"/gzip":
            request.setHeader(b"content-encoding", b"gzip")
            request.setHeader(b"content-type", b"application/json")
            return gzip.compress(b'{"zipped": true}')
        if path == b"/cookie":
            request.addCookie(b"session", b"secret-session", path=b"/")
            return self._json(request, {"cookie": True})
        if path == b"/hop":
            # Raw bytes: twisted.web would rewrite a Connection header.
            transport = request.channel.transport
            transport.write(
                b"HTTP/1.1 200 OK\r\n"
                b"Connection: x-hop-one, close\r\n"
                b"X-Hop-One: 1\r\n"
                b"Keep-Alive: timeout=5\r\n"
                b"Proxy-Connection: keep-alive\r\n"
                b"Proxy-Authenticate: Basic\r\n"
                b"X-Custom: kept\r\n"
                b"Server: fake-openai\r\n"
                b"Content-Length: 3\r\n\r\nhop"
            )
            transport.loseConnection()
            return NOT_DONE_YET
        if path == b"/bare":
            # No Server, Date or Content-Type: none may be invented downstream
            # but Date (RFC 9110 6.6.1).
            transport = request.channel.transport
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            transport.loseConnection()
            return NOT_DONE_YET
        if path == b"/sink":
            import hashlib

            return self._json(
                request,
                {"length": len(seen.body), "sha256": hashlib.sha256(seen.body).hexdigest()},
            )
        if path.startswith(b"/big/"):
            return self._big(request, int(path.rsplit(b"/", 1)[1]))
        request.setResponseCode(404)
        return self._json(request, {"error": {"message": "not found"}}, code=404)

    @staticmethod
    def describe(seen: Seen) -> dict:
        return {
            "method": seen.method.decode(),
            "uri": seen.uri.decode("latin-1"),
            "headers": {
                k.decode("latin-1").lower(): [v.decode("latin-1") for v in vs]
                for k, vs in seen.headers.getAllRawHeaders()
            },
            "body_b64": base64.b64encode(seen.body).decode(),
        }

    def _json(self, request: Request, obj: object, code: int = 200) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-request-id", b"req-fake")
        return json.dumps(obj).encode()

    def _chat(self, request: Request, seen: Seen):
        body = json.loads(seen.body or b"{}")
        if not body.get("stream"):
            return self._json(request, chat_answer(self.answer_text, body.get("model", "m")))
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        options = body.get("stream_options") or {}
        events = chat_chunks(
            self.answer_text, body.get("model", "m"), bool(options.get("include_usage"))
        )
        self.open_requests.append(request)
        # The client's going, seen through the public notifyFinish.
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def send(i: int) -> None:
            if gone:
                return
            if i == len(events):
                request.finish()
                return
            if self.hold_at is not None and i == self.hold_at and not self.release.called:
                self.release.addCallback(lambda _: send(i))
                return
            request.write(events[i])
            self.clock.callLater(0, send, i + 1)

        send(0)
        return NOT_DONE_YET

    def _big(self, request: Request, size: int):
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % size)
        piece = b"b" * 65536
        state = {"left": size, "paused": False}

        class Producer:
            def pauseProducing(self) -> None:
                state["paused"] = True

            def resumeProducing(self) -> None:
                state["paused"] = False
                while state["left"] > 0 and not state["paused"]:
                    n = min(len(piece), state["left"])
                    state["left"] -= n
                    request.write(piece[:n])
                if state["left"] == 0 and not state.get("done"):
                    state["done"] = True
                    request.unregisterProducer()
                    request.finish()

            def stopProducing(self) -> None:
                state["left"] = 0
                state["done"] = True

        producer = Producer()
        request.registerProducer(producer, True)
        producer.resumeProducing()
        return NOT_DONE_YET


def fake_site(resource: FakeOpenAI) -> Site:
    """The site that serves the fake upstream: bodies as sent, with no form
    or multipart parsing (like OpenAI)."""
    return Site(resource, parsePOSTFormSubmission=False)


def listen_fake(resource: FakeOpenAI, reactor=default_reactor) -> IListeningPort:
    """Serve the fake upstream on 127.0.0.1, on a port the OS picks."""
    return reactor.listenTCP(0, fake_site(resource), interface="127.0.0.1")
