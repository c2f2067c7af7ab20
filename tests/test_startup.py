"""
Start-up failures, as an operator meets them: real ``twistd`` processes in
the foreground, as a daemon and with ``--workers``, each failing for one
reason (a setting, a port in use, an unreadable TLS file, an unwritable
folder) with exactly one line on standard error and a non-zero exit status.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_forward import supervisor as workers
from twisted_forward.listening import BoundEndpoint, listen_error

from .processes import TWISTD, assert_exit, child_env, run


def startup_env(**env: str) -> dict[str, str]:
    """A child's settings: an upstream nobody listens on (start-up fails
    before any request), then ``env``."""
    return child_env(**{"OPENAI_BASE_URL": "http://127.0.0.1:9", **env})


class StartupFailureTests(TestCase):
    """Every start-up failure: one line naming the setting and the fix,
    exit status 1, no traceback, in every run mode."""

    timeout = 60

    def setUp(self) -> None:
        self.cwd = os.path.abspath(self.mktemp())
        os.makedirs(self.cwd)
        # A port some other program holds.
        self.holder = socket.socket()
        self.holder.bind(("127.0.0.1", 0))
        self.holder.listen(1)
        self.addCleanup(self.holder.close)
        self.busy = f"tcp:{self.holder.getsockname()[1]}:interface=127.0.0.1"

    def modes(self) -> dict[str, list[str]]:
        """twistd's arguments before the plugin name, per run mode."""
        return {
            "foreground": ["-n", "--pidfile="],
            "daemon": [f"--pidfile={self.cwd}/p.pid", f"--logfile={self.cwd}/l.log"],
        }

    @defer.inlineCallbacks
    def fails_with(self, plugin_args: list[str], expected: str | re.Pattern, **env: str) -> Any:
        """In the foreground, as a daemon and with ``--workers 2``: exit 1
        and ``expected`` (a text or a pattern) as the one line on standard
        error."""
        runs = [(mode, [*TWISTD, *twistd_args, "openai-forward", *plugin_args])
                for mode, twistd_args in self.modes().items()]
        runs.append(("workers", [*TWISTD, "-n", "--pidfile=", "openai-forward",
                                 "--workers", "2", *plugin_args]))
        for mode, args in runs:
            process = yield run(self, args, startup_env(**env), self.cwd, name=f"twistd ({mode})")
            errors = process.errors
            assert_exit(self, process, 1)
            if isinstance(expected, str):
                self.assertEqual(errors.splitlines(), [expected], mode)
            else:
                self.assertEqual(len(errors.splitlines()), 1, errors)
                self.assertRegex(errors, expected, mode)
            self.assertNotIn("Traceback", process.output, mode)
            self.assertFalse(os.path.exists(f"{self.cwd}/p.pid"), mode)

    def test_port_in_use(self):
        """A port another process holds."""
        port = self.holder.getsockname()[1]
        return self.fails_with(
            ["--port", self.busy],
            f"openai-forward: --port: cannot listen on 127.0.0.1:{port}: another process "
            "holds it: stop that process or choose another port",
        )

    def test_unix_socket_folder_missing(self):
        """A unix socket in a folder that does not exist."""
        path = os.path.join(self.cwd, "no-such-dir", "proxy.sock")
        return self.fails_with(
            ["--port", f"unix:{path}"],
            f"openai-forward: --port: cannot listen on unix:{path}: the socket's folder "
            "does not exist: create it or fix the path",
        )

    def test_missing_tls_key(self):
        """A TLS port whose key file is missing (with --workers the TLS
        refusal could come first: the file is read before)."""
        missing = os.path.join(self.cwd, "missing.pem")
        return self.fails_with(
            ["--port", f"ssl:0:interface=127.0.0.1:privateKey={missing}"],
            f"openai-forward: --port: cannot read {missing} (No such file or directory): "
            "fix privateKey=/certKey= or the file's permissions",
        )

    def test_tls_file_not_pem(self):
        """A TLS key file that is not PEM."""
        junk = os.path.join(self.cwd, "junk.pem")
        with open(junk, "w") as f:
            f.write("not a key\n")
        # OpenSSL's own words vary by version: the shape is checked.
        return self.fails_with(
            ["--port", f"ssl:0:interface=127.0.0.1:privateKey={junk}"],
            re.compile(
                r"^openai-forward: --port: the TLS key or certificate is unusable \(.+\): "
                r"privateKey= and certKey= must name PEM files holding a key and its "
                r"certificate\n$"
            ),
        )

    def test_unwritable_log_dir(self):
        """A LOG_DIR that cannot be created (a file is in the way)."""
        blocker = os.path.join(self.cwd, "file")
        with open(blocker, "w"):
            pass
        log_dir = os.path.join(blocker, "Log")
        return self.fails_with(
            ["--port", "tcp:0:interface=127.0.0.1"],
            f"openai-forward: LOG_DIR (--log-dir): cannot write chat records in {log_dir!r} "
            "(Not a directory): make that folder writable by this user, choose another, "
            "or set LOG_CHAT=false",
            LOG_CHAT="true", LOG_DIR=log_dir,
        )

    def test_required_redis_unreachable(self):
        """A Redis the limits need (KEY_POLICY counted in REDIS_URL, failing
        closed) that nothing answers at: the URL without its password, and
        the ways out."""
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()  # nothing listens there now
        return self.fails_with(
            ["--port", "tcp:0:interface=127.0.0.1"],
            f"openai-forward: REDIS_URL (--redis-url): cannot reach redis://127.0.0.1:{port}/0 "
            "(Connection refused): start it, fix the URL, or set LIMITS_ON_STORE_FAILURE=open "
            "to serve while it is down",
            REDIS_URL=f"redis://:redis-start-pass-0123456789@127.0.0.1:{port}/0",
            KEY_POLICY='{"*": {"rpm": 10}}',
        )

    def test_unwritable_data_dir(self):
        """A DATA_DIR (the SQLite ledger's) that cannot be created."""
        blocker = os.path.join(self.cwd, "file")
        with open(blocker, "w"):
            pass
        data_dir = os.path.join(blocker, "data")
        return self.fails_with(
            ["--port", "tcp:0:interface=127.0.0.1"],
            f"openai-forward: DATA_DIR (--data-dir): cannot create {data_dir} (Not a directory)",
            DATA_DIR=data_dir,
        )

    def test_bad_database_url(self):
        """A DATABASE_URL that is not a PostgreSQL URL; the text never repeats it."""
        return self.fails_with(
            ["--port", "tcp:0:interface=127.0.0.1"],
            "openai-forward: DATABASE_URL (--database-url): must be a "
            "postgresql://user:password@host:port/database URL",
            DATABASE_URL="mysql://root:hunter2@db/ledger",
        )

    def test_bad_setting(self):
        """A setting with a value the proxy cannot use."""
        return self.fails_with(
            ["--port", "tcp:0:interface=127.0.0.1"],
            "openai-forward: IDLE_TIMEOUT (--idle-timeout): '-3' must be a positive "
            "number of seconds",
            IDLE_TIMEOUT="-3",
        )

    @defer.inlineCallbacks
    def test_metrics_port_in_use(self):
        """METRICS_PORT on a port in use; the proxy's own port is let go."""
        port = self.holder.getsockname()[1]
        process = yield run(
            self, [*TWISTD, "-n", "--pidfile=", "openai-forward",
                   "--port", "tcp:0:interface=127.0.0.1"],
            startup_env(METRICS_PORT=self.busy), self.cwd,
        )
        assert_exit(self, process, 1)
        self.assertEqual(
            process.errors.splitlines(),
            [f"openai-forward: METRICS_PORT (--metrics-port): cannot listen on "
             f"127.0.0.1:{port}: another process holds it: stop that process or choose "
             "another port"],
        )


class GiveUpTests(TestCase):
    """:func:`twisted_forward.exitstatus.give_up` in a real process."""

    timeout = 30

    @defer.inlineCallbacks
    def test_orderly_stop_then_status(self):
        """The reactor stops in order (shutdown triggers run) and the
        process exits with the status asked for."""
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        script = (
            "from twisted.internet import reactor\n"
            "from twisted_forward.exitstatus import give_up\n"
            "reactor.addSystemEventTrigger('before', 'shutdown', print, 'stopping')\n"
            "reactor.callWhenRunning(give_up, reactor, 3)\n"
            "reactor.run()\n"
            "print('ran to the end', flush=True)\n"
        )
        process = yield run(self, [sys.executable, "-c", script], startup_env(), cwd)
        assert_exit(self, process, 3)
        self.assertEqual(process.out.split(), [b"stopping", b"ran", b"to", b"the", b"end"])


class _Transport:
    def __init__(self) -> None:
        self.pid = 4242
        self.signals: list[str] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        pass

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _Reactor:
    """A clock that spawns fake processes and records being stopped."""

    def __init__(self) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.seconds = self.clock.seconds
        self.callLater = self.clock.callLater
        self.running = True
        self.stopped = 0

    def spawnProcess(self, protocol: Any, *args: Any, **kwargs: Any) -> None:
        protocol.makeConnection(_Transport())

    def stop(self) -> None:
        self.stopped += 1


class _Port:
    addressFamily = socket.AF_INET

    def stopReading(self) -> None:
        pass

    def fileno(self) -> int:
        return 99

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 1)


class WorkersGiveUpTests(SynchronousTestCase):
    """The supervisor gives up on workers that keep dying at start."""

    def setUp(self) -> None:
        from twisted_forward import exitstatus

        self.reactor = _Reactor()
        self.pool = workers.WorkerPool(2, "tcp:0", {}, {}, grace=1.0, reactor=self.reactor)
        self.pool._bound(_Port())
        # No real exit status from a unit test.
        self.patch(exitstatus, "set_exit_status", lambda status: None)

    def die(self, index: int) -> None:
        from twisted.internet.error import ProcessTerminated

        self.pool.workers[index].processEnded(Failure(ProcessTerminated(exitCode=1)))

    def test_gives_up_after_young_deaths_at_start(self) -> None:
        """A worker dying young GIVE_UP_AFTER times in a row, before any
        worker ever ran STABLE_AFTER seconds, stops the supervisor."""
        for _ in range(workers.GIVE_UP_AFTER - 1):
            self.die(1)
            self.reactor.clock.advance(workers.MAX_DELAY / 10)
            self.assertEqual(self.reactor.stopped, 0)
        self.die(1)
        self.assertEqual(self.reactor.stopped, 1)

    def test_keeps_restarting_once_it_ran(self) -> None:
        """Once a worker has served a while, deaths are restarted, with
        back-off, and never given up on."""
        self.reactor.clock.advance(workers.STABLE_AFTER)
        for _ in range(workers.GIVE_UP_AFTER * 2):
            self.die(1)
            self.reactor.clock.advance(workers.MAX_DELAY)
        self.assertEqual(self.reactor.stopped, 0)
        self.assertIn(1, self.pool.workers)


class ListenErrorTests(SynchronousTestCase):
    """The phrases for bind failures."""

    def test_permission(self) -> None:
        """A privileged port says how to get it."""
        from twisted.internet.error import CannotListenError

        text = listen_error(CannotListenError("", 80, PermissionError(13, "Permission denied")))
        self.assertEqual(
            text,
            "cannot listen on 0.0.0.0:80: permission denied: ports below 1024 need root "
            "or CAP_NET_BIND_SERVICE, and a unix socket needs a writable folder; choose "
            "another port or path",
        )

    def test_bound_endpoint_hands_over_once(self) -> None:
        """The bound port goes to its own factory, once."""
        from twisted.internet.protocol import Factory

        factory, port = Factory(), object()
        endpoint = BoundEndpoint(port, factory)  # type: ignore[arg-type]  # a stand-in port
        self.failureResultOf(endpoint.listen(Factory()))
        self.assertIs(self.successResultOf(endpoint.listen(factory)), port)
        self.failureResultOf(endpoint.listen(factory))
