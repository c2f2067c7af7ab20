"""
HTTP/1.1 framing: what the proxy refuses before a request reaches a resource.

Twisted's parser already refuses most malformed requests (bad request
lines, header names that are not tokens, NUL/CR/LF in values, signed, listed
or duplicate Content-Length, Content-Length with chunked, malformed chunk
sizes).  :class:`ForwardChannel` adds what RFC 9112 asks for and Twisted
26.10 still accepts, each of which lets a front-end and this server disagree
about where a request ends (request smuggling):

- ``Transfer-Encoding`` other than exactly ``chunked`` (``identity``,
  ``chunked, identity``, one line ``chunked`` and another ``identity``):
  400 when chunked is not the final coding, 501 for a coding before it
  (RFC 9112 §6.1); any ``Transfer-Encoding`` on HTTP/1.0 is faulty framing;
- obsolete line folding (a header line starting with SP or HTAB);
- control characters other than HTAB in field values (RFC 9110 §5.5);
- request targets with bytes outside visible ASCII, a fragment, or
  userinfo in the absolute form (RFC 9110 §4.2.4);
- a missing Host on HTTP/1.1, more than one Host, an invalid Host
  (RFC 9112 §3.2);
- malformed trailer lines in a chunked body.

Bodies over the configured maximum get 413: from Content-Length before the
body is read (and before any ``100 Continue``), and while a chunked body
arrives (``ForwardRequest.handleContentChunk``).

Once a head is in, the site's head checks (:mod:`twisted_forward.headcheck`:
the IP gate, the forward key) judge it before any body is read or
``100 Continue`` sent.  A head must arrive whole within ``head_timeout``
seconds of its first byte and a body must not go ``body_timeout`` seconds
without a byte (408 either way, however slowly the bytes trickle).  Head
lines end in CRLF: a bare LF gets 400 at once (RFC 9112 §2.2 lets a server
refuse it; waiting for a CRLF that never comes would hold the connection).

Every refusal is an OpenAI-style JSON error, written by the channel itself
(no resource has seen the request), with ``Connection: close``.  The
channel then stops sending, reads and drops what the client still sends for
a short while (so the client sees the answer instead of a reset), and
closes.  Nothing of a refused request goes upstream, and the connection
serves nothing after it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Protocol, Sequence, cast

from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers

from ._compat import CHANNEL_SLOTS, ChannelHooks, fill_slot_defaults, slot_defaults
from .errors import error_body

if TYPE_CHECKING:
    from .headcheck import IHeadCheck
    from .limits import ConnectionLimits
    from .site import ForwardSite, SidePortSite


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: the status, the error code and a message."""

    status: int
    code: str
    message: str


#: Twisted's own refusals (:meth:`ChannelHooks.malformed_request`) say no more.
MALFORMED = Refusal(
    400, "malformed_request", "The request is not valid HTTP/1.1 and was not read."
)
HEADERS_TOO_LARGE = Refusal(
    431,
    "request_header_fields_too_large",
    "The request's header section is too large.",
)
REQUEST_LINE_TOO_LONG = Refusal(414, "uri_too_long", "The request line is too long.")
OBS_FOLD = Refusal(
    400,
    "obsolete_line_folding",
    "Header lines must not start with whitespace (obsolete line folding).",
)
BAD_FIELD_VALUE = Refusal(400, "invalid_header_value", "A header value holds a control character.")
BAD_TRAILER = Refusal(400, "invalid_trailer", "A trailer line of the chunked body is malformed.")

#: The access gate's refusal, when it is made before a body is read.
IP_NOT_ALLOWED = Refusal(403, "ip_not_allowed", "Your address may not use this proxy.")
BARE_LF = Refusal(
    400, "bare_line_feed", "Request head lines must end in CRLF, not a bare LF."
)
HEAD_TIMEOUT = Refusal(
    408, "request_head_timeout", "The request head did not arrive in time."
)
BODY_TIMEOUT = Refusal(
    408, "request_body_timeout", "The request body stopped arriving."
)
HEAD_CHECK_FAILED = Refusal(
    500, "internal_error", "The proxy could not check this request."
)

#: Reason phrases Twisted's table lacks.
_PHRASES = {
    408: b"Request Timeout",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
}

_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOST = re.compile(
    rb"(?:\[[0-9A-Za-z:.\-_~!$&'()*+,;=%]+\]|[0-9A-Za-z\-._~!$&'()*+,;=%]*)(?::[0-9]*)?"
)
_VISIBLE_ASCII = re.compile(rb"[\x21-\x7e]+")
#: Header lines, each ending in CRLF, none folded, no control byte but HTAB
#: in a value: a header section :func:`split_head` takes whole.
_FIELDS = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
#: Header names (lower-cased) that set the body's framing: they go through
#: Twisted's own header handling, which picks the body decoder.
_FRAMING_NAMES = frozenset([b"content-length", b"transfer-encoding"])


def split_head(
    data: bytes, max_fields: int, max_bytes: int
) -> Optional[tuple[list[tuple[bytes, bytes]], int]]:
    """Take a whole, clean header section from the start of ``data`` at once.

    ``data`` is what follows a request line.  When it holds the whole header
    section (up to the blank line), every line ending in CRLF, every name a
    token, no folded line, no control byte but HTAB in a value, at most
    ``max_fields`` lines and ``max_bytes`` bytes of lines (CRLFs not
    counted): the ``(name, value)`` pairs (values stripped of SP/HTAB, as
    Twisted does) and the offset just past the blank line.  None otherwise:
    the section is then read line by line, the way that finds (and refuses)
    whatever is wrong with it, or waits for the rest of it.
    """
    if data[:2] == b"\r\n":
        return None  # no header at all: rare, left to the line parser
    end = data.find(b"\r\n\r\n", 0, max_bytes + 2 * max_fields + 4)
    if end < 0:
        return None
    block = data[: end + 2]
    count = block.count(b"\r\n")
    if count > max_fields or len(block) - 2 * count > max_bytes:
        return None
    if _FIELDS.fullmatch(block) is None:
        return None
    fields = []
    for line in block[:-2].split(b"\r\n"):
        name, _, value = line.partition(b":")
        fields.append((name, value.strip(b" \t")))
    return fields, end + 4


def answer(
    refusal: Refusal, now: float, extra: Sequence[tuple[bytes, bytes]] = ()
) -> bytes:
    """The complete HTTP/1.1 response that refuses a request (``extra``:
    more header lines, such as the CORS headers)."""
    body = error_body(refusal.status, refusal.code, refusal.message)
    phrase = _PHRASES.get(refusal.status) or RESPONSES.get(refusal.status, b"Error")
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (refusal.status, phrase),
            b"Date: %s\r\n" % datetimeToString(now),
            b"Content-Type: application/json\r\n",
            b"Content-Length: %d\r\n" % len(body),
            *(b"%s: %s\r\n" % (name, value) for name, value in extra),
            b"Connection: close\r\n\r\n",
            body,
        ]
    )


def body_too_large(limit: int) -> Refusal:
    """The refusal of a body over ``limit`` bytes."""
    return Refusal(
        413,
        "request_too_large",
        f"The request body is larger than this proxy accepts ({limit} bytes).",
    )


def check_request_target(target: bytes) -> Optional[Refusal]:
    """Refuse targets Twisted lets through but RFC 9112 §3.2 does not.

    Twisted accepts the bytes 0x7F to 0xB0; a fragment has no place in a
    request; userinfo in an absolute-form target hides the real authority.
    """
    if not _VISIBLE_ASCII.fullmatch(target):
        return Refusal(
            400,
            "invalid_request_target",
            "The request target must be visible ASCII; percent-encode other bytes.",
        )
    if b"#" in target:
        return Refusal(
            400, "invalid_request_target", "The request target must not hold a fragment."
        )
    scheme, sep, rest = target.partition(b"://")
    if sep and scheme.lower() in (b"http", b"https"):
        authority = re.split(rb"[/?]", rest, maxsplit=1)[0]
        if b"@" in authority:
            return Refusal(
                400,
                "invalid_request_target",
                "The request target must not hold userinfo.",
            )
    return None


def check_field_value(value: bytes) -> Optional[Refusal]:
    """Refuse control characters (but HTAB) in a field value (RFC 9110 §5.5)."""
    if _CTL.search(value):
        return BAD_FIELD_VALUE
    return None


def split_codings(value: bytes) -> list[bytes]:
    """The transfer codings of one Transfer-Encoding line, lower-cased."""
    return [c.strip(b" \t").lower() for c in value.split(b",")]


def check_transfer_codings(codings: Sequence[bytes]) -> Optional[Refusal]:
    """Judge a request's transfer codings, all Transfer-Encoding lines joined.

    Only exactly ``chunked`` is served.  RFC 9112 §6.1: if chunked is not the
    final coding the body's length cannot be known (400, and close); a coding
    the server does not understand gets 501.
    """
    if not codings:
        return None
    if any(not _TOKEN.fullmatch(c) for c in codings):
        return Refusal(
            400, "invalid_transfer_encoding", "The Transfer-Encoding header is malformed."
        )
    if codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
        return Refusal(
            400,
            "invalid_transfer_encoding",
            "chunked must be the final transfer coding, applied once.",
        )
    if len(codings) > 1:
        return Refusal(
            501,
            "unsupported_transfer_coding",
            "Only the chunked transfer coding is supported.",
        )
    return None


def check_host(values: Optional[Sequence[bytes]], version: bytes) -> Optional[Refusal]:
    """RFC 9112 §3.2: one valid Host, required on HTTP/1.1."""
    if not values:
        if version == b"HTTP/1.1":
            return Refusal(400, "missing_host", "HTTP/1.1 requests must carry a Host header.")
        return None
    if len(values) > 1:
        return Refusal(400, "invalid_host", "The request carries more than one Host header.")
    if not _HOST.fullmatch(values[0]):
        return Refusal(400, "invalid_host", "The Host header is not a valid host.")
    return None


def check_head(
    version: bytes,
    headers: Headers,
    codings: Sequence[bytes],
    max_body: Optional[int],
) -> Optional[Refusal]:
    """Judge a request head once all its header lines are in.

    :param codings: the transfer codings of every Transfer-Encoding line, in
        order (the channel keeps those lines from Twisted's parser).
    :param max_body: the largest body accepted, in bytes, or None.
    """
    has_length = headers.hasHeader(b"content-length")
    if codings:
        if version != b"HTTP/1.1":
            return Refusal(
                400,
                "invalid_transfer_encoding",
                "Transfer-Encoding is not allowed on HTTP/1.0 requests.",
            )
        refusal = check_transfer_codings(codings)
        if refusal is not None:
            return refusal
        if has_length:
            return Refusal(
                400,
                "invalid_content_length",
                "A request must not carry both Content-Length and Transfer-Encoding.",
            )
    refusal = check_host(headers.getRawHeaders(b"host"), version)
    if refusal is not None:
        return refusal
    if max_body is not None and has_length:
        # Twisted's parser has checked it is one run of digits.
        length = int(headers.getRawHeaders(b"content-length", [b"0"])[0])
        if length > max_body:
            return body_too_large(max_body)
    return None


def check_trailers(lines: Iterable[bytes]) -> Optional[Refusal]:
    """Trailer lines are dropped, but must still be ``name: value`` lines."""
    for line in lines:
        name, sep, value = bytes(line).partition(b":")
        if not sep or not _TOKEN.fullmatch(name) or _CTL.search(value):
            return BAD_TRAILER
    return None


@dataclass(frozen=True)
class ChannelSettings:
    """What the site tells each of its channels, given at construction.

    :ivar max_request_body: the largest request body accepted, in bytes, or
        None for no limit.
    :ivar max_headers: the most header lines a request head may have.
    :ivar max_header_bytes: the longest request head (and single line).
    :ivar head_checks: run on every request head, in order (the site's
        :class:`~twisted_forward.headcheck.HeadChecks`, which a reload
        updates for every connection).
    :ivar head_timeout: seconds from a head's first byte to its end, or None.
    :ivar body_timeout: seconds a body may go without a byte, or None.
    :ivar count_refusal: called with each refusal's error code (the
        refusals metric), or None.
    :ivar seconds: the clock the refusal answers' ``Date`` is read from.
    """

    max_request_body: Optional[int] = None
    max_headers: int = 100
    max_header_bytes: int = 16384
    head_checks: Iterable["IHeadCheck"] = ()
    head_timeout: Optional[float] = None
    body_timeout: Optional[float] = None
    count_refusal: Optional[Callable[[str], None]] = None
    seconds: Callable[[], float] = time.time


class ClientTransport(Protocol):
    """A client connection's transport, as the channel and the relay use it.

    ``Protocol.transport`` is declared an ``ITransport``; what a listening
    port gives its channels (``tcp.Server``, ``unix.Server``, the TLS
    wrapper) has these too, which no one interface names.
    """

    #: True once a close was asked for.
    disconnecting: bool

    def write(self, data: bytes) -> None: ...

    def getPeer(self) -> IAddress: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def unregisterProducer(self) -> None: ...

    #: Only a plain socket's class has it (see :meth:`ForwardChannel.refuse`).
    def loseWriteConnection(self) -> None: ...


def client_transport(channel: Optional[HTTPChannel]) -> Optional[ClientTransport]:
    """``channel``'s transport as a :class:`ClientTransport`; None when
    there is no channel (a finished request has none) or no connection."""
    if channel is None:
        return None
    return cast(Optional[ClientTransport], channel.transport)


#: The class-level values the slots of :class:`ForwardChannel` hide.
_CHANNEL_DEFAULTS = slot_defaults(ChannelHooks, CHANNEL_SLOTS)


class ForwardChannel(ChannelHooks):
    """Twisted's HTTP/1.1 channel with the refusals this module describes.

    :param settings: its limits, deadlines and head checks, from the site
        (:class:`~twisted_forward.site.ForwardSite`).  From them:

    :ivar max_request_body: the largest request body accepted, in bytes, or
        None for no limit.
    :ivar head_checks: :class:`~twisted_forward.headcheck.IHeadCheck` s run
        on every request head, in order.
    :ivar head_timeout: seconds from a head's first byte to its end, or None.
    :ivar body_timeout: seconds a body may go without a byte, or None.
    :ivar limits: the site's connection counter, or None; this connection
        is counted in it from :meth:`admit` until it closes.
    :ivar linger_seconds: after a refusal, how long to read and drop what
        the client still sends before closing.
    :ivar linger_bytes: ... and how much of it at most.
    """

    # One pointer each instead of a hash table per connection (see
    # twisted_forward._compat.CHANNEL_SLOTS).
    __slots__ = CHANNEL_SLOTS + (
        "settings", "max_request_body", "head_checks", "head_timeout", "body_timeout",
        "limits", "refused", "_linger_call", "_lingered", "_refuse_on_connect",
        "_counted", "_counted_peer", "_awaiting_head", "_head_timer", "_body_timer",
        "_body_last", "_idle_timeout", "_in_head", "_head_version", "_head_size",
        "_header_count", "_codings", "_body_in_hand",
    )

    log = Logger()

    #: The site that built this channel (set by ``Site.buildProtocol``,
    #: after construction); None for a channel made alone, as in tests.
    site: Optional["ForwardSite | SidePortSite"]
    max_request_body: Optional[int]
    head_checks: Iterable["IHeadCheck"]
    head_timeout: Optional[float]
    body_timeout: Optional[float]
    limits: Optional["ConnectionLimits"]
    maxHeaders = 100
    totalHeadersSize = 16384
    MAX_LENGTH = 16384
    linger_seconds = 2.0
    linger_bytes = 1 << 20
    #: Lines are split at LF, so one ending without its CR is seen (and
    #: refused) instead of waited on.
    delimiter = b"\n"
    #: Take a request's header section whole when it is all here and clean
    #: (:func:`split_head`), instead of line by line.
    whole_heads = True

    def __init__(self, settings: ChannelSettings = ChannelSettings()) -> None:
        fill_slot_defaults(self, _CHANNEL_DEFAULTS)
        super().__init__()
        self.settings = settings
        self.site = None
        self.limits = None
        self.max_request_body = settings.max_request_body
        self.maxHeaders = settings.max_headers
        self.totalHeadersSize = self.MAX_LENGTH = settings.max_header_bytes
        self.head_checks = settings.head_checks
        self.head_timeout = settings.head_timeout
        self.body_timeout = settings.body_timeout
        self.refused: Optional[Refusal] = None
        self._linger_call: Optional[IDelayedCall] = None
        self._lingered = 0
        self._refuse_on_connect: Optional[Refusal] = None
        self._counted = False
        self._counted_peer: Optional[IAddress] = None
        self._awaiting_head = True
        self._head_timer: Optional[IDelayedCall] = None
        self._body_timer: Optional[IDelayedCall] = None
        self._body_last = 0.0
        self._idle_timeout: Optional[float] = None
        self._body_in_hand = 0
        self._new_head()

    def _new_head(self) -> None:
        self._in_head = False
        self._head_version = b""
        self._head_size = 0
        self._header_count = 0
        self._codings: list[bytes] = []

    # ------------------------------------------------------------ answer head

    def writeHeaders(
        self, version: bytes, code: bytes, reason: bytes, headers: Headers
    ) -> None:
        """An answer's status line and headers, as one string.

        ``HTTPChannel.writeHeaders`` hands the transport four pieces per
        header line (each checked, counted and later joined by the
        transport); these are the same bytes, joined once.
        """
        lines = [b"%s %s %s" % (version, code, reason)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.append(b"%s: %s" % (name, value))
        lines.append(b"\r\n")
        transport = self.transport
        assert transport is not None  # a request is answered on a connected channel
        transport.write(b"\r\n".join(lines))

    # ------------------------------------------------------------ connection

    def admit(self, limits: "ConnectionLimits", peer: Optional[IAddress]) -> None:
        """Count this connection from ``peer`` in ``limits``, or, over a
        cap, arrange for it to be refused as soon as it is made (uncounted)."""
        self.limits = limits
        self._counted_peer = peer
        refusal = limits.admit(peer)
        if refusal is None:
            self._counted = True
        else:
            self._refuse_on_connect = refusal

    def connectionMade(self) -> None:
        super().connectionMade()
        if self._refuse_on_connect is not None:
            self.refuse(self._refuse_on_connect, quiet=True)

    # ------------------------------------------------------------ parsing

    def dataReceived(self, data: bytes) -> None:
        if self.refused is not None:
            self._drop(data)
            return
        if self._awaiting_head and self._head_timer is None and self.head_timeout is not None:
            # The whole head gets head_timeout from its first byte, however
            # the bytes trickle (each would restart the idle timer).
            self._head_timer = self.callLater(self.head_timeout, self._head_too_slow)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.refused is not None:
            return
        if not line.endswith(b"\r"):
            self.refuse(BARE_LF)
            return
        line = line[:-1]
        if self._in_head:
            self._head_size += len(line)
            if self._head_size > self.totalHeadersSize:
                self.refuse(HEADERS_TOO_LARGE)
                return
            if line[:1] in (b" ", b"\t"):
                self.refuse(OBS_FOLD)
                return
            super().lineReceived(line)
            return
        requests = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > requests and self.refused is None:
            # Twisted took it as a request line: method SP target SP version.
            method, target, version = line.split(b" ")
            # Twisted gives the request these only once the body is in; the
            # head checks need them before.
            request = self.requests[-1]
            request.method, request.uri, request.clientproto = method, target, version
            request.path = target.split(b"?", 1)[0]
            self._in_head = True
            self._head_version = version
            self._head_size = len(line)
            refusal = check_request_target(target)
            if refusal is not None:
                self.refuse(refusal)
                return
            if self.whole_heads:
                self._take_whole_head(request)

    def _take_whole_head(self, request: Any) -> None:
        """Read the header section that follows the request line just
        parsed in one go, when it is all here and clean (:func:`split_head`);
        otherwise leave it to the line-by-line parser.

        Each header line is judged as :meth:`headerReceived` would judge it
        (the same refusals); only the framing headers go through Twisted's
        own handling, which picks the body decoder.  The blank line then
        ends the head the usual way, and the bytes after it (the body, the
        next request) go back to the line receiver's buffer.
        """
        rest = self.clearLineBuffer()
        split = split_head(
            rest,
            self.maxHeaders - self._header_count,
            self.totalHeadersSize - self._head_size,
        )
        if split is None:
            # Still being received (busy), so only buffered: parsed next,
            # line by line.
            LineReceiver.dataReceived(self, rest)
            return
        fields, end = split
        # Bytes of the body already here: when they are the whole body, it
        # needs no deadline of its own (see allHeadersReceived).
        self._body_in_hand = len(rest) - end
        self._header_count += len(fields)
        self._head_size += end - 2 * (len(fields) + 1)
        headers = request.requestHeaders
        for name, value in fields:
            if name.lower() in _FRAMING_NAMES:
                if not self.headerReceived(name + b":" + value):
                    return
            else:
                headers.addRawHeader(name, value)
        # The blank line (its CR still on, as the line receiver gives it):
        # ends the head the usual way.
        self.lineReceived(b"\r")
        if rest[end:]:
            LineReceiver.dataReceived(self, rest[end:])

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(HEADERS_TOO_LARGE if self._in_head else REQUEST_LINE_TOO_LONG)

    def headerReceived(self, line: bytes) -> bool:
        if self.refused is not None:
            return False
        self._header_count += 1
        if self._header_count > self.maxHeaders:
            self.refuse(HEADERS_TOO_LARGE)
            return False
        name, sep, value = line.partition(b":")
        if sep:
            value = value.strip(b" \t")
            refusal = check_field_value(value)
            if refusal is not None:
                self.refuse(refusal)
                return False
            if name.lower() == b"transfer-encoding":
                # Kept from Twisted (which takes "identity" as no coding at
                # all) and judged with every other such line at the end.
                self._codings.extend(split_codings(value))
                return True
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        if self.refused is not None:
            return
        self._awaiting_head = False
        self._cancel(self._head_timer)
        self._head_timer = None
        request = self.requests[-1]
        refusal = check_head(
            self._head_version, request.requestHeaders, self._codings, self.max_request_body
        )
        if refusal is not None:
            self.refuse(refusal)
            return
        has_body = bool(self.length or self._codings)
        refusal = self._check_head(request)
        if refusal is not None:
            if has_body:
                # Before the body: a refused client does not get to upload
                # one (nor a 100 Continue inviting it to).
                self.refuse(refusal)
                return
            # Nothing more to read: answered in turn, the connection kept.
            request.head_refusal = refusal
        if self._codings and not self.use_chunked_body():
            return
        in_hand = self._body_in_hand
        self._body_in_hand = 0
        if (
            has_body
            and self.body_timeout is not None
            and not (self.length is not None and 0 < self.length <= in_hand)
        ):
            # The body's own clock replaces the idle timer until it is in
            # (not needed when the whole body came in the head's read).
            self._idle_timeout = self.setTimeout(None)
            self._body_last = self._now()
            self._body_timer = self.callLater(self.body_timeout, self._body_check)
        super().allHeadersReceived()

    def _check_head(self, request: Any) -> Optional[Refusal]:
        """The first refusal of the site's head checks, if any."""
        for check in self.head_checks:
            try:
                refusal = check.check_head(request)
            except Exception:
                self.log.failure("a head check failed; refusing the request")
                return HEAD_CHECK_FAILED
            if refusal is not None:
                return refusal
        return None

    def rawDataReceived(self, data: bytes) -> None:
        if self.refused is not None:
            self._drop(data)
            return
        if self._body_timer is not None:
            self._body_last = self._now()
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if self.refused is not None:
            return
        refusal = check_trailers(self.chunked_trailers())
        if refusal is not None:
            self.refuse(refusal)
            return
        if self._body_timer is not None:
            self._cancel(self._body_timer)
            self._body_timer = None
            # Back to the idle timer, for Twisted to suspend while answering.
            self.setTimeout(self._idle_timeout)
        self._new_head()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        self._awaiting_head = True

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self.refuse(HEAD_TIMEOUT)

    def _body_check(self) -> None:
        """Fires at most once a body_timeout; cheaper than a reset per read."""
        self._body_timer = None
        assert self.body_timeout is not None
        quiet = self._now() - self._body_last
        if quiet < self.body_timeout:
            self._body_timer = self.callLater(self.body_timeout - quiet, self._body_check)
            return
        self.refuse(BODY_TIMEOUT)

    @staticmethod
    def _cancel(call: Optional[IDelayedCall]) -> None:
        if call is not None and call.active():
            call.cancel()

    def malformed_request(self) -> None:
        # Twisted's own refusals: the same answer shape as ours.
        self.refuse(MALFORMED)

    # ------------------------------------------------------------ refusing

    def refuse(self, refusal: Refusal, quiet: bool = False) -> None:
        """Answer ``refusal`` now, then drop the connection (``quiet``: no
        log line; the caller logs, as for a flood of connections).

        Nothing more is parsed on this connection.  The answer is sent, the
        write side closed, and what the client still sends is read and
        dropped for up to :attr:`linger_seconds` (or :attr:`linger_bytes`)
        so it can read the answer before the connection goes.
        """
        if self.refused is not None:
            return
        self.refused = refusal
        self._stop_timers()
        if self.settings.count_refusal is not None:
            self.settings.count_refusal(refusal.code)
        transport = client_transport(self)
        if transport is None or transport.disconnecting:
            return
        if not quiet:
            self.log.info(
                "refused a request from {peer}: {status} {code}",
                peer=getattr(transport.getPeer(), "host", "unix"),
                status=refusal.status,
                code=refusal.code,
            )
        self.setTimeout(None)
        transport.write(answer(refusal, self._now(), self._cors_headers()))
        # HTTPChannel registered itself as the transport's producer and may
        # have paused it (its _networkProducer is the transport when that is
        # an IPushProducer, else a no-op).
        network = IPushProducer(transport, None)
        if network is not None:
            transport.unregisterProducer()
        # Only a real socket half-closes; a TLS wrapper would pass the call
        # to the TCP transport under it, skipping the TLS close.
        if not hasattr(type(transport), "loseWriteConnection"):
            transport.loseConnection()
            return
        if network is not None:
            network.resumeProducing()
        transport.loseWriteConnection()
        self._linger_call = self.callLater(self.linger_seconds, self._linger_over)

    def _cors_headers(self) -> list[tuple[bytes, bytes]]:
        """The CORS headers of a refusal of the request in hand, when it is
        a cross-origin one (:mod:`twisted_forward.cors`).  The site's CORS
        settings are read now, not kept: a reload replaces them for the
        connections already open too."""
        cors = self.site.cors if self.site is not None else None
        if cors is None or not self.requests or self._awaiting_head:
            return []
        from .admin.resource import is_admin_path  # the admin imports the site's modules

        request = self.requests[-1]
        if is_admin_path(request.uri.split(b"?", 1)[0]):
            return []
        headers = Headers()
        cors.apply(request.method, request.requestHeaders, headers)
        return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]

    def _drop(self, data: bytes) -> None:
        self._lingered += len(data)
        if self._lingered > self.linger_bytes:
            self._linger_over()

    def _linger_over(self) -> None:
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self._linger_call = None
        transport = client_transport(self)
        if transport is not None:
            transport.abortConnection()

    def _now(self) -> float:
        return self.settings.seconds()

    def _stop_timers(self) -> None:
        self._cancel(self._head_timer)
        self._cancel(self._body_timer)
        self._head_timer = self._body_timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self._linger_call = None
        self._stop_timers()
        if self._counted and self.limits is not None:
            self._counted = False
            self.limits.release(self._counted_peer)
        super().connectionLost(reason)
