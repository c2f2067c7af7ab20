"""
Every private Twisted name the proxy uses, in one place.

Each is a debt: it may change in any Twisted release.  tests/test_compat.py
is the canary that fails first, with a message naming the use, when one
does.  Checked against the source of Twisted 26.4.0 (the lowest release
pyproject.toml allows) and 26.10.0 (the newest at the time of writing); CI
runs the suite against both.

What public APIs replaced (no longer here): treq's ``_Response``,
``HTTPClient._agent`` and ``HTTPClient._cookiejar`` (the upstream client is a
plain ``IAgent`` now, see :mod:`.upstream`), and ``HTTPChannel._networkProducer``
(the transport's own ``IPushProducer``/``IConsumer`` methods, see
:mod:`.framing`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from twisted.internet import tcp
from twisted.internet.defer import Deferred

# The HTTP/1.1 client protocol itself: public in name, but defined (and only
# documented) in the private module twisted.web._newclient; subclassed for
# its public methods (request, dataReceived, connectionLost).
from twisted.web._newclient import HTTP11ClientProtocol, HTTPClientParser, Response

# The factory HTTPConnectionPool builds for each new connection; subclassed to
# hand the pool our own client protocol (twisted_forward.upstream_http).  No
# public hook builds the pool's protocols.
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

if TYPE_CHECKING:
    # Only a type: the interface platformTrust()/trustRootFromCertificates()
    # return, which twisted.internet.ssl does not re-export.
    from twisted.internet._sslverify import IOpenSSLTrustRoot as IOpenSSLTrustRoot

__all__ = [
    "CHANNEL_SLOTS",
    "CLIENT_FACTORY_SLOTS",
    "CLIENT_PROTOCOL_SLOTS",
    "REQUEST_SLOTS",
    "ChannelHooks",
    "HTTP11ClientFactory",
    "HTTP11ClientProtocol",
    "IOpenSSLTrustRoot",
    "clear_exit_signal",
    "clear_headers",
    "fill_slot_defaults",
    "LATE_ATTRIBUTES",
    "limit_accepts_per_read",
    "quiet_connected",
    "prime_instance_layouts",
    "send_now",
    "set_header_values",
    "set_pool_factory",
    "slot_defaults",
    "twistd_log_file",
]

#: ``_HTTP11ClientFactory(quiescentCallback, metadata)``: builds
#: ``HTTP11ClientProtocol(quiescentCallback)``; the pool passes a callback
#: that puts a finished connection back in the pool.
HTTP11ClientFactory = _HTTP11ClientFactory


def set_pool_factory(
    pool: HTTPConnectionPool, factory: Callable[[Callable[[Any], None], str], Any]
) -> None:
    """Make ``pool`` build its connections' protocol factories with ``factory``.

    ``HTTPConnectionPool._newConnection`` calls
    ``self._factory(quiescentCallback, repr(endpoint))`` for each new
    connection (Twisted 26.4 to 26.10).
    """
    pool._factory = factory  # type: ignore[assignment]  # declared as the class; ours has its call signature


class ChannelHooks(HTTPChannel):
    """``HTTPChannel`` with its private hooks given public names.

    :class:`twisted_forward.framing.ForwardChannel` subclasses this, so the
    parser's private names appear nowhere else.  Twisted 26.4 to 26.10.
    """

    def malformed_request(self) -> None:
        """Called when Twisted's parser finds the request malformed; answers
        400 and drops the connection unless a subclass does better."""
        HTTPChannel._respondToBadRequestAndDisconnect(self)

    # Twisted calls this (private) method for every request it cannot parse:
    # routed to the public name above, so our refusals answer in one shape.
    def _respondToBadRequestAndDisconnect(self) -> None:
        self.malformed_request()

    def chunked_trailers(self) -> Sequence[bytes]:
        """The raw trailer lines of the chunked request body just read (call
        from ``allContentReceived``, before ``HTTPChannel``'s own runs).

        Twisted keeps them, unparsed, in ``_ChunkedTransferDecoder._trailerHeaders``
        and exposes them nowhere public; empty for a body that is not chunked.
        """
        decoder = getattr(self, "_transferDecoder", None)
        return tuple(getattr(decoder, "_trailerHeaders", ()))

    def use_chunked_body(self) -> bool:
        """Make the parser read this request's body as chunked, whatever its
        headers said; False if the parser refused (and dropped the connection).

        Feeds the parser a synthetic ``Transfer-Encoding: chunked`` header
        line, which makes ``_maybeChooseTransferDecoder`` install its chunked
        decoder (and adds the header to the request's headers).  Relies on
        that internal behaviour, not on a private name.
        """
        return bool(HTTPChannel.headerReceived(self, b"Transfer-Encoding: chunked"))


def clear_exit_signal(reactor: object) -> None:
    """Forget the signal that stopped ``reactor``, so twistd exits with 0.

    The reactor records SIGTERM/SIGINT in its private ``_exitSignal`` (the
    ``_ISupportsExitSignalCapturing`` interface) and twistd and twist re-raise
    it at exit.  Twisted 26.4 to 26.10.
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None  # type: ignore[attr-defined]  # private, see docstring


def clear_headers(headers: Any) -> None:
    """Remove every field of a ``twisted.web.http_headers.Headers`` and free
    the table that held them.

    Removing each name through the public API frees the names, values and
    lists but leaves the dict's table as large as it grew (a dict never
    shrinks).  ``Headers`` keeps its fields in the private dict
    ``_rawHeaders`` (Twisted 26.4 to 26.10); ``clear()`` frees its table
    too.  Without that dict, the public way.
    """
    raw = getattr(headers, "_rawHeaders", None)
    if isinstance(raw, dict):
        raw.clear()
        return
    for name in [name for name, _ in headers.getAllRawHeaders()]:
        headers.removeHeader(name)


#: Header names as ``Headers`` keeps them (its canonical capitalisation),
#: by the name :func:`set_header_values` was given; learned once per name.
_STORED_NAMES: dict[bytes, bytes] = {}
#: Names remembered at most (callers pass the proxy's own few names).
_STORED_NAMES_MAX = 256


def _stored_name(name: bytes) -> bytes:
    """The key under which ``Headers.setRawHeaders`` files ``name``
    (raises as it does for a name that is not a token)."""
    probe = Headers()
    probe.setRawHeaders(name, [b""])
    stored = next(iter(probe._rawHeaders))
    if len(_STORED_NAMES) >= _STORED_NAMES_MAX:
        _STORED_NAMES.clear()
    _STORED_NAMES[name] = stored
    return stored


def set_header_values(headers: Headers, pairs: Iterable[tuple[bytes, bytes]]) -> None:
    """``headers.setRawHeaders(name, [value])`` for each ``(name, value)``,
    for values known to hold no line break (``\\r``, ``\\n``: what
    ``setRawHeaders`` would replace by a space), such as the policies'
    ``x-ratelimit-*`` numbers.

    ``setRawHeaders`` canonicalises the name and sanitises the value on
    every call (three Python calls a header: about 5,000 machine
    instructions, 30,000 for the six ``x-ratelimit-*`` headers of every
    answer with policies on).  ``Headers`` keeps its fields in the private
    dict ``_rawHeaders``, keyed by the canonical name, each value a list
    (Twisted 26.4 to 26.10); the value goes straight in, under the key
    ``setRawHeaders`` uses (learned once per name, from ``setRawHeaders``
    itself), so the fields, their order and the bytes written are the same.
    Without that dict, the public way.
    """
    raw = getattr(headers, "_rawHeaders", None)
    if type(raw) is not dict:
        for name, value in pairs:
            headers.setRawHeaders(name, [value])
        return
    stored_names = _STORED_NAMES
    for name, value in pairs:
        stored = stored_names.get(name)
        if stored is None:
            stored = _stored_name(name)
        raw[stored] = [value]


def limit_accepts_per_read(port: tcp.Port, batch: int) -> None:
    """Make a TCP/UNIX listening ``port`` accept at most ``batch`` connections
    each time its socket is readable.

    ``twisted.internet.tcp.Port.doRead`` accepts up to ``numberAccepts``
    connections per call and raises that number when it takes them all; no
    public setting caps it, so it is reset before every call (the bound
    ``doRead`` replaced on this one instance).  Twisted 26.4 to 26.10.
    """
    accept = port.doRead

    def doRead() -> Any:
        port.numberAccepts = min(port.numberAccepts, batch)
        return accept()

    port.doRead = doRead  # type: ignore[method-assign]  # on this one instance, see docstring


def quiet_connected(pool: Any) -> Any:
    """``pool`` (a txredisapi lazy pool), its "all connected" Deferred made
    quiet.

    Not Twisted's, but fenced here the same way: txredisapi's
    ``ConnectionHandler`` keeps the factory's Deferred, fired once every
    connection of the pool is made, in ``_connected``, and a lazy pool
    hands nobody else that Deferred.  A connection lost during its AUTH
    (the pool closed at a reload or a stop while it connects) errbacks it;
    unhandled, it is logged as "Unhandled error in Deferred" when collected
    (txredisapi has already logged the cause).  Read in txredisapi 1.6.0;
    a pool without it is returned as it is.
    """
    connected = getattr(pool, "_connected", None)
    if isinstance(connected, Deferred):
        connected.addErrback(lambda _: None)
    return pool


def twistd_log_file(handler: Any) -> Any:
    """The ``twisted.python.logfile.LogFile`` twistd's SIGUSR1 handler
    rotates, or None.

    twistd (``_twistd_unix.UnixAppLogger._getLogObserver``) installs a
    closure ``rotateLog`` over its ``logFile`` and keeps no public reference
    to the file; the closure's cell is the only way to reach it (read in
    Twisted 26.4 and 26.10).  Used only to reopen that file after an external
    rotation (logrotate); when the shape changes this returns None and
    twistd's own SIGUSR1 behaviour stays.
    """
    from twisted.python.logfile import BaseLogFile

    for cell in getattr(handler, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, BaseLogFile):
            return value
    return None


def send_now(transport: Any) -> None:
    """Send what a TCP transport holds now, not on the reactor's next turn.

    ``transport.write`` only buffers and asks the reactor to say when the
    socket is writable; the bytes leave on the next turn of the loop, after
    whatever else this turn does.  Called where an answer is complete (before
    its access line and record are made) and where a request to the upstream
    has been written, this is what the reactor would do on that turn:
    ``doWrite`` (a public method of ``IWriteDescriptor``), which sends what
    the socket takes, stops the write watch when the buffer is empty, and
    resumes a non-streaming producer.  A socket that takes nothing leaves the
    rest to the reactor as before.

    Private name: ``FileDescriptor._writeDisconnecting`` (a half-closed
    write side, where ``doWrite`` would finish the close and return a result
    only the reactor may act on).  Checked on Twisted 26.4 to 26.10.
    Transports that are not plain descriptors (TLS, unix tests'
    StringTransport) are left alone.
    """
    from twisted.internet.abstract import FileDescriptor

    if (
        not isinstance(transport, FileDescriptor)
        or not transport.connected
        or transport.disconnecting
        or getattr(transport, "_writeDisconnecting", False)
    ):
        return
    why = transport.doWrite()
    if why is not None:
        # A send error: let the reactor find it on its next turn and close
        # the connection its own way.
        transport.startWriting()


# ---------------------------------------------------------------- slots
#
# A Request and an HTTPChannel each set 30 to 50 instance attributes.
# CPython (3.11+) keeps up to 30 of a class's instance attributes in a small
# inline array; past that the instance gets a full hash table (about 1.5 KiB
# each for the channel and the request of every open stream).  The proxy's
# subclasses declare these names in ``__slots__`` instead: each then costs
# one pointer.  A slot in a subclass hides a class attribute of the same
# name in a base, so each instance starts with the base's class-level
# values (:func:`fill_slot_defaults`).  Names starting with an underscore
# are Twisted's private state (Twisted 26.4 to 26.10); a name Twisted stops
# using only costs its pointer again (tests/test_compat.py checks they are
# still the ones set).

#: What ``twisted.web.server.Request`` (and ``http.Request``) set on an
#: instance while a request is read and answered, but ``channel`` and
#: ``content`` (which ``_cleanup`` deletes, falling back to the class
#: attribute) and ``_command``-like transients.
REQUEST_SLOTS = (
    "notifications", "client", "host", "requestHeaders", "received_cookies",
    "responseHeaders", "cookies", "transport", "queued", "_parsePOSTFormSubmission",
    "_adapterCache", "args", "method", "uri", "clientproto", "path", "site",
    "prepath", "postpath", "sitepath", "code", "code_message", "producer",
    "streamingProducer", "startedWriting", "chunked", "sentLength", "finished",
)

#: What ``HTTPChannel`` (with ``LineReceiver``, ``TimeoutMixin``,
#: ``Protocol`` and ``Site.buildProtocol``) sets on an instance; not
#: ``callLater``, a method of ``TimeoutMixin`` that ``Site.buildProtocol``
#: replaces per instance.
CHANNEL_SLOTS = (
    "requests", "_handlingRequest", "_dataBuffer", "_transferDecoder",
    "_HTTPChannel__header", "_HTTPChannel__first_line", "_TimeoutMixin__timeoutCall",
    "_buffer", "_busyReceiving", "_networkProducer", "_receivedHeaderCount",
    "_receivedHeaderSize", "_requestProducer", "_requestProducerStreaming",
    "_savedTimeOut", "connected", "factory", "length", "line_mode",
    "persistent", "requestFactory", "site", "timeOut", "transport",
)


#: What ``HTTP11ClientProtocol`` (with ``Protocol.makeConnection``) sets on
#: an instance while it sends a request and reads its answer: the upstream
#: side's protocol, one per open stream.  Not ``state``, a property.
CLIENT_PROTOCOL_SLOTS = (
    "_quiescentCallback", "_abortDeferreds", "_state", "_parser", "_finishedRequest",
    "_currentRequest", "_transportProxy", "_responseDeferred", "transport", "connected",
)

#: What ``_HTTP11ClientFactory`` (with ``Factory.doStart``) sets on an
#: instance: the pool builds one per upstream connection, and it lives as
#: long as the connection.
CLIENT_FACTORY_SLOTS = ("_quiescentCallback", "_metadata", "numPorts")


def slot_defaults(base: type, names: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    """The class-level values ``base`` (and its bases) give ``names``: what
    a subclass declaring them in ``__slots__`` sets on each new instance.
    None of ``names`` may be a method of ``base``."""
    missing = object()
    found = []
    for name in names:
        value = getattr(base, name, missing)
        if value is not missing:
            found.append((name, value))
    return tuple(found)


def fill_slot_defaults(instance: object, defaults: Sequence[tuple[str, Any]]) -> None:
    """Give ``instance`` the values its bases' class attributes had."""
    for name, value in defaults:
        setattr(instance, name, value)


# ------------------------------------------------------------ layouts
#
# CPython (3.11 to 3.13 at least) keeps a plain class's instance attributes
# in a small inline array indexed by a key table shared by all instances of
# the class.  A name joins that table only while the class is young: each
# new instance shrinks the room left, so once a few dozen instances exist,
# a name set for the first time gets no slot, and every instance that sets
# it from then on is given a full hash table (400 to 800 bytes) instead.
# Twisted's upstream-side objects set some of their attributes only when
# the connection is made or the answer arrives: when the proxy's first
# upstream connections open in a burst (any busy start), the parser and the
# TCP transport of every later stream carry a hash table for the life of
# the process.  :func:`prime_instance_layouts` sets those names once on a
# throwaway instance of each class before any connection, so the table
# holds them whatever the traffic does.  Only memory depends on it: a name
# Twisted stops using costs nothing, one it adds costs what it costs today
# (tests/test_compat.py says which).

#: The Twisted classes made for each upstream request and the names set on
#: their instances over an answer's life (Twisted 26.4 to 26.10), in the
#: order they are first set; transient ones (``doRead``/``doWrite`` while
#: connecting, the close flags) included.
LATE_ATTRIBUTES: tuple[tuple[type, tuple[str, ...]], ...] = (
    (HTTPClientParser, (
        "request", "finisher", "_responseDeferred", "_everReceivedData", "connected",
        "transport", "headers", "connHeaders", "state", "_partialHeader",
        "_busyReceiving", "_buffer", "response", "bodyDecoder", "line_mode", "paused",
    )),
    (tcp.Client, (
        "connector", "addr", "_requiresResolution", "reactor", "socket", "fileno",
        "dataBuffer", "_tempDataBuffer", "_tempDataLen", "offset", "producer",
        "streamingProducer", "realAddress", "doWrite", "doRead", "protocol", "connected",
        "logstr", "disconnecting", "disconnected",
    )),
    (tcp.Connector, (
        "host", "port", "factory", "timeout", "bindAddress", "reactor", "state",
        "factoryStarted", "transport",
    )),
    (Response, (
        "version", "code", "phrase", "headers", "_transport", "_bodyBuffer", "_state",
        "request", "previousResponse", "length", "_bodyProtocol", "_bodyFinished", "_reason",
    )),
)


def prime_instance_layouts(
    layouts: Sequence[tuple[type, Sequence[str]]] = LATE_ATTRIBUTES,
) -> None:
    """Give each class's shared attribute table the names its instances will
    set (see above); call before the first upstream connection.

    Each name is set on one instance made without ``__init__`` and thrown
    away.  A name that is a data descriptor of the class (a property, a
    slot) is skipped: setting it on the probe would run code or store
    nothing in the table.
    """
    for cls, names in layouts:
        probe: object = object.__new__(cls)
        for name in names:
            if hasattr(type(getattr(cls, name, None)), "__set__"):
                continue
            object.__setattr__(probe, name, None)
        del probe
