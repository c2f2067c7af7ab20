"""
The body relays: how an upstream answer's body reaches the client.

:class:`Relay` writes each chunk to the client as it comes; it is the client
request's producer, so a slow client pauses the upstream instead of filling
the proxy's memory.  :class:`ScrubbingRelay` reads an error answer given for
one of our default keys whole (bounded, timed) for the exchange to mask.
:func:`discard` drops an answer that is not wanted (a failover, a client
gone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, cast

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from .decoding import decode_whole
from .framing import client_transport
from .headers import release

if TYPE_CHECKING:
    from .exchange import Exchange

#: Error bodies larger than this (compressed or not) are not scrubbed but
#: replaced.
SCRUB_LIMIT = 1 << 20

#: How an upstream body ends well: with its framing, or (no framing) by close.
BODY_ENDS = (ResponseDone, PotentialDataLoss)


def body_producer(protocol: Protocol) -> Optional[IPushProducer]:
    """The transport :meth:`IResponse.deliverBody` gives a body protocol.

    It is the upstream connection's ``IPushProducer`` (Twisted's
    ``TransportProxyProducer``), which ``Protocol`` declares as an
    ``ITransport``; None before the body is delivered.  A cast, not an
    adaptation: test doubles need not declare the interface.
    """
    return cast(Optional[IPushProducer], protocol.transport)


class Discard(Protocol):
    """Takes an unwanted answer's body and drops its connection."""

    def connectionMade(self) -> None:
        producer = body_producer(self)
        if producer is not None:
            producer.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
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

    # ``transport`` and ``connected`` are Protocol's (set by makeConnection):
    # slotted too, so a relay holds no instance dict.
    __slots__ = (
        "exchange", "request", "tap", "reactor", "idle", "last", "timer", "stopped", "paused",
        "transport", "connected",
    )

    log = Logger()

    def __init__(self, exchange: Exchange) -> None:
        self.transport = None
        self.connected = 0
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
        producer = body_producer(self)
        if producer is not None:
            producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self.last = self.reactor.seconds()
        producer = body_producer(self)
        if producer is not None:
            producer.resumeProducing()

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
        # The recorder sees the upstream's answer (the usage the policies
        # asked for included); the client, what it asked for.
        if self.tap is not None:
            self.tap.data(data)
        exchange = self.exchange
        data = exchange.admission.relay(data)
        if not data:
            return
        self.request.write(data)
        if not exchange.sent:
            # The first write sent the answer's head (its CORS headers set
            # from the request's): neither Twisted nor the exchange reads
            # the answer's headers or the request's again (the access line,
            # the record, the ledger and the policies took what they need
            # when the request came), though the request keeps both to the
            # end of the stream.
            release(self.request.responseHeaders)
            release(self.request.requestHeaders)
        exchange.sent += len(data)

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
        producer = body_producer(self)
        if producer is not None:
            producer.stopProducing()

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
            transport = client_transport(request.channel)
            if transport is not None:
                if flush:
                    transport.loseConnection()
                else:
                    transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        exchange = self.exchange
        if exchange.client_gone or exchange.done:
            return
        request = self.request
        if isinstance(reason.value, BODY_ENDS):  # (Failure.check walks the MRO)
            held = exchange.mask.flush() if exchange.mask is not None else b""
            if held and self.tap is not None:
                self.tap.data(held)
            held = exchange.admission.relay(held) + exchange.admission.relay_end()
            if held:
                request.write(held)
                exchange.sent += len(held)
            request.unregisterProducer()
            # The answer goes out first (the access line sends it before it
            # is made); the bookkeeping (policy settle, chat record, ledger)
            # runs after, off the client's wait.
            exchange.stop_clock()
            request.finish()
            exchange.end("complete")
            return
        self.log.warn(
            "upstream body broke off on {path}: {why}",
            path=exchange.path.decode("latin-1"), why=reason.getErrorMessage(),
        )
        # The client must not take a cut-off body for a whole one.
        self._cut_client(flush=True)
        exchange.end("upstream_error")


class ScrubbingRelay(Protocol):
    """Reads an error answer given for a default key whole, bounded and timed.

    The upstream echoes part of a rejected key in its error message; that
    key is ours, and the client must not see any of it, so the exchange
    masks the whole body before sending it (and reads a 401's code to tell a
    dead key from a request the upstream refused).  A compressed body is
    decompressed; one that cannot be read (an unknown encoding, too large,
    broken, or stalled) comes out as None, for the exchange to replace with
    its own error.

    Like :class:`Relay`, it has the idle timer (``IDLE_TIMEOUT`` of silence
    ends it) and :meth:`stop` (the client left: the upstream connection is
    dropped, nothing is delivered).

    :param done: called once with ``(body or None, outcome)``, outcome being
        ``complete`` or ``idle_timeout``.
    """

    __slots__ = (
        "exchange", "headers", "done", "reactor", "idle", "chunks", "size", "last", "timer",
        "stopped", "delivered",
    )

    log = Logger()

    def __init__(
        self,
        exchange: Exchange,
        headers: Headers,
        done: Callable[[Optional[bytes], str], None],
    ) -> None:
        self.exchange = exchange
        self.headers = headers
        self.done = done
        self.reactor = exchange.resource.reactor
        self.idle = exchange.resource.idle_timeout
        self.chunks: list[bytes] = []
        self.size = 0
        self.last = 0.0
        self.timer: Optional[IDelayedCall] = None
        #: Stopped from outside (the client left): deliver nothing.
        self.stopped = False
        #: ``done`` was called.
        self.delivered = False

    def connectionMade(self) -> None:
        self.last = self.reactor.seconds()
        self.timer = self.reactor.callLater(self.idle, self._check_idle)

    def dataReceived(self, data: bytes) -> None:
        if self.stopped or self.delivered:
            return
        self.last = self.reactor.seconds()
        self.chunks.append(data)
        self.size += len(data)
        if self.size > SCRUB_LIMIT:
            self._drop_upstream()
            self._deliver(None, "complete")

    def _check_idle(self) -> None:
        self.timer = None
        quiet = self.reactor.seconds() - self.last
        if quiet < self.idle:
            self.timer = self.reactor.callLater(self.idle - quiet, self._check_idle)
            return
        self.log.warn(
            "upstream silent for {seconds}s in an error answer on {path}; ending it",
            seconds=self.idle, path=self.exchange.path.decode("latin-1"),
        )
        self._drop_upstream()
        self._deliver(None, "idle_timeout")

    def _stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _drop_upstream(self) -> None:
        self._stop_timer()
        producer = body_producer(self)
        if producer is not None:
            producer.stopProducing()

    def _deliver(self, body: Optional[bytes], outcome: str) -> None:
        if self.delivered or self.stopped:
            return
        self.delivered = True
        self.chunks = []
        self.done(body, outcome)

    def stop(self) -> None:
        """Drop the answer: the client left (or the exchange was aborted)."""
        if self.stopped:
            return
        self.stopped = True
        self.chunks = []
        self._drop_upstream()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if self.stopped or self.delivered:
            return
        body: Optional[bytes] = None
        if isinstance(reason.value, BODY_ENDS):
            body = decode_whole(b"".join(self.chunks), self.headers, SCRUB_LIMIT)
        self._deliver(body, "complete")
