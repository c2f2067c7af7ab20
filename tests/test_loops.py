"""
Loop and path guards: an upstream that is the proxy's own address is
refused at start-up (real twistd, in the foreground and with --workers); a
loop through another proxy is answered 508 at run time; a base URL ending
in /v1 does not double it.
"""

from __future__ import annotations

import json
import os
import socket

from twisted.application.service import IServiceCollection
from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from twisted_forward.loops import HOP_HEADER, HOP_TOKEN, MAX_HOPS, is_loop, join_path, mark
from twisted_forward.tap import ProxyService

from .harness import ProxyTestCase
from .processes import TWISTD, assert_exit, child_env, run, spawn_twistd
from .test_reload import write_env
from .test_startup import startup_env


def free_port() -> int:
    """A loopback port nobody listens on (just now)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class OwnAddressTests(ProxyTestCase):
    """``OPENAI_BASE_URL`` exported for the SDK, pointing at the proxy."""

    timeout = 60

    @defer.inlineCallbacks
    def test_refused_at_start(self):
        """Foreground and --workers: exit 1, one line naming the setting."""
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        for workers in ([], ["--workers", "2"]):
            port = free_port()
            process = yield run(
                self, [*TWISTD, "-n", "--pidfile=", "openai-forward", *workers,
                       "--port", f"tcp:{port}:interface=127.0.0.1"],
                startup_env(OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1"), cwd,
            )
            assert_exit(self, process, 1)
            self.assertEqual(
                process.errors.splitlines(),
                [f"openai-forward: OPENAI_BASE_URL (--base-url): http://127.0.0.1:{port}/v1 "
                 f"is this proxy's own address (it listens on port {port}): every request "
                 "would come back to it. Point it at the real upstream "
                 "(https://api.openai.com by default); an OPENAI_BASE_URL exported for the "
                 "SDK is the usual cause"],
            )

    @defer.inlineCallbacks
    def test_all_interfaces_and_a_name(self):
        """Listening on every interface, ``localhost`` at the same port is
        the proxy too; a FORWARD_CONFIG row is named as such."""
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        port = free_port()
        process = yield run(
            self, [*TWISTD, "-n", "--pidfile=", "openai-forward", "--port", str(port)],
            startup_env(FORWARD_CONFIG=json.dumps(
                [{"base_url": "https://api.openai.com", "route": "/"},
                 {"base_url": f"http://localhost:{port}", "route": "/self"}])),
            cwd,
        )
        assert_exit(self, process, 1)
        self.assertTrue(process.errors.startswith(
            f"openai-forward: FORWARD_CONFIG (--forward-config): http://localhost:{port} is "
            "this proxy's own address"), process.errors)


class RuntimeLoopTests(ProxyTestCase):
    """A loop through a second proxy (a real twistd) is answered 508."""

    timeout = 60

    @defer.inlineCallbacks
    def test_loop_through_another_proxy(self):
        """When a reload points the proxy at a second real proxy that forwards back to it,
        the looping request is answered 508 loop_detected instead of circling, and never
        reaches the upstream."""
        env_file = os.path.abspath(self.mktemp())
        write_env(env_file)
        yield self.start_proxy(["--env-file", env_file])
        # The second proxy forwards to this one...
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        other = spawn_twistd(
            self, ["-n", "--pidfile=", "openai-forward", "--port", "tcp:0:interface=127.0.0.1"],
            child_env(OPENAI_BASE_URL=self.base), cwd,
        )
        match = yield other.wait_for(r"ForwardSite starting on (\d+)")
        # ...and a reload points this one at the second: a loop.
        # (FORWARD_CONFIG: the harness gives OPENAI_BASE_URL in the environment.)
        write_env(env_file, FORWARD_CONFIG=json.dumps(
            [{"base_url": f"http://127.0.0.1:{match.group(1)}"}]))
        [service] = [s for s in IServiceCollection(self.service) if isinstance(s, ProxyService)]
        self.assertTrue(service.reload())
        response = yield self.client.get(self.url("/v1/models"))
        body = json.loads((yield response.content()))
        self.assertEqual(response.code, 508)
        self.assertEqual(body["error"]["code"], "loop_detected")
        self.assertEqual(self.fake.seen, [])


class BaseV1Tests(ProxyTestCase):
    """A base URL ending in /v1."""

    @defer.inlineCallbacks
    def test_no_double_v1_and_warned(self):
        """/v1/models goes to /v1/models, not /v1/v1/models; start-up says so."""
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        yield self.start_proxy(OPENAI_BASE_URL=f"http://127.0.0.1:{self.upstream_port}/v1")
        response = yield self.client.get(self.url("/v1/models?x=1"))
        yield response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(self.fake.seen[-1].uri, b"/v1/models?x=1")
        self.assertTrue(any("ends in /v1" in str(e.get("note", "")) for e in logged))


class HopMarkerTests(SynchronousTestCase):
    """The hop marker's arithmetic."""

    def test_mark_appends(self) -> None:
        """Markers of earlier proxies are kept; ours comes last; a request
        with ours is a loop."""
        headers = Headers({HOP_HEADER: [b"aaa, bbb"]})
        self.assertFalse(is_loop(headers))
        mark(headers)
        self.assertEqual(headers.getRawHeaders(HOP_HEADER), [b"aaa, bbb, " + HOP_TOKEN])
        self.assertTrue(is_loop(headers))

    def test_too_many_hops(self) -> None:
        """MAX_HOPS other proxies: refused too."""
        headers = Headers({HOP_HEADER: [b", ".join(b"t%d" % i for i in range(MAX_HOPS))]})
        self.assertTrue(is_loop(headers))

    def test_join_path(self) -> None:
        """/v1 is not doubled; other paths are appended as they are."""
        self.assertEqual(join_path("/v1", b"/v1/models"), b"/v1/models")
        self.assertEqual(join_path("/v1", b"/models"), b"/v1/models")
        self.assertEqual(join_path("/openai/v1", b"/v1"), b"/openai/v1")
        self.assertEqual(join_path("", b"/v1/models"), b"/v1/models")
        self.assertEqual(join_path("/v10", b"/v1/x"), b"/v10/v1/x")
