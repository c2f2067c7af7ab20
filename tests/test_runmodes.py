"""
The run modes, as a person runs them: ``twistd -n``, ``twistd`` as a daemon
with a pidfile, and ``twist`` — real subprocesses in front of the fake
upstream, synchronised on their output and their sockets, never on sleeps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from .harness import ProxyTestCase
from .processes import ROOT, TWISTD

TWISTD_ARGS = TWISTD[1:]  # spawn() puts the interpreter in front
_STARTED = re.compile(rb"ForwardSite starting on (\d+)")


class Process(ProcessProtocol):
    """A child process whose output is watched for the listening port."""

    def __init__(self) -> None:
        self.output = b""
        self.errors = b""
        self.listening: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = _STARTED.search(self.output)
        if match and not self.listening.called:
            self.listening.callback(int(match.group(1)))

    def errReceived(self, data: bytes) -> None:
        self.errors += data

    def processEnded(self, reason) -> None:
        if not self.listening.called:
            self.listening.errback(reason)
        self.ended.callback(reason.value.exitCode)


def child_env(upstream_port: int, **extra: str) -> dict:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": ROOT,
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}",
        "OPENAI_API_KEY": "sk-test-runmode",
        "LOG_CHAT": "false",
    }
    env.update(extra)
    return env


def _json_port(process: Process) -> defer.Deferred:
    """The port from a JSON log's "starting on" event."""
    d: defer.Deferred = defer.Deferred()
    original = process.outReceived

    def out(data: bytes) -> None:
        original(data)
        complete = process.output.rsplit(b"\n", 1)[0]
        for line in complete.split(b"\n"):
            if b"ForwardSite starting on" in line and not d.called:
                event = json.loads(line.strip(b"\x1e"))
                d.callback(int(_STARTED.search(event["log_text"].encode()).group(1)))

    process.outReceived = out
    return d


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    def __init__(self, path: str) -> None:
        self.path = path

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(reactor, self.path)


def spawn(test: ProxyTestCase, args: list[str], env: dict, cwd: str) -> Process:
    """Run ``python ARGS`` as a child of the test; killed at cleanup if alive."""
    process = Process()
    transport = reactor.spawnProcess(
        process, sys.executable, [sys.executable, *args], env=env, path=cwd
    )

    def stop_if_running():
        if not process.ended.called:
            transport.signalProcess("KILL")
            return process.ended

    test.addCleanup(stop_if_running)
    return process


def spawn_twistd(test: ProxyTestCase, **env: str) -> Process:
    """``twistd -n openai-forward`` on a free loopback port, in front of the
    test's fake upstream, in a fresh working directory."""
    cwd = os.path.abspath(test.mktemp())
    os.makedirs(cwd)
    return spawn(
        test,
        [*TWISTD_ARGS, "-n", "--pidfile=", "openai-forward", "--port", "tcp:0:interface=127.0.0.1"],
        child_env(test.upstream_port, **env),
        cwd,
    )


class RunModeTests(ProxyTestCase):
    timeout = 60

    def spawn(self, args: list[str], env: dict, cwd: str) -> Process:
        return spawn(self, args, env, cwd)

    @defer.inlineCallbacks
    def check_forwarding(self, port: int):
        response = yield self.client.get(f"http://127.0.0.1:{port}/v1/models")
        body = json.loads((yield response.content()))
        self.assertEqual(body["data"][0]["id"], "gpt-4o-mini")
        self.assertEqual(self.fake.seen[-1].header(b"authorization"), b"Bearer sk-test-runmode")

    @defer.inlineCallbacks
    def test_twistd_foreground(self):
        """Twistd foreground."""
        process = spawn_twistd(self)
        port = yield process.listening
        yield self.check_forwarding(port)
        yield self.pool.closeCachedConnections()
        os.kill(process.transport.pid, signal.SIGTERM)
        code = yield process.ended
        self.assertEqual(code, 0)
        self.assertIn(b"anyone who can reach", process.output)

    @defer.inlineCallbacks
    def test_twist_json_log(self):
        """``twist --log-format json``: one JSON event a line, the access
        line among them with its fields, and no key anywhere."""
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        process = self.spawn(
            ["-m", "twisted", "--log-format", "json", "openai-forward",
             "--port", "tcp:0:interface=127.0.0.1"],
            child_env(self.upstream_port),
            cwd,
        )
        # The JSON log has no "starting on" text line: read the port event.
        port = yield _json_port(process)
        yield self.check_forwarding(port)
        yield self.pool.closeCachedConnections()
        os.kill(process.transport.pid, signal.SIGTERM)
        code = yield process.ended
        self.assertEqual(code, 0)
        events = [
            json.loads(line.strip("\x1e")) for line in process.output.decode().splitlines() if line
        ]
        [access] = [e for e in events if e.get("log_namespace") == "twisted_forward.access"]
        self.assertEqual((access["method"], access["status"], access["key"]), ("GET", 200, "default"))
        self.assertNotIn(b"sk-test-runmode", process.output)

    @defer.inlineCallbacks
    def test_daemon_pidfile(self):
        """twistd daemonises, writes its pidfile, serves, and on SIGTERM
        exits and removes the pidfile."""
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        # A unix socket path is capped at 108 bytes: keep it short, wherever
        # the checkout (and so the trial temp folder) lives.
        short = tempfile.mkdtemp(prefix="tf-")
        self.addCleanup(shutil.rmtree, short, True)
        sock = os.path.join(short, "proxy.sock")
        pidfile = os.path.join(cwd, "proxy.pid")
        logfile = os.path.join(cwd, "proxy.log")
        launcher = self.spawn(
            [*TWISTD_ARGS, f"--pidfile={pidfile}", f"--logfile={logfile}",
             "openai-forward", "--port", f"unix:{sock}"],
            child_env(self.upstream_port),
            cwd,
        )
        launcher.listening.addErrback(lambda _: None)  # it logs to the file
        # The launching process exits once the daemon reported a good start,
        # and the daemon binds its socket before that.
        code = yield launcher.ended
        self.assertEqual(code, 0, launcher.errors)
        with open(pidfile) as f:
            pid = int(f.read().strip())
        pool = HTTPConnectionPool(reactor, persistent=True)
        agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(sock), pool=pool)
        response = yield agent.request(b"GET", b"http://proxy/v1/models")
        self.assertEqual(response.code, 200)
        yield readBody(response)
        yield pool.closeCachedConnections()
        # Watch the directory: the pidfile's removal is the daemon's last act.
        from twisted.internet import inotify
        from twisted.python.filepath import FilePath

        removed: defer.Deferred = defer.Deferred()

        def changed(_ignored, path, mask):
            if path.asTextMode().basename() == os.path.basename(pidfile) and not removed.called:
                removed.callback(None)

        notifier = inotify.INotify()
        notifier.startReading()
        self.addCleanup(notifier.loseConnection)
        notifier.watch(FilePath(cwd), mask=inotify.IN_DELETE, callbacks=[changed])
        os.kill(pid, signal.SIGTERM)
        yield removed
        self.assertFalse(os.path.exists(pidfile))
        with open(logfile) as f:
            log = f.read()
        self.assertIn("ForwardSite starting on", log)
        self.assertIn("Main loop terminated", log)

    @defer.inlineCallbacks
    def test_dockerfile_cmd(self):
        """The image's command, run here (Docker itself cannot run in CI):
        the same arguments, the port swapped for a free loopback one."""
        with open(os.path.join(ROOT, "Dockerfile")) as f:
            [cmd_line] = [line for line in f if line.startswith("CMD ")]
        cmd = json.loads(cmd_line[4:])
        self.assertEqual(cmd, ["twistd", "-n", "--pidfile=", "openai-forward", "--port", "8000"])
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        process = self.spawn(
            [*TWISTD_ARGS, *cmd[1:-1], "tcp:0:interface=127.0.0.1"],
            child_env(self.upstream_port),
            cwd,
        )
        port = yield process.listening
        yield self.check_forwarding(port)
        yield self.pool.closeCachedConnections()
        os.kill(process.transport.pid, signal.SIGTERM)
        self.assertEqual((yield process.ended), 0)

    @defer.inlineCallbacks
    def test_bad_setting_one_line(self):
        """Bad setting one line."""
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        process = self.spawn(
            [*TWISTD_ARGS, "-n", "--pidfile=", "openai-forward", "--port", "0"],
            child_env(self.upstream_port, READ_TIMEOUT="soon"),
            cwd,
        )
        process.listening.addErrback(lambda _: None)
        code = yield process.ended
        self.assertEqual(code, 1)
        self.assertEqual(
            process.errors.decode().strip(),
            "openai-forward: READ_TIMEOUT (--read-timeout): 'soon' is not a number of seconds",
        )
        self.assertNotIn(b"Traceback", process.output + process.errors)

    @defer.inlineCallbacks
    def test_dotenv_in_working_directory(self):
        """Dotenv in working directory."""
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        with open(os.path.join(cwd, ".env"), "w") as f:
            f.write("ROUTE_PREFIX=/from-dotenv\n")
        process = self.spawn(
            [*TWISTD_ARGS, "-n", "--pidfile=", "openai-forward",
             "--port", "tcp:0:interface=127.0.0.1"],
            child_env(self.upstream_port),
            cwd,
        )
        port = yield process.listening
        response = yield self.client.get(f"http://127.0.0.1:{port}/from-dotenv/v1/models")
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertEqual(self.fake.seen[-1].uri, b"/v1/models")
        yield self.pool.closeCachedConnections()
        os.kill(process.transport.pid, signal.SIGTERM)
        yield process.ended
