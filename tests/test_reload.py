"""
SIGHUP reloads: a new configuration for new requests, open streams finish
on the one they started with, a bad configuration is refused and the old
one stays.  In process (the service's ``reload``), and with real twistd
processes sent a real SIGHUP: in the foreground under load, and with
``--workers 2`` (the supervisor relays it to every worker).
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from twisted.application.service import IServiceCollection
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.config import ConfigError
from twisted_forward.reload import ConfigSource, restart_only_changes
from twisted_forward.tap import ProxyService

from .fake_upstream import chat_chunks
from .harness import Collector, ProxyTestCase
from .processes import ChildProcess, assert_exit, child_env, spawn_twistd

OLD_FK, NEW_FK = "fk-reload-old-1234", "fk-reload-new-5678"
OLD_SK, NEW_SK = "sk-reload-old-aaaa", "sk-reload-new-bbbb"


def write_env(path: str, **values: str) -> None:
    """Write a .env file (replacing it in one rename, as editors do)."""
    with open(path + ".tmp", "w") as f:
        for name, value in values.items():
            f.write(f"{name}={value}\n")
    os.replace(path + ".tmp", path)


def chat(stream: bool = True) -> bytes:
    return json.dumps(
        {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()


@defer.inlineCallbacks
def post_as_alice(case: ProxyTestCase) -> Any:
    """A non-stream chat with alice's forward key (``OLD_FK``); fires with
    the answer's status once its body is read."""
    response = yield case.client.post(
        case.url("/v1/chat/completions"), data=chat(stream=False),
        headers={b"authorization": [b"Bearer " + OLD_FK.encode()],
                 b"content-type": [b"application/json"]},
    )
    yield response.content()
    return response.code


class InProcessReloadTests(ProxyTestCase):
    """The service's ``reload`` with the real plugin in front of the fake
    upstream."""

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.env_file = os.path.abspath(self.mktemp())
        write_env(self.env_file, OPENAI_API_KEY=OLD_SK, FORWARD_KEY=OLD_FK)
        yield self.start_proxy(["--env-file", self.env_file])
        [self.proxy_service] = [
            s for s in IServiceCollection(self.service) if isinstance(s, ProxyService)
        ]
        # The watch learns the keys the reloads bring.
        self.secrets_watch.default_keys += (NEW_SK,)
        self.secrets_watch.forward_keys += (NEW_FK,)
        self.logged: list[dict] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def get_models(self, key: str) -> defer.Deferred:
        return self.client.get(
            self.url("/v1/models"), headers={b"authorization": [b"Bearer " + key.encode()]}
        )

    @defer.inlineCallbacks
    def status(self, key: str) -> Any:
        response = yield self.get_models(key)
        yield response.content()
        return response.code

    @defer.inlineCallbacks
    def test_new_keys_for_new_requests_open_stream_finishes(self):
        """After a reload the new forward key works and the old one is
        refused; a stream open across the reload finishes whole, on the
        default key it started with."""
        yield self.start()
        self.fake.hold_at = 2
        response = yield self.client.post(
            self.url("/v1/chat/completions"), data=chat(),
            headers={b"authorization": [b"Bearer " + OLD_FK.encode()],
                     b"content-type": [b"application/json"]},
            unbuffered=True,
        )
        collector = Collector()
        response.deliverBody(collector)
        yield collector.got_data
        streamed_with = self.fake.seen[-1].header(b"authorization")
        write_env(self.env_file, OPENAI_API_KEY=NEW_SK, FORWARD_KEY=NEW_FK)
        self.assertTrue(self.proxy_service.reload())
        self.assertEqual((yield self.status(NEW_FK)), 200)
        self.assertEqual(self.fake.seen[-1].header(b"authorization"), b"Bearer " + NEW_SK.encode())
        self.assertEqual((yield self.status(OLD_FK)), 401)
        self.fake.release.callback(None)
        yield collector.done
        self.assertEqual(response.code, 200)
        self.assertIn(b"data: [DONE]", collector.body)
        self.assertEqual(streamed_with, b"Bearer " + OLD_SK.encode())

    @defer.inlineCallbacks
    def test_bad_config_refused_old_stays(self):
        """A .env that fails validation is refused with one logged line;
        the running keys go on working."""
        yield self.start()
        write_env(self.env_file, OPENAI_API_KEY=NEW_SK, FORWARD_KEY=NEW_FK, READ_TIMEOUT="soon")
        self.assertFalse(self.proxy_service.reload())
        [refusal] = [e for e in self.logged if "reload refused" in e.get("log_format", "")]
        self.assertEqual(
            refusal["why"], "READ_TIMEOUT (--read-timeout): 'soon' is not a number of seconds"
        )
        self.assertEqual((yield self.status(OLD_FK)), 200)
        self.assertEqual((yield self.status(NEW_FK)), 401)

    @defer.inlineCallbacks
    def test_shadowed_by_environment_warned(self):
        """A setting the environment gives cannot be changed by the .env
        file: the reload says so."""
        self.env_file = os.path.abspath(self.mktemp())
        write_env(self.env_file, OPENAI_API_KEY=OLD_SK, ROUTE_PREFIX="/a")
        yield self.start_proxy(["--env-file", self.env_file], IP_BLACKLIST="192.0.2.1")
        [service] = [s for s in IServiceCollection(self.service) if isinstance(s, ProxyService)]
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        write_env(self.env_file, OPENAI_API_KEY=OLD_SK, ROUTE_PREFIX="/b",
                  IP_BLACKLIST="192.0.2.2")
        self.assertTrue(service.reload())
        warned = [e["name"] for e in logged if "has no effect" in e.get("log_format", "")]
        self.assertEqual(warned, ["IP_BLACKLIST (the environment sets it)"])
        response = yield self.client.get(self.url("/b/v1/models"))
        yield response.content()
        self.assertEqual(response.code, 200)
        response = yield self.client.get(self.url("/a/v1/models"))
        yield response.content()
        self.assertEqual(response.code, 404)


class PolicyReloadTests(ProxyTestCase):
    """Policies change on reload; the counts made so far are kept."""

    @defer.inlineCallbacks
    def test_new_policy_old_counts(self):
        """rpm 3 with two requests made: a reload to rpm 2 refuses the third
        (the two are still counted); a reload to rpm 5 lets it through."""
        env_file = os.path.abspath(self.mktemp())
        write_env(env_file, OPENAI_API_KEY=OLD_SK, FORWARD_KEY=f"alice:{OLD_FK}",
                  KEY_POLICY=json.dumps({"alice": {"rpm": 3}}))
        yield self.start_proxy(["--env-file", env_file])
        [service] = [s for s in IServiceCollection(self.service) if isinstance(s, ProxyService)]

        self.assertEqual([(yield post_as_alice(self)), (yield post_as_alice(self))], [200, 200])
        write_env(env_file, OPENAI_API_KEY=OLD_SK, FORWARD_KEY=f"alice:{OLD_FK}",
                  KEY_POLICY=json.dumps({"alice": {"rpm": 2}}))
        self.assertTrue(service.reload())
        self.assertEqual((yield post_as_alice(self)), 429)
        write_env(env_file, OPENAI_API_KEY=OLD_SK, FORWARD_KEY=f"alice:{OLD_FK}",
                  KEY_POLICY=json.dumps({"alice": {"rpm": 5}}))
        self.assertTrue(service.reload())
        self.assertEqual((yield post_as_alice(self)), 200)


class FileSettingsReloadTests(ProxyTestCase):
    """What a reload rereads besides keys: the chat-record settings, and the
    files settings name."""

    @defer.inlineCallbacks
    def test_log_dir_and_policy_file_follow_the_reload(self):
        """A new LOG_DIR in the .env file takes the next chat's record (the
        old folder gets no more), and a KEY_POLICY_FILE rewritten in place
        applies its new rpm (the requests made so far still count)."""
        from twisted_forward.chat.files import read_records, record_files

        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        one, two = os.path.join(cwd, "one"), os.path.join(cwd, "two")
        policy_file = os.path.join(cwd, "policy.json")
        env_file = os.path.join(cwd, ".env")

        def configure(log_dir: str, rpm: int) -> None:
            with open(policy_file, "w") as f:
                json.dump({"alice": {"rpm": rpm}}, f)
            write_env(env_file, OPENAI_API_KEY=OLD_SK, FORWARD_KEY=f"alice:{OLD_FK}",
                      LOG_DIR=log_dir, KEY_POLICY_FILE=policy_file)

        configure(one, 5)
        yield self.start_proxy(["--env-file", env_file], LOG_CHAT="true", LEDGER="false")
        [service] = [s for s in IServiceCollection(self.service) if isinstance(s, ProxyService)]

        @defer.inlineCallbacks
        def records(folder: str) -> Any:
            yield service.recorder.flush()
            return list(read_records(record_files(folder)))

        self.assertEqual((yield post_as_alice(self)), 200)
        self.assertEqual(len((yield records(one))), 1)
        configure(two, 2)
        self.assertTrue(service.reload())
        self.assertEqual([(yield post_as_alice(self)), (yield post_as_alice(self))], [200, 429])
        self.assertEqual(len((yield records(one))), 1)
        self.assertEqual([r["status"] for r in (yield records(two))], [200])


class AdminReloadTests(ProxyTestCase):
    """A reload with the admin page on."""

    @defer.inlineCallbacks
    def test_admin_follows_the_reload(self):
        """The admin API answers after a reload, and lists the new forward
        key's label."""
        env_file = os.path.abspath(self.mktemp())
        admin_key = "ak-reload-admin-key-1234567890"
        write_env(env_file, OPENAI_API_KEY=OLD_SK, FORWARD_KEY=f"alice:{OLD_FK}",
                  ADMIN_KEY=admin_key)
        yield self.start_proxy(["--env-file", env_file])
        self.secrets_watch.default_keys += (NEW_SK, admin_key)
        self.secrets_watch.forward_keys += (NEW_FK,)
        [service] = [s for s in IServiceCollection(self.service) if isinstance(s, ProxyService)]
        write_env(env_file, OPENAI_API_KEY=NEW_SK, FORWARD_KEY=f"bob:{NEW_FK}",
                  ADMIN_KEY=admin_key)
        self.assertTrue(service.reload())
        response = yield self.client.get(
            self.url("/_admin/api/keys"),
            headers={b"authorization": [b"Bearer " + admin_key.encode()]},
        )
        body = yield response.content()
        self.assertEqual(response.code, 200, body)
        self.assertIn(b"bob", body)
        self.assertNotIn(b"alice", body)


class RestartOnlyTests(SynchronousTestCase):
    """What a reload refuses and what it reads."""

    def test_metrics_port_needs_restart(self) -> None:
        """METRICS_PORT is a listening port: only a restart changes it."""
        from twisted_forward.config import Config

        with self.assertRaises(ConfigError) as caught:
            restart_only_changes(Config(), Config(metrics_port="tcp:9"))
        self.assertEqual(
            str(caught.exception),
            "METRICS_PORT (--metrics-port) cannot change while the proxy runs: "
            "restart it to change that",
        )

    def test_options_win_over_env_file(self) -> None:
        """An option keeps its value whatever the .env file says, and the
        change is reported as without effect."""
        path = self.mktemp()
        write_env(path, LOG_DIR="one")
        source = ConfigSource({"log-dir": "opt"}, {}, path)
        self.assertEqual(source.load().log_dir, "opt")
        write_env(path, LOG_DIR="two")
        self.assertEqual(source.shadowed_changes(), ["LOG_DIR (the option --log-dir sets it)"])


class SighupTwistdTests(ProxyTestCase):
    """A real ``twistd -n`` sent SIGHUP while streams are open."""

    timeout = 60

    def spawn(self, extra: list[str], **env: str) -> ChildProcess:
        self.cwd = os.path.abspath(self.mktemp())
        os.makedirs(self.cwd)
        self.env_file = os.path.join(self.cwd, ".env")
        write_env(self.env_file, OPENAI_API_KEY=OLD_SK, FORWARD_KEY=OLD_FK)
        environ = child_env(**{
            "OPENAI_BASE_URL": f"http://127.0.0.1:{self.upstream_port}",
            "SHUTDOWN_GRACE": "10",
            **env,
        })
        return spawn_twistd(
            self,
            ["-n", "--pidfile=", "openai-forward", "--port", "tcp:0:interface=127.0.0.1", *extra],
            environ, self.cwd,
        )

    @defer.inlineCallbacks
    def status(self, port: int, key: str) -> Any:
        response = yield self.client.get(
            f"http://127.0.0.1:{port}/v1/models",
            headers={b"authorization": [b"Bearer " + key.encode()]},
        )
        yield response.content()
        return response.code

    @defer.inlineCallbacks
    def open_streams(self, port: int, count: int) -> Any:
        streams = []
        for _ in range(count):
            response = yield self.client.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", data=chat(),
                headers={b"authorization": [b"Bearer " + OLD_FK.encode()],
                         b"content-type": [b"application/json"]},
                unbuffered=True,
            )
            collector = Collector()
            response.deliverBody(collector)
            yield collector.got_data
            streams.append((response, collector))
        return streams

    @defer.inlineCallbacks
    def test_sighup_under_load(self):
        """Three streams held open across two SIGHUPs: a good .env (new keys
        in effect for new requests) and a bad one (refused, one line, the
        keys stay); every stream then finishes whole, and SIGTERM exits 0."""
        process = self.spawn([])
        match = yield process.wait_for(r"ForwardSite starting on (\d+)")
        port = int(match.group(1))
        self.fake.hold_at = 2
        streams = yield self.open_streams(port, 3)

        write_env(self.env_file, OPENAI_API_KEY=NEW_SK, FORWARD_KEY=NEW_FK)
        mark = len(process.lines)
        process.signal("HUP")
        yield process.wait_for(r"reloaded the configuration", mark)
        self.assertEqual((yield self.status(port, NEW_FK)), 200)
        self.assertEqual(self.fake.seen[-1].header(b"authorization"), b"Bearer " + NEW_SK.encode())
        self.assertEqual((yield self.status(port, OLD_FK)), 401)

        write_env(self.env_file, OPENAI_API_KEY=OLD_SK, FORWARD_KEY="not-a-forward-key")
        mark = len(process.lines)
        process.signal("HUP")
        yield process.wait_for(r"reload refused", mark)
        refusals = [line for line in process.lines[mark:] if "reload refused" in line]
        self.assertEqual(len(refusals), 1)
        self.assertIn("FORWARD_KEY (--forward-key): every forward key must start with 'fk-'",
                      refusals[0])
        self.assertEqual((yield self.status(port, NEW_FK)), 200)

        for response, _ in streams:
            self.assertEqual(response.code, 200)
        self.fake.release.callback(None)
        for _, collector in streams:
            yield collector.done
            self.assertEqual(collector.body, b"".join(chat_chunks(self.fake.answer_text, "m")))
        yield self.pool.closeCachedConnections()
        process.signal("TERM")
        yield process.exited()
        assert_exit(self, process, 0)
        output = process.output
        for secret in (OLD_FK, NEW_FK, OLD_SK, NEW_SK):
            self.assertNotIn(secret, output)

    @defer.inlineCallbacks
    def test_workers_relay(self):
        """With --workers 2 the supervisor relays SIGHUP to every worker and
        each reports; a stream open across the reload finishes whole, then
        every worker takes the new key.  A bad .env is refused by the
        supervisor in one line, no worker is disturbed, the keys stay."""
        process = self.spawn(["--workers", "2"])
        match = yield process.wait_for(r"listening on 127\.0\.0\.1:(\d+); starting 2 worker")
        port = int(match.group(1))
        yield process.wait_for(r"worker 1 serving")
        yield process.wait_for(r"worker 2 serving")
        self.fake.hold_at = 2
        [(stream, collector)] = yield self.open_streams(port, 1)
        write_env(self.env_file, OPENAI_API_KEY=NEW_SK, FORWARD_KEY=NEW_FK)
        mark = len(process.lines)
        process.signal("HUP")
        yield process.wait_for(r"reload: sent to 2 worker", mark)
        yield process.wait_for(r"worker-1.*reloaded the configuration", mark)
        yield process.wait_for(r"worker-2.*reloaded the configuration", mark)
        # New connections each time (the test pool is not persistent here).
        yield self.pool.closeCachedConnections()
        for _ in range(6):
            self.assertEqual((yield self.status(port, NEW_FK)), 200)
            yield self.pool.closeCachedConnections()
        self.fake.release.callback(None)
        yield collector.done
        self.assertEqual(stream.code, 200)
        self.assertEqual(collector.body, b"".join(chat_chunks(self.fake.answer_text, "m")))

        write_env(self.env_file, OPENAI_API_KEY=NEW_SK, FORWARD_KEY="not-a-forward-key")
        mark = len(process.lines)
        process.signal("HUP")
        yield process.wait_for(r"reload refused", mark)
        yield self.pool.closeCachedConnections()
        for _ in range(4):
            self.assertEqual((yield self.status(port, NEW_FK)), 200)
            yield self.pool.closeCachedConnections()
        after = process.lines[mark:]
        self.assertEqual(len([line for line in after if "reload refused" in line]), 1, after)
        self.assertFalse([line for line in after if "reloaded the configuration" in line
                          or "reload: sent to" in line], after)
        process.signal("TERM")
        yield process.exited()
        assert_exit(self, process, 0)
        self.assertIn("Server Shut Down.", process.lines[-1])
        self.assertNotIn("Traceback", process.output)


class ForegroundSigusr1Tests(ProxyTestCase):
    """SIGUSR1 to a foreground proxy, which writes no log file (as under
    systemd or Docker): logged and ignored, never the signal's default
    action (an instant kill, no drain)."""

    timeout = 60

    @defer.inlineCallbacks
    def test_ignored_and_logged(self):
        """``twistd -n`` and a ``--workers 2`` supervisor each log one line
        for SIGUSR1 and go on serving; SIGTERM then stops them as usual."""
        env = child_env(OPENAI_BASE_URL=f"http://127.0.0.1:{self.upstream_port}")
        for extra, ready, serving in (
            # The port is bound (and logged) in makeService, before twistd
            # starts the services: the handler is in place once they log.
            ([], r"ForwardSite starting on (\d+)", r"ProxyService#info\] caps: "),
            (["--workers", "2"], r"listening on 127\.0\.0\.1:(\d+); starting 2 worker",
             r"worker 2 serving"),
        ):
            cwd = os.path.abspath(self.mktemp())
            os.makedirs(cwd)
            process = spawn_twistd(
                self,
                ["-n", "--pidfile=", "openai-forward", "--port", "tcp:0:interface=127.0.0.1",
                 *extra],
                env, cwd,
            )
            port = int((yield process.wait_for(ready)).group(1))
            if serving is not None:
                yield process.wait_for(serving)
            mark = len(process.lines)
            os.kill(process.pid, signal.SIGUSR1)
            yield process.wait_for(r"SIGUSR1 ignored: no log file to reopen", mark)
            response = yield self.client.get(f"http://127.0.0.1:{port}/healthz")
            self.assertEqual(json.loads((yield response.content()))["status"], "ok")
            yield self.pool.closeCachedConnections()
            process.signal("TERM")
            yield process.exited()
            assert_exit(self, process, 0)


class LogRotationTests(ProxyTestCase):
    """SIGUSR1 to a daemon writing ``--logfile``: after logrotate moved the
    file, the path is opened anew; with nothing moved, twistd rotates."""

    timeout = 60

    @defer.inlineCallbacks
    def test_reopen_after_logrotate_and_twistd_rotation(self):
        """After logrotate moves a daemon's --logfile, SIGUSR1 makes it write to a new file
        at the path; with nothing moved, SIGUSR1 rotates it to .1 and new lines go to a
        fresh file."""
        from twisted.web.client import Agent, HTTPConnectionPool, readBody

        from .test_runmodes import _UnixEndpoints

        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        pidfile, logfile = (os.path.join(cwd, n) for n in ("p.pid", "p.log"))
        import shutil
        import tempfile

        short = tempfile.mkdtemp(prefix="tf-")  # a unix socket path is short
        self.addCleanup(shutil.rmtree, short, True)
        sock = os.path.join(short, "p.sock")
        env = child_env(OPENAI_BASE_URL=f"http://127.0.0.1:{self.upstream_port}")
        launcher = spawn_twistd(
            self, [f"--pidfile={pidfile}", f"--logfile={logfile}",
                   "openai-forward", "--port", f"unix:{sock}"], env, cwd,
        )
        yield launcher.exited()
        assert_exit(self, launcher, 0)
        with open(pidfile) as f:
            pid = int(f.read())
        self.addCleanup(self._kill, pid)
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(sock), pool=pool)

        @defer.inlineCallbacks
        def request(path: bytes) -> Any:
            response = yield agent.request(b"GET", b"http://proxy" + path)
            yield readBody(response)

        @defer.inlineCallbacks
        def logged(path: str, text: str) -> Any:
            # The access line is written as the request ends; the file is
            # read until it shows (bounded by the test's timeout).
            while True:
                if os.path.exists(path):
                    with open(path) as f:
                        if text in f.read():
                            return
                yield request(b"/healthz")

        yield request(b"/first")
        yield logged(logfile, "GET /first")
        # logrotate: move the file away, then SIGUSR1.
        os.rename(logfile, logfile + ".moved")
        os.kill(pid, signal.SIGUSR1)
        yield logged(logfile, "log file reopened")
        yield request(b"/second")
        yield logged(logfile, "GET /second")
        with open(logfile + ".moved") as f:
            self.assertNotIn("GET /second", f.read())
        # No tool moved it: twistd's own rotation (p.log -> p.log.1).
        os.kill(pid, signal.SIGUSR1)
        yield logged(logfile + ".1", "GET /second")
        yield request(b"/third")
        yield logged(logfile, "GET /third")
        with open(logfile + ".1") as f:
            self.assertNotIn("GET /third", f.read())
        os.kill(pid, signal.SIGTERM)

    def _kill(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
