"""
Load drivers and probes for the benchmarks, all to loopback only.

- :class:`ResponseParser`: an incremental HTTP/1.1 response parser
  (Content-Length, chunked, or until close) shared by every driver.
- Asynchronous drivers on :mod:`asyncio` raw protocols, cheap enough to hold
  thousands of connections: :func:`run_streams`, :class:`HeldStreams`,
  :func:`rps_python` (the fallback when wrk is absent).
- Blocking probes for one thing at a time, where a plain socket is the least
  noisy clock: :class:`KeepAliveClient` (latency), :func:`upload`,
  :func:`slow_read`.
- :class:`RssSampler`: the peak resident memory of a process tree while an
  operation runs.

Every loop here is bounded by a count and a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

_SIZE, _DATA, _CRLF, _TRAILER = range(4)


class ResponseParser:
    """Parses one HTTP/1.1 response fed in pieces.

    :ivar status: the status code once the head is in, else None.
    :ivar done: True once the body is complete.
    :ivar body_bytes: decoded body bytes seen so far.
    """

    def __init__(self, on_body: Optional[Callable[[bytes], None]] = None) -> None:
        self.on_body = on_body
        self.buf = bytearray()
        self.status: Optional[int] = None
        self.headers: dict[bytes, bytes] = {}
        self.mode = ""
        self.left = 0
        self.state = _SIZE
        self.done = False
        self.body_bytes = 0

    def _body(self, data: bytes) -> None:
        self.body_bytes += len(data)
        if self.on_body is not None:
            self.on_body(data)

    def feed(self, data: bytes) -> None:
        """Take the next bytes received."""
        buf = self.buf
        buf += data
        if self.status is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(buf[:end]).split(b"\r\n")
            del buf[: end + 4]
            self.status = int(lines[0].split(b" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                self.headers[name.strip().lower()] = value.strip()
            if b"chunked" in self.headers.get(b"transfer-encoding", b"").lower():
                self.mode = "chunked"
            elif b"content-length" in self.headers:
                self.mode = "length"
                self.left = int(self.headers[b"content-length"])
            else:
                self.mode = "close"
            if self.status in (204, 304) or (self.mode == "length" and not self.left):
                self.done = True
                return
        if self.mode == "length":
            n = min(self.left, len(buf))
            if n:
                self._body(bytes(buf[:n]))
                del buf[:n]
                self.left -= n
            self.done = self.left == 0
        elif self.mode == "chunked":
            self._chunked()
        elif buf:
            self._body(bytes(buf))
            buf.clear()

    def _chunked(self) -> None:
        buf = self.buf
        while not self.done:
            state = self.state
            if state == _SIZE or state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(buf[:end])
                del buf[: end + 2]
                if state == _TRAILER:
                    if not line:
                        self.done = True
                    continue
                self.left = int(line.split(b";")[0], 16)
                self.state = _DATA if self.left else _TRAILER
            elif state == _DATA:
                n = min(self.left, len(buf))
                if not n:
                    return
                self._body(bytes(buf[:n]))
                del buf[:n]
                self.left -= n
                if self.left:
                    return
                self.state = _CRLF
            else:
                if len(buf) < 2:
                    return
                del buf[:2]
                self.state = _SIZE

    def closed(self) -> None:
        """The connection closed: that ends a body framed by the close."""
        if self.mode == "close" and self.status is not None:
            self.done = True


# ---------------------------------------------------------------- requests


#: The key the bench clients send: their own key (it goes upstream as it is).
CLIENT_KEY = "sk-bench-0123456789abcdef"


def chat_request(
    host: str,
    port: int,
    stream: bool = False,
    events: int = 20,
    interval_ms: float = 50.0,
    hold_s: float = 0.0,
    close: bool = False,
    key: str = CLIENT_KEY,
) -> bytes:
    """A complete chat-completion request, as an OpenAI SDK would send it."""
    body: dict = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello to the benchmark."},
        ],
    }
    if stream:
        body["stream"] = True
        body["bench"] = {"events": events, "interval_ms": interval_ms, "hold_s": hold_s}
    payload = json.dumps(body, separators=(",", ":")).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\n"
        b"Authorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nAccept: application/json\r\n"
        b"User-Agent: twisted-forward-bench\r\n%sContent-Length: %d\r\n\r\n%s"
        % (
            host.encode(), port, key.encode(),
            b"Connection: close\r\n" if close else b"",
            len(payload), payload,
        )
    )


def expected_separators(events: int) -> int:
    """Event separators in a whole stream: content events, finish, [DONE]."""
    return events + 2


# ---------------------------------------------------------------- streams


@dataclass
class StreamResult:
    """One SSE stream as the client saw it."""

    whole: bool
    seconds: float
    events: int
    status: Optional[int]
    error: str = ""


class _StreamProtocol(asyncio.Protocol):
    """Sends one request, counts SSE events, resolves a future at the end."""

    def __init__(self, request: bytes, done: "asyncio.Future[None]",
                 first: Optional["asyncio.Future[None]"] = None) -> None:
        self.request = request
        self.done = done
        self.first = first
        self.separators = 0
        self.last = b""
        self.tail = b""
        self.parser = ResponseParser(self._body)
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream connection's transport is an asyncio.Transport
        transport.write(self.request)  # type: ignore[attr-defined]  # as above

    def _body(self, data: bytes) -> None:
        self.separators += (self.last + data).count(b"\n\n")
        self.last = data[-1:]
        self.tail = (self.tail + data)[-16:]
        if self.first is not None and not self.first.done() and self.separators:
            self.first.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        if self.parser.done and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.parser.closed()
        if not self.done.done():
            self.done.set_result(None)
        if self.first is not None and not self.first.done():
            self.first.set_result(None)


async def _one_stream(host: str, port: int, request: bytes, expected: int,
                      timeout: float) -> StreamResult:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    started = time.perf_counter()
    try:
        transport, protocol = await asyncio.wait_for(
            loop.create_connection(lambda: _StreamProtocol(request, done), host, port),
            timeout,
        )
    except (OSError, asyncio.TimeoutError) as e:
        return StreamResult(False, time.perf_counter() - started, 0, None, f"connect: {e!r}")
    try:
        await asyncio.wait_for(asyncio.shield(done), max(0.1, timeout - (time.perf_counter() - started)))
        error = ""
    except asyncio.TimeoutError:
        error = "timeout"
    seconds = time.perf_counter() - started
    transport.close()
    p = protocol
    whole = (
        not error
        and p.parser.done
        and p.parser.status == 200
        and p.separators == expected
        and p.tail.endswith(b"data: [DONE]\n\n")
    )
    if not whole and not error:
        error = f"status {p.parser.status}, {p.separators}/{expected} events, done={p.parser.done}"
    return StreamResult(whole, seconds, p.separators, p.parser.status, error)


async def run_streams(host: str, port: int, count: int, events: int,
                      interval_ms: float, timeout: float,
                      key: str = CLIENT_KEY) -> list[StreamResult]:
    """``count`` concurrent SSE chat streams, each on its own connection."""
    request = chat_request(host, port, stream=True, events=events, interval_ms=interval_ms,
                           key=key)
    expected = expected_separators(events)
    return await asyncio.gather(
        *(_one_stream(host, port, request, expected, timeout) for _ in range(count))
    )


class HeldStreams:
    """SSE streams held open after their first event, for counting memory.

    Streams are opened in batches, each batch waiting for its first events,
    so the listen queue never overflows: this measures memory, not bursts.
    """

    def __init__(self, host: str, port: int, hold_s: float, key: str = CLIENT_KEY) -> None:
        self.host = host
        self.port = port
        self.request = chat_request(host, port, stream=True, events=2, interval_ms=0,
                                    hold_s=hold_s, key=key)
        self.transports: list[asyncio.BaseTransport] = []
        self.protocols: list[_StreamProtocol] = []

    @property
    def opened(self) -> int:
        """Streams that had their first event and are still open."""
        return sum(1 for p in self.protocols if p.separators >= 1 and not p.parser.done
                   and p.transport is not None and not p.transport.is_closing())

    async def add(self, count: int, deadline: float, batch: int = 100,
                  batch_timeout: float = 10.0) -> bool:
        """Open ``count`` more streams, by batches, until ``deadline``
        (a ``time.perf_counter`` value).

        :return: False if a batch did not all get its first events within
            ``batch_timeout`` (the server is not opening more; stop there).
        """
        loop = asyncio.get_running_loop()

        async def one(first: "asyncio.Future[None]") -> None:
            try:
                transport, protocol = await loop.create_connection(
                    lambda: _StreamProtocol(self.request, loop.create_future(), first),
                    self.host, self.port,
                )
            except OSError:
                if not first.done():
                    first.set_result(None)
                return
            self.transports.append(transport)
            self.protocols.append(protocol)

        left = count
        while left > 0:
            n = min(batch, left)
            left -= n
            firsts = [loop.create_future() for _ in range(n)]
            remaining = min(batch_timeout, deadline - time.perf_counter())
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(asyncio.gather(*(one(f) for f in firsts)), remaining)
                await asyncio.wait_for(
                    asyncio.gather(*firsts),
                    max(0.1, min(batch_timeout, deadline - time.perf_counter())),
                )
            except asyncio.TimeoutError:
                return False
        return True

    def close(self) -> None:
        """Drop every held connection."""
        for transport in self.transports:
            transport.abort()  # type: ignore[attr-defined]  # an asyncio.Transport, kept as BaseTransport
        self.transports.clear()
        self.protocols.clear()


# ---------------------------------------------------------------- throughput


class _LoopProtocol(asyncio.Protocol):
    """Sends the same request again as soon as each answer is complete."""

    def __init__(self, request: bytes, deadline: float, counts: list[int],
                 done: "asyncio.Future[None]") -> None:
        self.request = request
        self.deadline = deadline
        self.counts = counts
        self.done = done
        self.parser = ResponseParser()
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream connection's transport is an asyncio.Transport
        transport.write(self.request)  # type: ignore[attr-defined]  # as above

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        parser.feed(data)
        if not parser.done:
            return
        self.counts[0 if parser.status == 200 else 1] += 1
        if time.perf_counter() >= self.deadline:
            assert self.transport is not None
            self.transport.close()
            return
        self.parser = ResponseParser()
        assert self.transport is not None
        self.transport.write(self.request)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def rps_python(host: str, port: int, request: bytes, connections: int,
                     seconds: float) -> tuple[float, int, int]:
    """Closed-loop load on keep-alive connections for ``seconds``.

    :return: (requests/s of 200 answers, 200 count, other count).
    """
    loop = asyncio.get_running_loop()
    counts = [0, 0]
    started = time.perf_counter()
    deadline = started + seconds
    dones = []
    for _ in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        dones.append(done)
        await loop.create_connection(
            lambda d=done: _LoopProtocol(request, deadline, counts, d), host, port
        )
    try:
        await asyncio.wait_for(asyncio.gather(*dones), seconds + 10)
    except asyncio.TimeoutError:
        counts[1] += 1
    elapsed = time.perf_counter() - started
    return counts[0] / elapsed, counts[0], counts[1]


# ---------------------------------------------------------------- blocking


class KeepAliveClient:
    """One keep-alive connection; times single requests end to end."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.address = (host, port)
        self.timeout = timeout
        self.sock: Optional[socket.socket] = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def request(self, request: bytes) -> tuple[int, int]:
        """Send ``request``; return (status, nanoseconds to the whole answer)."""
        if self.sock is None:
            self.sock = self._connect()
        sock = self.sock
        parser = ResponseParser()
        started = time.perf_counter_ns()
        sock.sendall(request)
        while not parser.done:
            data = sock.recv(65536)
            if not data:
                parser.closed()
                self.close()
                if not parser.done:
                    raise ConnectionError("connection closed mid-answer")
                break
            parser.feed(data)
        elapsed = time.perf_counter_ns() - started
        if parser.headers.get(b"connection", b"").lower() == b"close":
            self.close()
        assert parser.status is not None
        return parser.status, elapsed

    def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def upload(host: str, port: int, size: int, timeout: float = 120.0,
           path: str = "/v1/audio/transcriptions", raw: bool = False,
           key: str = CLIENT_KEY) -> tuple[int, bytes, int]:
    """POST a ``size``-byte file to ``path`` (a recorded route by default)
    as the OpenAI SDK does (multipart/form-data), or as one raw
    ``application/octet-stream`` body, as fast as the server takes it.

    :return: (status, answer body, request body length).
    """
    piece = os.urandom(1 << 16) * 16  # 1 MiB, never all of it in memory at once
    boundary = b"----twisted-forward-bench-7MA4YWxkTrZu0gW"
    if raw:
        before = after = b""
        ctype = b"application/octet-stream"
    else:
        before = (
            b"--%s\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            b"--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\"bench.wav\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" % (boundary, boundary)
        )
        after = b"\r\n--%s--\r\n" % boundary
        ctype = b"multipart/form-data; boundary=" + boundary
    total = len(before) + size + len(after)
    head = (
        b"POST %s HTTP/1.1\r\nHost: %s:%d\r\n"
        b"Authorization: Bearer %s\r\n"
        b"Content-Type: %s\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % (path.encode(), host.encode(), port, key.encode(), ctype, total)
    )
    chunks: list[bytes] = []
    parser = ResponseParser(chunks.append)
    with socket.create_connection((host, port), timeout) as sock:
        sock.sendall(head + before)
        left = size
        while left:
            n = min(left, len(piece))
            sock.sendall(piece if n == len(piece) else piece[:n])
            left -= n
        sock.sendall(after)
        while not parser.done:
            data = sock.recv(65536)
            if not data:
                parser.closed()
                break
            parser.feed(data)
    return parser.status or 0, b"".join(chunks), total


def slow_read(host: str, port: int, size: int, rate: float,
              timeout: float = 120.0, key: str = CLIENT_KEY) -> tuple[int, int, float]:
    """GET ``/big/<size>`` reading at most ``rate`` bytes a second.

    The receive buffer is kept small so the reader's slowness reaches the
    server instead of piling up in the kernel.

    :return: (status, body bytes read, seconds).
    """
    request = (
        b"GET /big/%d HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
        b"Connection: close\r\n\r\n" % (size, host.encode(), port, key.encode())
    )
    parser = ResponseParser()
    started = time.perf_counter()
    deadline = started + timeout
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
        sock.sendall(request)
        while not parser.done and time.perf_counter() < deadline:
            data = sock.recv(64 * 1024)
            if not data:
                parser.closed()
                break
            parser.feed(data)
            # Pace the reading: sleep until the byte count is back on schedule.
            ahead = parser.body_bytes / rate - (time.perf_counter() - started)
            if ahead > 0:
                time.sleep(ahead)
    finally:
        sock.close()
    return parser.status or 0, parser.body_bytes, time.perf_counter() - started


# ---------------------------------------------------------------- memory


def raise_nofile() -> tuple[int, int]:
    """Raise this process's soft descriptor limit to its hard limit (the
    drivers hold thousands of connections; children inherit it).

    :return: ``(soft, hard)`` after.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if ppid == pid:
            kids.append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(_children(p))
    return tree


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes, summed."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


class RssSampler:
    """Samples a process tree's resident memory in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pids = process_tree(pid)
        self.interval = interval
        self.baseline = rss_bytes(self.pids)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes(self.pids))

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pids))

    @property
    def growth(self) -> int:
        """Peak minus the resident memory when sampling began."""
        return self.peak - self.baseline
