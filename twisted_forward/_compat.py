"""
Every private Twisted name the proxy uses, in one place.

Each is a debt: it may change in any Twisted release.  tests/test_compat.py
is the canary that fails first when one does.  Checked against Twisted
26.10's source (setup.py allows >=25.5, whose twisted.web.client and
_newclient have the same shape for these names).
"""

from __future__ import annotations

from typing import Any, Callable

# The factory HTTPConnectionPool builds for each new connection; subclassed to
# hand the pool our own client protocol (twisted_forward.upstream_http).  No
# public hook builds the pool's protocols.
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

# The HTTP/1.1 client protocol itself: public in name, but defined (and only
# documented) in the private module twisted.web._newclient; subclassed for
# its public methods (request, dataReceived, connectionLost).
from twisted.web._newclient import HTTP11ClientProtocol

__all__ = ["HTTP11ClientFactory", "HTTP11ClientProtocol", "set_pool_factory"]

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
    connection (read in Twisted 26.10).
    """
    pool._factory = factory  # type: ignore[attr-defined]


def twistd_log_file(handler: Any) -> Any:
    """The ``twisted.python.logfile.LogFile`` twistd's SIGUSR1 handler
    rotates, or None.

    twistd (``_twistd_unix.UnixAppLogger._getLogObserver``) installs a
    closure ``rotateLog`` over its ``logFile`` and keeps no public reference
    to the file; the closure's cell is the only way to reach it (read in
    Twisted 25.5 and 26.10).  Used only to reopen that file after an external
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
    only the reactor may act on).  Checked on Twisted 25.5 to 26.10.
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
