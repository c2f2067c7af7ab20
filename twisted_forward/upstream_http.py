"""
The HTTP/1.1 client protocol of the proxy's upstream connections.

Twisted's ``HTTP11ClientProtocol`` with two guards, for an upstream that
frames its answers badly or hostilely:

- **A bounded, clean answer head.**  The bytes of each answer head are
  scanned as they arrive, before Twisted's parser sees them: over
  ``max_head`` bytes or ``max_headers`` header lines, a control byte in a
  header (other than HTAB), a header name that is not a token, or an
  obs-folded line, and the connection is dropped; the request fails with
  :class:`UpstreamHeadRefused` (the exchange answers 502).  Twisted alone
  would keep any number of header lines in memory.
- **No reuse after an answer that ends with its head.**  After an answer
  to HEAD, a 204, a 304 (or a ``Content-Length: 0``), anything more the
  upstream sends would be taken for the answer to the *next* request on
  the connection, another user's.  Twisted puts such a connection back in
  the pool at once; here it is closed instead.  Seen from outside: the pool
  is told a connection is reusable (its "quiescent callback") before the
  answer's head is handed on only when the answer had no body to read.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IResponse

from ._compat import (
    CLIENT_FACTORY_SLOTS,
    CLIENT_PROTOCOL_SLOTS,
    HTTP11ClientFactory,
    HTTP11ClientProtocol,
    fill_slot_defaults,
    prime_instance_layouts,
    send_now,
    set_pool_factory,
    slot_defaults,
)

#: Default cap on an answer head's size, status line and blank line included.
MAX_HEAD = 64 * 1024
#: Default cap on an answer head's header lines.
MAX_HEADERS = 100

#: A header line: a token, a colon, a value with no control byte but HTAB.
_FIELD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\Z")
#: Header lines, each ending in CRLF: the usual head, checked in one match.
_FIELDS = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")


class UpstreamHeadRefused(Exception):
    """The upstream's answer head was refused; the text says why.

    :ivar code: ``upstream_head_too_large`` or ``upstream_bad_head``, the
        code of the 502 the client gets.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def head_refusal(failure: Failure) -> Optional[UpstreamHeadRefused]:
    """The :class:`UpstreamHeadRefused` behind a failed upstream request, if any."""
    if not failure.check(ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed):
        return None
    for reason in failure.value.reasons:
        if isinstance(reason.value, UpstreamHeadRefused):
            return reason.value
    return None


class HeadScanner:
    """Checks the bytes of one answer head (and any 1xx heads before it)
    as they arrive, without holding more than one partial line."""

    __slots__ = (
        "max_head", "max_headers", "scanning", "_size", "_lines", "_partial",
        "_status_line", "_interim",
    )

    def __init__(self, max_head: int, max_headers: int) -> None:
        self.max_head = max_head
        self.max_headers = max_headers
        self.scanning = False
        self._size = 0
        self._lines = 0
        self._partial = b""
        self._status_line = True
        self._interim = False

    def start(self) -> None:
        """A request went out: the next bytes are its answer's head."""
        self.scanning = True
        self._size = 0
        self._lines = 0
        self._partial = b""
        self._status_line = True
        self._interim = False

    def feed(self, data: bytes) -> Optional[UpstreamHeadRefused]:
        """Scan ``data``; a refusal, or None while the head is acceptable."""
        if self.scanning and self._status_line and not self._partial and self._whole(data):
            return None
        pos = 0
        while self.scanning:
            end = data.find(b"\n", pos)
            if end < 0:
                self._size += len(data) - pos
                if self._size > self.max_head:
                    return self._too_large()
                self._partial += data[pos:]
                return None
            self._size += end + 1 - pos
            if self._size > self.max_head:
                return self._too_large()
            line = self._partial + data[pos:end]
            self._partial = b""
            pos = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._status_line:
                self._status_line = False
                # "HTTP/1.1 1xx": an interim answer; the real head follows.
                self._interim = line[9:10] == b"1"
                continue
            if not line:
                if self._interim:
                    self._status_line = True
                    continue
                self.scanning = False
                return None
            self._lines += 1
            if self._lines > self.max_headers:
                return UpstreamHeadRefused(
                    "upstream_head_too_large",
                    f"the upstream's answer head has more than {self.max_headers} header lines",
                )
            if _FIELD.match(line) is None:
                return UpstreamHeadRefused(
                    "upstream_bad_head",
                    "the upstream's answer head has a malformed header line "
                    "(a control byte, a name that is not a token, or a folded line)",
                )
        return None

    def _whole(self, data: bytes) -> bool:
        """The fast path: ``data`` holds a whole, acceptable, final head with
        CRLF line ends (the usual case); False sends it the line-by-line way,
        which also says what is wrong, if anything."""
        end = data.find(b"\r\n\r\n")
        if end < 0 or self._size + end + 4 > self.max_head:
            return False
        if data[9:10] == b"1":
            return False  # "HTTP/1.1 1xx": an interim head, another follows
        first = data.find(b"\r\n")
        fields = data[first + 2 : end + 2]
        if fields.count(b"\n") > self.max_headers or _FIELDS.fullmatch(fields) is None:
            return False
        self.scanning = False
        return True

    def _too_large(self) -> UpstreamHeadRefused:
        return UpstreamHeadRefused(
            "upstream_head_too_large",
            f"the upstream's answer head is over {self.max_head} bytes",
        )


#: The class-level values the slots of :class:`GuardedClientProtocol` hide.
_PROTOCOL_DEFAULTS = slot_defaults(HTTP11ClientProtocol, CLIENT_PROTOCOL_SLOTS)
#: ... and those of :class:`GuardedClientFactory`.
_FACTORY_DEFAULTS = slot_defaults(HTTP11ClientFactory, CLIENT_FACTORY_SLOTS)


class GuardedClientProtocol(HTTP11ClientProtocol):
    """``HTTP11ClientProtocol`` with the head guard and the reuse guard.

    One per upstream connection, alive as long as its stream: Twisted's
    attributes and ours are in ``__slots__`` (names in
    :data:`twisted_forward._compat.CLIENT_PROTOCOL_SLOTS`), one pointer each
    instead of an instance dict.
    """

    __slots__ = CLIENT_PROTOCOL_SLOTS + ("scanner", "refused", "awaiting_head", "pool_callback")

    #: The upstream connection (TCP, or TLS over it), set before any call.
    transport: ITCPTransport

    def __init__(
        self, quiescentCallback: Callable[[Any], None], max_head: int, max_headers: int
    ) -> None:
        """:param quiescentCallback: the pool's: called with this protocol
        when its connection may take another request (not after an answer
        that ended with its head, see :func:`_quiescent`)."""
        fill_slot_defaults(self, _PROTOCOL_DEFAULTS)
        # A plain function, not a method bound to each protocol or factory.
        super().__init__(_quiescent)
        self.pool_callback = quiescentCallback
        self.scanner = HeadScanner(max_head, max_headers)
        self.refused: Optional[Failure] = None
        #: True from a request until its answer's head is handed on.
        self.awaiting_head = False

    def request(self, request: Any) -> "Deferred[IResponse]":
        self.scanner.start()
        self.awaiting_head = True
        d = super().request(request)
        d.addBoth(self._head_handed_on)
        # The request is in the transport's buffer: send it on this turn.
        send_now(self.transport)
        return d

    def _head_handed_on(self, result: object) -> object:
        self.awaiting_head = False
        return result

    def dataReceived(self, data: bytes) -> None:
        if self.refused is not None:
            return
        if self.scanner.scanning:
            refusal = self.scanner.feed(data)
            if refusal is not None:
                self.refused = Failure(refusal)
                self.transport.abortConnection()
                return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(self.refused if self.refused is not None else reason)


def _quiescent(protocol: GuardedClientProtocol) -> None:
    """A guarded connection's answer is over: back to the pool, unless the
    answer ended with its head."""
    if protocol.awaiting_head:
        # The answer ended with its head (HEAD, 204, 304, length 0):
        # whatever the upstream sends next must reach no one.
        protocol.transport.loseConnection()
        return
    protocol.pool_callback(protocol)


class GuardedClientFactory(HTTP11ClientFactory):
    """Builds :class:`GuardedClientProtocol` s for the pool (each closes
    instead of pooling a connection whose last answer ended with its head).

    The pool builds one per upstream connection; it lives as long as the
    connection, so it is slotted too (:data:`twisted_forward._compat.CLIENT_FACTORY_SLOTS`).
    """

    __slots__ = CLIENT_FACTORY_SLOTS + ("_pool_callback", "_max_head", "_max_headers")

    noisy = False

    def __init__(
        self,
        quiescentCallback: Callable[[Any], None],
        metadata: str,
        max_head: int = MAX_HEAD,
        max_headers: int = MAX_HEADERS,
    ) -> None:
        fill_slot_defaults(self, _FACTORY_DEFAULTS)
        # Twisted keeps ``metadata`` (the endpoint's repr, made for each
        # connection) only for its own repr, replaced below: not kept.
        super().__init__(quiescentCallback, "")
        self._pool_callback = quiescentCallback
        self._max_head = max_head
        self._max_headers = max_headers

    def __repr__(self) -> str:
        return f"<GuardedClientFactory max_head={self._max_head} max_headers={self._max_headers}>"

    def buildProtocol(self, addr: Any) -> GuardedClientProtocol:
        return GuardedClientProtocol(self._pool_callback, self._max_head, self._max_headers)


#: Whether :func:`guard_pool` laid out Twisted's classes in this process.
_primed = False


def guard_pool(pool: HTTPConnectionPool, max_head: int, max_headers: int) -> None:
    """Make ``pool``'s connections use :class:`GuardedClientProtocol`.

    Also lays out Twisted's upstream-side objects before the first
    connection (:func:`twisted_forward._compat.prime_instance_layouts`), so
    a burst of first streams does not leave every later one carrying a hash
    table in its parser and its transport.
    """
    global _primed
    if not _primed:
        prime_instance_layouts()
        _primed = True

    def factory(quiescentCallback: Callable[[Any], None], metadata: str) -> GuardedClientFactory:
        return GuardedClientFactory(quiescentCallback, metadata, max_head, max_headers)

    set_pool_factory(pool, factory)
