"""
The body relays: how an upstream answer's body reaches the client.

:class:`Relay` writes each chunk to the client as it comes; it is the client
request's producer, so a slow client pauses the upstream instead of filling
the proxy's memory.  :class:`ScrubbingRelay` takes an error answer given for
one of our default keys whole (bounded) and masks keys in it.
:func:`discard` drops an answer that is not wanted (a failover, a client
gone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from zope.interface import implementer

from .decoding import decode_whole
from .errors import error_body
from .keys import scrub

if TYPE_CHECKING:
    from .exchange import Exchange

#: Error bodies larger than this (compressed or not) are not scrubbed but
#: replaced.
SCRUB_LIMIT = 1 << 20

#: How an upstream body ends well: with its framing, or (no framing) by close.
BODY_ENDS = (ResponseDone, PotentialDataLoss)


class Discard(Protocol):
    """Takes an unwanted answer's body and drops its connection."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        pass


def discard(response: IResponse) -> None:
    response.deliverBody(Discard())


@implementer(IPushProducer)
class Relay(Protocol):
    """Writes the upstream body to the client chunk by chunk, as it comes.

    It is also the client request's producer: a client that stops reading
    pauses it, and it pauses the upstream connection.  Knowing it is paused
    lets the idle timer tell a silent upstream from a client that stalled.
    """

    log = Logger()

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.request = exchange.request
        self.tap = exchange.tap
        self.reactor = exchange.resource.reactor
        self.idle = exchange.resource.idle_timeout
        self.last = 0.0
        self.timer: Optional[IDelayedCall] = None
        self.stopped = False
        self.paused = False

    def connectionMade(self) -> None:
        self.request.registerProducer(self, True)
        self.last = self.reactor.seconds()
        self.timer = self.reactor.callLater(self.idle, self._check_idle)

    # IPushProducer, for the client request
    def pauseProducing(self) -> None:
        self.paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self.last = self.reactor.seconds()
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.stop()

    def dataReceived(self, data: bytes) -> None:
        if self.stopped:
            return
        self.last = self.reactor.seconds()
        mask = self.exchange.mask
        if mask is not None:
            data = mask.feed(data)
            if not data:
                return
        self.request.write(data)
        self.exchange.sent += len(data)
        if self.tap is not None:
            self.tap.data(data)

    def _check_idle(self) -> None:
        """Fires at most once an idle period; cheaper than a reset per chunk."""
        self.timer = None
        quiet = self.reactor.seconds() - self.last
        if quiet < self.idle:
            self.timer = self.reactor.callLater(self.idle - quiet, self._check_idle)
            return
        if self.paused:
            self.log.info(
                "client stopped reading for {seconds}s on {path}; ending the answer",
                seconds=self.idle, path=self.exchange.path.decode("latin-1"),
            )
        else:
            self.log.warn(
                "upstream silent for {seconds}s mid-body on {path}; ending the answer",
                seconds=self.idle, path=self.exchange.path.decode("latin-1"),
            )
        self.stop()
        self._cut_client(flush=not self.paused)
        self.exchange.end("idle_timeout")

    def stop(self) -> None:
        """Stop relaying: the client left, or the upstream went quiet."""
        if self.stopped:
            return
        self.stopped = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.transport is not None:
            self.transport.stopProducing()

    def _cut_client(self, flush: bool) -> None:
        """End the client's connection without finishing the answer.

        With ``flush``, what was relayed is delivered first and the
        connection then closed: the client sees a body cut short of its
        framing (too few bytes, or no last chunk) and knows it is not whole.
        Without, it is reset at once (for a client that stopped reading).
        """
        request = self.request
        if request.channel is not None:
            request.unregisterProducer()
            transport = request.channel.transport
            if transport is not None:
                if flush:
                    transport.loseConnection()
                else:
                    transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        exchange = self.exchange
        if exchange.client_gone or exchange.done:
            return
        request = self.request
        if isinstance(reason.value, BODY_ENDS):  # (Failure.check walks the MRO)
            held = exchange.mask.flush() if exchange.mask is not None else b""
            if held:
                request.write(held)
                exchange.sent += len(held)
                if self.tap is not None:
                    self.tap.data(held)
            request.unregisterProducer()
            exchange.end("complete")
            request.finish()
            return
        self.log.warn(
            "upstream body broke off on {path}: {why}",
            path=exchange.path.decode("latin-1"), why=reason.getErrorMessage(),
        )
        # The client must not take a cut-off body for a whole one.
        self._cut_client(flush=True)
        exchange.end("upstream_error")


class ScrubbingRelay(Protocol):
    """Buffers an error answer given for a default key and masks keys in it.

    The upstream echoes part of a rejected key in its error message; that
    key is ours, and the client must not see any of it.  A compressed body
    is decompressed to be looked at (and sent uncompressed); one that cannot
    be looked at (an unknown encoding, too large, broken) is replaced by the
    proxy's own error.
    """

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.chunks: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.size > SCRUB_LIMIT:
            return
        self.chunks.append(data)
        self.size += len(data)
        if self.size > SCRUB_LIMIT:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        exchange = self.exchange
        if exchange.client_gone or exchange.done:
            return
        request = exchange.request
        headers = request.responseHeaders
        body: Optional[bytes] = None
        if isinstance(reason.value, BODY_ENDS) and self.size <= SCRUB_LIMIT:
            body = decode_whole(b"".join(self.chunks), headers, SCRUB_LIMIT)
        if body is None:
            body = error_body(
                502, "upstream_error", "The upstream's error answer was unreadable."
            )
            headers.setRawHeaders(b"content-type", [b"application/json"])
        headers.removeHeader(b"content-encoding")
        assert exchange.mask is not None
        body = scrub(exchange.mask.feed(body) + exchange.mask.flush())
        headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
        if exchange.tap is not None:
            exchange.tap.response(request.code, headers)
            exchange.tap.data(body)
        if request.method != b"HEAD":
            request.write(body)
            exchange.sent += len(body)
        exchange.end("complete")
        request.finish()
