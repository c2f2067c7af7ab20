"""
Reaching Redis (or Valkey): the ``REDIS_URL`` setting and the connection.

One URL names the server every shared feature uses: ``redis://[user:password@]
host[:port][/db]``, ``rediss://…`` (TLS, the server's certificate checked
against the system's CAs, or SSL_CERT_FILE's), or ``unix:///path/to/socket
[?db=N&password=…]``.

The client is txredisapi, Twisted's own non-blocking Redis client: a lazy
pool that reconnects by itself (backing off up to 10 s).  Every call the
proxy makes is bounded by its caller's timeout, so a dead
or stalled server never holds a request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

from ._compat import quiet_connected

_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class RedisTarget:
    """Where the Redis server is, read from a URL.

    ``str()`` leaves the password out, so a target can go in a log line.
    """

    scheme: str
    host: str = "localhost"
    port: int = 6379
    path: str = ""
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}" + (f"?db={self.db}" if self.db else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/{self.db}"


def parse_redis_url(value: str) -> RedisTarget:
    """Read a ``redis://``, ``rediss://`` or ``unix://`` URL.

    :raises ValueError: saying what is wrong, never repeating a password.
    """
    raw = value.strip()
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise ValueError("is not a redis://, rediss:// or unix:// URL") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError("is not a redis://, rediss:// or unix:// URL")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    query = parse_qs(parts.query)
    unknown = set(query) - {"db", "password"}
    if unknown:
        raise ValueError(f"unknown URL parameter(s): {', '.join(sorted(unknown))}")
    if scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// Redis URL needs a socket path")
        db = query.get("db", ["0"])[0]
        password = query.get("password", [password])[0]
        if not db.isdigit():
            raise ValueError("the Redis database (db=) must be a number")
        return RedisTarget("unix", path=parts.path, db=int(db),
                           username=username, password=password)
    if not parts.hostname:
        raise ValueError("the Redis URL has no host")
    if "password" in query:
        password = query["password"][0]
    db_text = parts.path.strip("/") or query.get("db", ["0"])[0]
    if not db_text.isdigit():
        raise ValueError("the Redis database (the URL's path) must be a number")
    return RedisTarget(scheme, parts.hostname, port or 6379, "", int(db_text),
                       username, password)


def check_redis_url(value: str) -> str:
    """REDIS_URL's parser: the URL as given, once it is known to be one."""
    parse_redis_url(value)
    return value.strip()


def connect(
    target: RedisTarget,
    timeout: float,
    poolsize: int = 2,
    ca_file: Optional[str] = None,
    binary: bool = False,
    reply_timeout: Optional[float] = None,
) -> Any:
    """A lazy txredisapi pool for ``target``: returned at once, connecting in
    the background and again after every loss.

    ``timeout`` bounds connecting and each reply (a stalled connection is
    dropped and made anew); ``reply_timeout``, when given, bounds replies
    instead (a caller that bounds its own waits sets a longer backstop).  Replies keep Redis' own types: strings stay
    strings, they are not turned into numbers.  With ``binary``, bulk
    replies stay bytes (the cache's entries are not text).
    """
    import txredisapi

    common: dict[str, Any] = dict(
        dbid=target.db or None,
        poolsize=poolsize,
        reconnect=True,
        password=target.password,
        connectTimeout=timeout,
        replyTimeout=timeout if reply_timeout is None else reply_timeout,
        convertNumbers=False,
    )
    if binary:
        common["charset"] = None
    if target.username is not None:
        common["username"] = target.username
    if target.scheme == "unix":
        return quiet_connected(txredisapi.lazyUnixConnectionPool(target.path, **common))
    tls: Any = False
    if target.tls:
        from twisted.internet.ssl import optionsForClientTLS

        from .trust import load_trust_root

        trust = load_trust_root(ca_file) if ca_file is not None else None
        tls = optionsForClientTLS(target.host, trustRoot=trust)
    return quiet_connected(txredisapi.lazyConnectionPool(
        target.host, target.port, ssl_context_factory=tls, **common
    ))


def probe(target: RedisTarget, timeout: float, ca_file: Optional[str] = None) -> None:
    """Check, blocking for at most about ``timeout`` seconds a step, that
    the server answers: AUTH (when the URL has a password), SELECT (a
    database other than 0), then PING.  For start-up only, before the
    reactor runs (a Redis the settings require must be there).

    :raises ConnectionError: saying what failed, never with the password or
        the user name in it.
    """
    import socket
    import ssl

    commands: list[list[bytes]] = []
    if target.password is not None:
        auth = [b"AUTH"]
        if target.username is not None:
            auth.append(target.username.encode("utf-8"))
        commands.append(auth + [target.password.encode("utf-8")])
    if target.db:
        commands.append([b"SELECT", b"%d" % target.db])
    commands.append([b"PING"])
    try:
        if target.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(target.path)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection((target.host, target.port), timeout=timeout)
            if target.tls:
                context = ssl.create_default_context(cafile=ca_file)
                sock = context.wrap_socket(sock, server_hostname=target.host)
        with sock:
            reader = sock.makefile("rb")
            for command in commands:
                sock.sendall(_resp(command))
                reply = reader.readline()
                if not reply:
                    raise ConnectionError("the server closed the connection")
                if reply.startswith(b"-"):
                    code = reply[1:].split(None, 1)[0].decode("ascii", "replace")
                    what = command[0].decode()
                    raise ConnectionError(f"the server refused {what} ({code})")
    except TimeoutError:
        raise ConnectionError(f"no answer within {timeout:g}s") from None
    except ssl.SSLError as e:
        raise ConnectionError(f"TLS failed ({e.reason or e})") from None
    except ConnectionError as e:
        if type(e) is ConnectionError:
            raise
        raise ConnectionError(e.strerror or type(e).__name__) from None
    except OSError as e:
        raise ConnectionError(e.strerror or type(e).__name__) from None


def _resp(command: list[bytes]) -> bytes:
    """One command in Redis' protocol (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(command)]
    for part in command:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)
