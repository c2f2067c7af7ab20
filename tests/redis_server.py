"""
A real ``redis-server`` for tests: started on a unix socket in the test's
temporary directory (or on a loopback TCP port), with persistence off, and
stopped at cleanup.

Readiness is read from the server's own log line, never slept for.  A missing
binary skips the test with a clear reason, except under CI (the ``CI``
environment variable set), where it fails: CI must really run these tests.
"""

from __future__ import annotations

import os
import shutil
import socket
from typing import Optional

from twisted.internet import defer, reactor
from twisted.trial.unittest import SkipTest, TestCase

from .processes import ChildProcess

#: The server binaries tried, in order (Valkey is a drop-in replacement).
BINARIES = ("redis-server", "valkey-server")


def server_binary() -> str:
    """The path of a Redis-compatible server, or skip (fail under CI)."""
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    reason = "redis-server is not installed (Debian: apt-get install redis-server)"
    if os.environ.get("CI"):
        raise AssertionError(reason + "; CI must run the Redis tests")
    raise SkipTest(reason)


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (redis-server
    cannot report a port 0 it chose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process owned by a test.

    :ivar url: the ``REDIS_URL`` that reaches it.
    :ivar socket_path: its unix socket (None when it listens on TCP).
    """

    def __init__(self, directory: str, tcp: bool = False, password: Optional[str] = None) -> None:
        self.binary = server_binary()
        #: ``requirepass``: clients must AUTH with it (None: no password).
        self.password = password
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.port: Optional[int] = None
        self.socket_path: Optional[str] = None
        #: A short folder of its own for the socket, outside the test's
        #: temporary directory (removed by :func:`start_redis`'s cleanup).
        self.socket_dir: Optional[str] = None
        if tcp:
            self.port = free_loopback_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
        else:
            # A unix socket path must stay under ~100 bytes; the test's
            # temporary directory can be deeper than that.
            self.socket_path = os.path.join(self.directory, "redis.sock")
            if len(self.socket_path) > 100:
                import tempfile

                self.socket_dir = tempfile.mkdtemp(prefix="tf-pol-redis-")
                self.socket_path = os.path.join(self.socket_dir, "redis.sock")
            self.url = f"unix://{self.socket_path}"
        self.process: Optional[ChildProcess] = None

    def start(self) -> "defer.Deferred[RedisServer]":
        """Start the server; fires with ``self`` once it accepts connections."""
        args = [
            self.binary,
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--logfile", "",
            "--daemonize", "no",
            "--bind", "127.0.0.1",
            "--port", str(self.port or 0),
        ]
        if self.socket_path is not None:
            args += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.process = ChildProcess(reactor, "redis-server")
        reactor.spawnProcess(self.process, self.binary, args, env={}, path=self.directory)
        ready = self.process.wait_for(r"(?i)ready to accept connections")
        return ready.addCallback(lambda _: self)

    @property
    def running(self) -> bool:
        return self.process is not None and not self.process.ended.called

    def kill(self) -> "defer.Deferred[None]":
        """SIGKILL the server (a crash, as a test's failure case); fires once
        it is gone."""
        return self._signal("KILL")

    def stop(self) -> "defer.Deferred[None]":
        """Stop the server (SIGTERM); fires once it is gone."""
        return self._signal("TERM")

    def _signal(self, name: str) -> "defer.Deferred[None]":
        process = self.process
        if process is None or process.ended.called:
            return defer.succeed(None)
        process.signal(name)
        d: defer.Deferred[None] = defer.Deferred()

        def gone(reason: BaseException) -> BaseException:
            d.callback(None)
            return reason

        process.ended.addBoth(gone)
        return d

    def restart(self) -> "defer.Deferred[RedisServer]":
        """Start again, on the same socket or port, after :meth:`kill` or
        :meth:`stop`."""
        if self.socket_path is not None and os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        return self.start()


def start_redis(
    test: TestCase, tcp: bool = False, password: Optional[str] = None
) -> "defer.Deferred[RedisServer]":
    """Start a redis-server for ``test``, stopped at its cleanup."""
    server = RedisServer(test.mktemp(), tcp=tcp, password=password)
    if server.socket_dir is not None:
        # Cleanups run last first: the folder goes once the server stopped.
        test.addCleanup(shutil.rmtree, server.socket_dir, True)
    test.addCleanup(server.stop)
    return server.start()

