"""
Binding the listening ports while the service is built, so a port that
cannot be had stops start-up with one line on the terminal.

twistd binds ports in ``privilegedStartService``: after it has redirected
standard error into its log (a 40-line traceback in the foreground) and, as
a daemon, after it has forked (the launcher then shows the first 98
characters of the exception).  :func:`listen_now` binds in ``makeService``
instead, before either happens, and turns the failure into a
:class:`~twisted_forward.config.ConfigError` naming the setting and the
fix; :class:`BoundEndpoint` then hands the bound port to the ordinary
``StreamServerEndpointService`` when the service starts.  Privileges are
the same at both moments (twistd sheds them only after
``privilegedStartService``), and a daemon's fork keeps the socket.
"""

from __future__ import annotations

import errno
from typing import Any, Optional

from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from .config import ConfigError

_FIXES = {
    errno.EADDRINUSE: "another process holds it: stop that process or choose another port",
    errno.EACCES: (
        "permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE, "
        "and a unix socket needs a writable folder; choose another port or path"
    ),
    errno.EADDRNOTAVAIL: "no network interface has that address: fix interface=",
    errno.ENOENT: "the socket's folder does not exist: create it or fix the path",
}


def endpoint_from_string(reactor: Any, description: str, setting: str) -> IStreamServerEndpoint:
    """Parse a server endpoint string, reading the files it names (TLS keys
    and certificates) now.

    :param setting: how the user gave it (``--port``), for the message.
    :raises ConfigError: a file cannot be read or is not PEM.
    """
    try:
        return endpoints.serverFromString(reactor, description)
    except OSError as e:
        name = e.filename or "a file it names"
        raise ConfigError(
            f"{setting}: cannot read {name} ({e.strerror}): fix privateKey=/certKey= "
            "or the file's permissions"
        ) from None
    except IndexError:
        # The systemd: parser, when no socket was passed in.
        raise ConfigError(
            f"{setting}: no inherited socket at that index (systemd: needs "
            "LISTEN_FDS and LISTEN_FDNAMES; run it from a systemd socket unit)"
        ) from None
    except ValueError as e:
        raise ConfigError(f"{setting}: {_short(e)}: fix the endpoint string") from None
    except Exception as e:
        # OpenSSL's errors for a file that is not a PEM key or certificate.
        raise ConfigError(
            f"{setting}: the TLS key or certificate is unusable ({_short(e)}): "
            "privateKey= and certKey= must name PEM files holding a key and its certificate"
        ) from None


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


def listen_now(
    endpoint: IStreamServerEndpoint, factory: IProtocolFactory, setting: str, description: str = ""
) -> IListeningPort:
    """Bind ``endpoint`` now, before the reactor runs.

    Every endpoint Twisted ships binds synchronously; one that does not is
    refused rather than waited for.

    :raises ConfigError: naming ``setting``, the reason and the fix.
    """
    result: list[Any] = []
    endpoint.listen(factory).addBoth(result.append)
    if not result:
        raise ConfigError(f"{setting}: this endpoint does not bind at once; use tcp:, ssl:, unix: or systemd:")
    outcome = result[0]
    if isinstance(outcome, Failure):
        raise ConfigError(f"{setting}: {listen_error(outcome.value, description)}") from None
    port: IListeningPort = outcome
    return port


def listen_error(error: BaseException, description: str = "") -> str:
    """Why a port could not be bound and what to do, as one phrase.

    :param description: the endpoint string, named when the error does not
        say where.
    """
    where = f" on {description}" if description else ""
    if isinstance(error, CannotListenError):
        if isinstance(error.port, (str, bytes)):  # a unix socket's path
            where = error.port.decode() if isinstance(error.port, bytes) else error.port
        else:
            where = f"{error.interface or '0.0.0.0'}:{error.port}"
        cause = error.socketError
        code = getattr(cause, "errno", None)
        fix = _FIXES.get(code) if code is not None else None
        if fix is None:
            fix = f"{getattr(cause, 'strerror', None) or cause}"
        return f"cannot listen on {where}: {fix}"
    if isinstance(error, OSError):
        fix = _FIXES.get(error.errno or 0, error.strerror or str(error))
        return f"cannot listen{where}: {fix}"
    return f"cannot listen{where}: {_short(error) if isinstance(error, Exception) else error}"


@implementer(IStreamServerEndpoint)
class BoundEndpoint:
    """An endpoint whose port was bound already: ``listen`` hands it over.

    Only the factory it was bound with may listen on it, once.

    :ivar port: the bound port, for its address (``port.getHost()``).
    """

    def __init__(self, port: IListeningPort, factory: IProtocolFactory) -> None:
        self.port = port
        self._port: Optional[IListeningPort] = port
        self._factory = factory

    def listen(self, factory: IProtocolFactory) -> "defer.Deferred[IListeningPort]":
        if factory is not self._factory or self._port is None:
            return defer.fail(
                CannotListenError(None, None, OSError("this bound port is already in use"))
            )
        port, self._port = self._port, None
        return defer.succeed(port)
