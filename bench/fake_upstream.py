"""
A fast fake OpenAI upstream for the benchmarks: ``python -m bench.fake_upstream``.

It must never be the bottleneck, so it is a raw :mod:`asyncio` protocol with a
hand-written HTTP/1.1 parser (keep-alive, Content-Length and chunked request
bodies) rather than a web framework; asyncio's transports try the ``send`` at
once instead of waiting for the next loop turn, which matters at tens of
thousands of small answers a second.  It answers:

- ``POST /v1/chat/completions``: a small JSON chat answer; with
  ``"stream": true`` an SSE stream of ``bench.events`` content events (default
  20) ``bench.interval_ms`` apart (default 50), then a finish event and
  ``data: [DONE]``.  ``bench.hold_s`` holds the stream open after the first
  event for that long (for counting the memory of open streams).
- ``POST /v1/files`` (or ``/upload``, ``/v1/audio/transcriptions``): reads the body without keeping it and
  answers ``{"received": n}``.
- ``GET /big/<n>``: ``n`` bytes, written as fast as the reader takes them
  (with flow control, so a slow reader slows the writer).
- ``GET /healthz``: ``ok``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Optional

#: Request bodies larger than this are counted, not kept.
KEEP_LIMIT = 1 << 20
_MAX_HEAD = 64 * 1024
#: States of the chunked request-body decoder.
_SIZE, _DATA, _CRLF, _TRAILER = range(4)


def chat_answer(model: str = "gpt-4o-mini") -> bytes:
    """A small non-stream chat completion, as the real API shapes it."""
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
        },
        separators=(",", ":"),
    ).encode()


def sse_events(count: int, model: str = "gpt-4o-mini") -> list[bytes]:
    """``count`` content events, then the finish event and ``[DONE]`` (as one)."""
    def event(delta: dict, finish: Optional[str]) -> bytes:
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    events = [
        event({"role": "assistant", "content": "w0"} if i == 0 else {"content": f" w{i}"}, None)
        for i in range(count)
    ]
    tail = event({}, "stop") + b"data: [DONE]\n\n"
    if events:
        events[-1] += tail
    else:
        events.append(tail)
    return events


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_CHAT = chat_answer()
_CHAT_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"x-request-id: req-bench\r\ncontent-length: %d\r\n\r\n%s" % (len(_CHAT), _CHAT)
)
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)
_PIECE = b"b" * (256 * 1024)


def _simple(status: bytes, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
        status, ctype, len(body), body,
    )


class UpstreamProtocol(asyncio.Protocol):
    """One client connection of the fake upstream."""

    def __init__(self, defaults: dict) -> None:
        self.defaults = defaults
        self.transport: Optional[asyncio.Transport] = None
        self.buf = bytearray()
        self.head: Optional[tuple[bytes, bytes, dict[bytes, bytes]]] = None
        self.need = 0  # body bytes still to read (Content-Length framing)
        self.chunked = False
        self.chunk_left = 0
        self.chunk_state = _SIZE
        self.body = bytearray()
        self.received = 0
        self.busy = False  # answering a streamed or large request
        self.close_after = False
        self.paused = False
        self.big_left = 0
        self.timer: Optional[asyncio.TimerHandle] = None
        self.events: list[bytes] = []
        self.next_event = 0

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream connection's transport is an asyncio.Transport
        transport.set_write_buffer_limits(high=1 << 20)  # type: ignore[attr-defined]  # as above

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.big_left:
            self._write_big()

    # ------------------------------------------------------------ parsing

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._parse()

    def _parse(self) -> None:
        buf = self.buf
        while self.transport is not None and not self.busy:
            if self.head is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD:
                        self.transport.close()
                    return
                lines = bytes(buf[:end]).split(b"\r\n")
                del buf[: end + 4]
                try:
                    method, target, _version = lines[0].split(b" ", 2)
                except ValueError:
                    self.transport.close()
                    return
                headers: dict[bytes, bytes] = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                self.head = (method, target, headers)
                self.body = bytearray()
                self.received = 0
                self.chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
                self.chunk_state = _SIZE
                self.need = 0 if self.chunked else int(headers.get(b"content-length", b"0"))
                self.close_after = headers.get(b"connection", b"").lower() == b"close"
            if not self._read_body():
                return
            method, target, headers = self.head
            self.head = None
            self._answer(method, target, bytes(self.body))

    def _take(self, n: int) -> None:
        """Move ``n`` body bytes out of the buffer (kept only while small)."""
        if self.received + n <= KEEP_LIMIT:
            self.body += self.buf[:n]
        del self.buf[:n]
        self.received += n

    def _read_body(self) -> bool:
        """Consume body bytes from the buffer; True once the body is whole."""
        buf = self.buf
        if not self.chunked:
            n = min(self.need, len(buf))
            self._take(n)
            self.need -= n
            return self.need == 0
        while True:
            state = self.chunk_state
            if state == _SIZE or state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    return False
                line = bytes(buf[:end])
                del buf[: end + 2]
                if state == _TRAILER:
                    if not line:
                        return True
                    continue
                size = int(line.split(b";")[0], 16)
                self.chunk_left = size
                self.chunk_state = _DATA if size else _TRAILER
            elif state == _DATA:
                n = min(self.chunk_left, len(buf))
                self._take(n)
                self.chunk_left -= n
                if self.chunk_left:
                    return False
                self.chunk_state = _CRLF
            else:
                if len(buf) < 2:
                    return False
                del buf[:2]
                self.chunk_state = _SIZE

    # ------------------------------------------------------------ answers

    def _send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if self.close_after:
            self.transport.close()

    def _answer(self, method: bytes, target: bytes, body: bytes) -> None:
        path = target.split(b"?", 1)[0]
        if path == b"/v1/chat/completions" and method == b"POST":
            if b'"stream"' in body:
                try:
                    request = json.loads(body)
                except ValueError:
                    request = {}
                if request.get("stream"):
                    self._stream(request)
                    return
            self._send(_CHAT_RESPONSE)
        elif path in (b"/v1/files", b"/upload", b"/v1/audio/transcriptions"):
            self._send(_simple(b"200 OK", b'{"received":%d}' % self.received))
        elif path.startswith(b"/big/") and method in (b"GET", b"POST"):
            self._big(int(path[5:]))
        elif path == b"/healthz":
            self._send(_simple(b"200 OK", b"ok", b"text/plain"))
        else:
            self._send(_simple(b"404 Not Found", b'{"error":{"message":"not found"}}'))

    def _stream(self, request: dict) -> None:
        options = dict(self.defaults)
        options.update(request.get("bench") or {})
        self.events = sse_events(int(options["events"]), str(request.get("model", "m")))
        self.interval = float(options["interval_ms"]) / 1000.0
        self.hold = float(options.get("hold_s", 0))
        self.next_event = 0
        self.busy = True
        assert self.transport is not None
        self.transport.write(_SSE_HEAD)
        self._send_event()

    def _send_event(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        i = self.next_event
        self.next_event += 1
        last = self.next_event == len(self.events)
        self.transport.write(_chunk(self.events[i]) + (b"0\r\n\r\n" if last else b""))
        if last:
            self._done()
            return
        delay = self.hold if (i == 0 and self.hold) else self.interval
        self.timer = asyncio.get_running_loop().call_later(delay, self._send_event)

    def _big(self, size: int) -> None:
        assert self.transport is not None
        self.busy = True
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            b"content-length: %d\r\n\r\n" % size
        )
        self.big_left = size
        self._write_big()

    def _write_big(self) -> None:
        while self.big_left and not self.paused and self.transport is not None:
            n = min(self.big_left, len(_PIECE))
            self.big_left -= n
            self.transport.write(_PIECE if n == len(_PIECE) else _PIECE[:n])
        if not self.big_left and self.busy:
            self._done()

    def _done(self) -> None:
        """A streamed or large answer is over: serve what waits, or close."""
        self.busy = False
        if self.transport is None:
            return
        if self.close_after:
            self.transport.close()
            return
        if self.buf:
            self._parse()


async def serve(host: str, port: int, defaults: dict) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(defaults), host, port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    sys.stdout.write(f"fake upstream listening on {host}:{bound}\n")
    sys.stdout.flush()
    await stop
    server.close()


def main(argv: Optional[list[str]] = None) -> None:
    """Command line: ``python -m bench.fake_upstream --port 0``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--events", type=int, default=20, help="SSE content events")
    parser.add_argument("--interval-ms", type=float, default=50.0, help="SSE spacing")
    args = parser.parse_args(argv)
    defaults = {"events": args.events, "interval_ms": args.interval_ms, "hold_s": 0}
    asyncio.run(serve(args.host, args.port, defaults))


if __name__ == "__main__":
    main()
