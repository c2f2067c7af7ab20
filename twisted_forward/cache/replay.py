"""
Writes a cached answer to a client: a JSON answer at once, an event stream
as the same SSE events it was stored as, at once or one event every
``interval`` seconds, ending with the stored ``data: [DONE]``.
"""

from __future__ import annotations

from typing import Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from ..chat.recorder import IExchangeTap
from .entry import Entry


def sse_events(body: bytes) -> list[bytes]:
    """Split an event stream after each blank line, keeping every byte:
    ``b"".join(sse_events(body)) == body``."""
    events: list[bytes] = []
    current: list[bytes] = []
    for line in body.splitlines(keepends=True):
        current.append(line)
        if line in (b"\n", b"\r\n", b"\r"):
            events.append(b"".join(current))
            current = []
    if current:
        events.append(b"".join(current))
    return events


class Replay:
    """Answers one request from a cache entry.

    :param interval: seconds between SSE events; 0 writes the body at once.
    :param headers: more answer headers (the policies' ``x-ratelimit-*``).
    :param tap: sees the answer's head and body as written (the chat
        recorder), or None; its ``end`` is left to the exchange.
    :ivar done: fires with the outcome, ``complete`` or ``client_left``.
    """

    def __init__(
        self, request: Request, entry: Entry, clock: IReactorTime, interval: float,
        tap: Optional[IExchangeTap] = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        self.request = request
        self.headers = tuple(headers)
        self.entry = entry
        self.clock = clock
        self.interval = interval
        self.tap = tap
        self.done: Deferred[str] = Deferred()
        self.sent = 0
        self._pending: list[bytes] = []
        self._timer: Optional[IDelayedCall] = None
        self._over = False

    def start(self) -> "Deferred[str]":
        """Write the head and begin the body; returns :attr:`done`."""
        request = self.request
        entry = self.entry
        request.notifyFinish().addErrback(self._client_left)
        request.setResponseCode(200)
        date = request.responseHeaders.getRawHeaders(b"date")
        headers = request.responseHeaders = Headers()
        if date:
            headers.setRawHeaders(b"date", date)
        if entry.content_type:
            headers.setRawHeaders(b"content-type", [entry.content_type])
        age = max(0, int(self.clock.seconds() - entry.stored_at))
        headers.setRawHeaders(b"age", [b"%d" % age])
        headers.setRawHeaders(b"x-cache", [b"hit"])
        for name, value in self.headers:
            headers.setRawHeaders(name, [value])
        if entry.stream:
            headers.setRawHeaders(b"cache-control", [b"no-cache"])
            self._pending = sse_events(entry.body) if self.interval > 0 else [entry.body]
        else:
            headers.setRawHeaders(b"content-length", [b"%d" % len(entry.body)])
            self._pending = [entry.body]
        if self.tap is not None:
            self.tap.response(200, headers)
        self._next()
        return self.done

    def _next(self) -> None:
        self._timer = None
        if self._over:
            return
        if self._pending:
            chunk = self._pending.pop(0)
            if chunk:
                self.request.write(chunk)
                self.sent += len(chunk)
                if self.tap is not None:
                    self.tap.data(chunk)
        if self._pending:
            self._timer = self.clock.callLater(self.interval, self._next)
            return
        self._end("complete")
        self.request.finish()

    def _end(self, outcome: str) -> None:
        if self._over:
            return
        self._over = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.done.callback(outcome)

    def _client_left(self, reason: Failure) -> None:
        self._end("client_left")
