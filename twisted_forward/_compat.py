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
