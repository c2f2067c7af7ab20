"""
A raw-socket fake upstream that misbehaves on demand.

twisted.web (tests/fake_upstream.py) only writes well-formed answers; the
hostile cases (a reason phrase carrying a key, a HEAD answered with a body,
200,000 header lines, control bytes, an error body that stops half-way) need
bytes written by hand.  :class:`RawUpstream` parses each request the proxy
sends (head, and a Content-Length or chunked body) and hands it to the
test's :attr:`RawUpstream.handler`, which writes whatever it likes on the
:class:`RawConnection`.  It counts its open connections, so a test can wait
for every connection the proxy opened to be closed again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from twisted.internet import defer
from twisted.internet import reactor as default_reactor
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers


@dataclass
class RawRequest:
    """One request as the raw upstream parsed it."""

    method: bytes
    target: bytes
    headers: Headers
    body: bytes
    #: Which connection it came on (1 for the first connection, ...).
    connection: int = 0

    def header(self, name: bytes) -> Optional[bytes]:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None


def answer(status: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    """An HTTP/1.1 answer as bytes: ``status`` is the whole status line tail
    (``b"200 OK"``); a Content-Length is added unless ``headers`` has one."""
    lines = [b"HTTP/1.1 " + status]
    names = {name.lower() for name, _ in headers}
    lines += [name + b": " + value for name, value in headers]
    if b"content-length" not in names and b"transfer-encoding" not in names:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class RawConnection(Protocol):
    """One connection from the proxy: parses requests, lets the handler answer."""

    def __init__(self, upstream: "RawUpstream", number: int) -> None:
        self.upstream = upstream
        self.number = number
        self.buffer = b""
        self.closed = False

    def connectionMade(self) -> None:
        self.upstream.open += 1
        self.upstream.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            request = self._parse()
            if request is None:
                return
            self.upstream.seen.append(request)
            arrived, self.upstream.arrived = self.upstream.arrived, defer.Deferred()
            self.upstream.handler(self, request)
            arrived.callback(request)

    def _parse(self) -> Optional[RawRequest]:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buffer[:end].split(b"\r\n")
        method, target, _ = head[0].split(b" ", 2)
        headers = Headers()
        for line in head[1:]:
            name, _, value = line.partition(b":")
            headers.addRawHeader(name.strip(), value.strip())
        rest = self.buffer[end + 4 :]
        length = headers.getRawHeaders(b"content-length")
        if length:
            size = int(length[0])
            if len(rest) < size:
                return None
            body, rest = rest[:size], rest[size:]
        elif headers.getRawHeaders(b"transfer-encoding"):
            body = b""
            while True:
                line_end = rest.find(b"\r\n")
                if line_end < 0:
                    return None
                size = int(rest[:line_end].split(b";")[0], 16)
                if len(rest) < line_end + 2 + size + 2:
                    return None
                body += rest[line_end + 2 : line_end + 2 + size]
                rest = rest[line_end + 2 + size + 2 :]
                if size == 0:
                    break
        else:
            body = b""
        self.buffer = rest
        return RawRequest(method, target, headers, body, self.number)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self.upstream.open -= 1
        if not self.upstream.open:
            waiters, self.upstream._idle = self.upstream._idle, []
            for d in waiters:
                d.callback(None)


def _not_set(connection: RawConnection, request: RawRequest) -> None:
    connection.write(answer(b"500 Internal Server Error", [], b"no handler"))


class RawUpstream(Factory):
    """The raw fake upstream's factory; the test sets :attr:`handler`."""

    noisy = False

    def __init__(self) -> None:
        self.handler: Callable[[RawConnection, RawRequest], None] = _not_set
        self.seen: list[RawRequest] = []
        self.connections: list[RawConnection] = []
        #: Connections open now.
        self.open = 0
        #: Fires with each request once its handler ran (then is replaced).
        self.arrived: defer.Deferred = defer.Deferred()
        self._idle: list[defer.Deferred] = []
        self._count = 0

    def buildProtocol(self, addr: object) -> RawConnection:
        self._count += 1
        return RawConnection(self, self._count)

    def all_closed(self) -> defer.Deferred:
        """Fires once no connection to the raw upstream is open."""
        if not self.open:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._idle.append(d)
        return d

    def listen(self, reactor=default_reactor) -> IListeningPort:
        """Listen on 127.0.0.1, on a port the OS picks."""
        return reactor.listenTCP(0, self, interface="127.0.0.1")


@defer.inlineCallbacks
def stop_raw(upstream: RawUpstream, port: IListeningPort):
    """Stop listening, close what the proxy left open, wait for it (cleanup)."""
    yield port.stopListening()
    for connection in list(upstream.connections):
        if not connection.closed:
            connection.transport.abortConnection()
    yield upstream.all_closed()
