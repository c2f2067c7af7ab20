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
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from . import processes
from .harness import ProxyTestCase
from .processes import ROOT, TWIST, ChildProcess, assert_exit, child_env

#: The line a proxy logs once it listens, with its port.
STARTED = r"ForwardSite starting on (\d+)"


def runmode_env(upstream_port: int, **extra: str) -> dict[str, str]:
    """A child proxy's settings: the test's fake upstream and a known key."""
    return child_env(**{
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}",
        "OPENAI_API_KEY": "sk-test-runmode",
        **extra,
    })


@defer.inlineCallbacks
def listening_port(process: ChildProcess) -> Any:
    """The port from the child's "ForwardSite starting on" line."""
    match = yield process.wait_for(STARTED)
    return int(match.group(1))


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    def __init__(self, path: str) -> None:
        self.path = path

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(reactor, self.path)


def spawn_twistd(test: ProxyTestCase, **env: str) -> ChildProcess:
    """``twistd -n openai-forward`` on a free loopback port, in front of the
    test's fake upstream, in a fresh working directory."""
    cwd = os.path.abspath(test.mktemp())
    os.makedirs(cwd)
    return processes.spawn_twistd(
        test,
        ["-n", "--pidfile=", "openai-forward", "--port", "tcp:0:interface=127.0.0.1"],
        runmode_env(test.upstream_port, **env),
        cwd,
    )


class RunModeTests(ProxyTestCase):
    timeout = 60

    def workdir(self) -> str:
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        return cwd

    @defer.inlineCallbacks
    def check_forwarding(self, port: int):
        response = yield self.client.get(f"http://127.0.0.1:{port}/v1/models")
        body = json.loads((yield response.content()))
        self.assertEqual(body["data"][0]["id"], "gpt-4o-mini")
        self.assertEqual(self.fake.seen[-1].header(b"authorization"), b"Bearer sk-test-runmode")

    @defer.inlineCallbacks
    def stop(self, process: ChildProcess) -> Any:
        """SIGTERM the child; it must exit 0 by itself (an orderly stop,
        not a death by the signal)."""
        yield self.pool.closeCachedConnections()
        process.signal("TERM")
        yield process.exited()
        assert_exit(self, process, 0)

    @defer.inlineCallbacks
    def test_twistd_foreground(self):
        """``twistd -n openai-forward`` forwards with the configured key,
        warns that anyone who can reach it may use it (no forward key), and
        exits 0 on SIGTERM."""
        process = spawn_twistd(self)
        port = yield listening_port(process)
        yield self.check_forwarding(port)
        yield self.stop(process)
        self.assertIn("anyone who can reach", process.output)

    @defer.inlineCallbacks
    def test_twist_json_log(self):
        """``twist --log-format json``: one JSON event a line, the access
        line among them with its fields, and no key anywhere."""
        process = processes.spawn(
            self,
            [*TWIST, "--log-format", "json", "openai-forward",
             "--port", "tcp:0:interface=127.0.0.1"],
            runmode_env(self.upstream_port),
            self.workdir(),
        )
        # The JSON log has no "starting on" text line: read the port event.
        event = yield process.wait_for_event(
            lambda e: "ForwardSite starting on" in e.get("log_text", "")
        )
        port = int(re.search(STARTED, event["log_text"]).group(1))
        yield self.check_forwarding(port)
        yield self.stop(process)
        events = [json.loads(line.strip("\x1e")) for line in process.output.splitlines() if line]
        [access] = [e for e in events if e.get("log_namespace") == "twisted_forward.access"]
        self.assertEqual((access["method"], access["status"], access["key"]), ("GET", 200, "default"))
        self.assertNotIn("sk-test-runmode", process.output)

    @defer.inlineCallbacks
    def test_daemon_pidfile(self):
        """twistd daemonises, writes its pidfile, serves, and on SIGTERM
        exits and removes the pidfile."""
        cwd = self.workdir()
        # A unix socket path is capped at 108 bytes: keep it short, wherever
        # the checkout (and so the trial temp folder) lives.
        short = tempfile.mkdtemp(prefix="tf-")
        self.addCleanup(shutil.rmtree, short, True)
        sock = os.path.join(short, "proxy.sock")
        pidfile = os.path.join(cwd, "proxy.pid")
        logfile = os.path.join(cwd, "proxy.log")
        launcher = processes.spawn_twistd(
            self,
            [f"--pidfile={pidfile}", f"--logfile={logfile}",
             "openai-forward", "--port", f"unix:{sock}"],
            runmode_env(self.upstream_port),
            cwd,
        )
        # The launching process exits once the daemon reported a good start,
        # and the daemon binds its socket before that.
        yield launcher.exited()
        assert_exit(self, launcher, 0)
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
        process = processes.spawn_twistd(
            self,
            [*cmd[1:-1], "tcp:0:interface=127.0.0.1"],
            runmode_env(self.upstream_port),
            self.workdir(),
        )
        port = yield listening_port(process)
        yield self.check_forwarding(port)
        yield self.stop(process)

    @defer.inlineCallbacks
    def test_bad_setting_one_line(self):
        """A setting the proxy cannot use stops start-up with exit status 1
        and exactly one line on standard error naming the setting, its
        option and the value, with no traceback: what an operator reads."""
        process = processes.spawn_twistd(
            self,
            ["-n", "--pidfile=", "openai-forward", "--port", "0"],
            runmode_env(self.upstream_port, READ_TIMEOUT="soon"),
            self.workdir(),
        )
        yield process.exited()
        assert_exit(self, process, 1)
        self.assertEqual(
            process.errors.strip(),
            "openai-forward: READ_TIMEOUT (--read-timeout): 'soon' is not a number of seconds",
        )
        self.assertNotIn("Traceback", process.output)

    @defer.inlineCallbacks
    def test_dotenv_in_working_directory(self):
        """A ``.env`` file in the working directory is read at start-up
        (ROUTE_PREFIX from it moves the routes), as the README promises for
        a plain ``twistd`` run."""
        cwd = self.workdir()
        with open(os.path.join(cwd, ".env"), "w") as f:
            f.write("ROUTE_PREFIX=/from-dotenv\n")
        process = processes.spawn_twistd(
            self,
            ["-n", "--pidfile=", "openai-forward", "--port", "tcp:0:interface=127.0.0.1"],
            runmode_env(self.upstream_port),
            cwd,
        )
        port = yield listening_port(process)
        response = yield self.client.get(f"http://127.0.0.1:{port}/from-dotenv/v1/models")
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertEqual(self.fake.seen[-1].uri, b"/v1/models")
        yield self.stop(process)
