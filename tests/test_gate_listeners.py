"""
The IP gate decides in one layer, the channel's head checks, on every
listener the proxy opens: its port (TCP, TLS, a unix socket), METRICS_PORT,
ADMIN_PORT, and each ``--workers`` worker; a reload moves every listener to
the new lists at once.

Each test starts the real plugin on loopback and is refused as a client the
lists exclude: the test client is 127.0.0.1, so ``IP_BLACKLIST=127.0.0.0/8``
(or an ``IP_WHITELIST`` without it) refuses it.  There is no second gate in
the resource tree (tests/test_access.py ``test_one_layer``), so a listener
built without the head checks fails here.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.web.client import Agent, HTTPConnectionPool

from twisted_forward.tap import ProxyService

# Modules, not their classes: trial would run a test class found here again.
from . import test_tls_listener, test_workers
from .harness import ProxyTestCase, listeners
from .test_e2e_framing import RawClient
from .test_reload import write_env

ADMIN = "admin-gate-key-0123456789"
BLOCK_LOOPBACK = {"IP_BLACKLIST": "127.0.0.0/8"}


class GateTestCase(ProxyTestCase):
    """Asks a listener for a path and reads the answer's error code."""

    @defer.inlineCallbacks
    def ask(
        self, base: str, path: str, key: Optional[str] = None, client: Any = None
    ) -> Any:
        """GET ``base + path``; returns (status, error code or None)."""
        headers = {b"authorization": [b"Bearer " + key.encode()]} if key else {}
        response = yield (client or self.client).get(base + path, headers=headers)
        body = yield response.content()
        code = None
        if response.code >= 400:
            code = json.loads(body)["error"]["code"]
        return response.code, code

    def assertRefused(self, answer: tuple[int, Optional[str]]) -> None:
        """403 ``ip_not_allowed``, the gate's refusal."""
        self.assertEqual(answer, (403, "ip_not_allowed"))

    @defer.inlineCallbacks
    def raw(self, port: int, data: bytes) -> Any:
        """Write ``data`` on a new connection to ``port``; returns what was
        received by the time the proxy closed it."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        client = yield connectProtocol(endpoint, RawClient())
        self.addCleanup(client.transport.abortConnection)
        client.transport.write(data)
        received = yield client.closed.addTimeout(10, reactor)
        return received

    def side_base(self, index: int) -> str:
        """The base URL of the service's ``index``-th listener."""
        port = listeners(self.service)[index].endpoint.port
        return f"http://127.0.0.1:{port.getHost().port}"


class PublicPortTests(GateTestCase):
    """The proxy's own TCP port."""

    @defer.inlineCallbacks
    def test_refused_on_every_path_but_the_health_check(self):
        """A refused client gets 403 on a route, /metrics and /_admin/, and
        the health check still answers it; nothing reaches the upstream."""
        yield self.start_proxy(ADMIN_KEY=ADMIN, **BLOCK_LOOPBACK)
        for path, key in (("/v1/models", None), ("/metrics", ADMIN), ("/_admin/api/keys", ADMIN)):
            self.assertRefused((yield self.ask(self.base, path, key)))
        self.assertEqual((yield self.ask(self.base, "/healthz")), (200, None))
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_refused_before_the_body(self):
        """The refusal comes from the head alone: a client announcing a
        large body gets 403 without sending any of it."""
        yield self.start_proxy(**BLOCK_LOOPBACK)
        received = yield self.raw(
            self.proxy_port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
            b"Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n",
        )
        self.assertTrue(received.startswith(b"HTTP/1.1 403 "), received)
        self.assertNotIn(b"100 Continue", received)


class SidePortTests(GateTestCase):
    """METRICS_PORT and ADMIN_PORT run the same gate as the proxy's port."""

    @defer.inlineCallbacks
    def start_sides(self, env_file: Optional[str] = None, **env: str) -> Any:
        """The proxy with METRICS_PORT and ADMIN_PORT on loopback; returns
        their base URLs (metrics, admin)."""
        args = ["--env-file", env_file] if env_file else []
        yield self.start_proxy(
            args,
            METRICS_PORT="tcp:0:interface=127.0.0.1",
            ADMIN_PORT="tcp:0:interface=127.0.0.1",
            **env,
        )
        return self.side_base(1), self.side_base(2)

    @defer.inlineCallbacks
    def test_allowed_client_served(self):
        """An allowed client reads the metrics and the admin API there."""
        metrics, admin = yield self.start_sides(ADMIN_KEY=ADMIN, IP_WHITELIST="127.0.0.1")
        self.assertEqual((yield self.ask(metrics, "/metrics")), (200, None))
        self.assertEqual((yield self.ask(admin, "/_admin/api/keys", ADMIN)), (200, None))

    @defer.inlineCallbacks
    def test_refused_on_both(self):
        """A refused client gets 403 on METRICS_PORT and on ADMIN_PORT (the
        admin key does not open the gate), page and API alike."""
        metrics, admin = yield self.start_sides(ADMIN_KEY=ADMIN, **BLOCK_LOOPBACK)
        self.assertRefused((yield self.ask(metrics, "/metrics")))
        for path in ("/_admin/", "/_admin/api/keys"):
            self.assertRefused((yield self.ask(admin, path, ADMIN)))

    @defer.inlineCallbacks
    def test_admin_port_refuses_before_the_body(self):
        """On ADMIN_PORT too the gate decides on the head: no body read."""
        yield self.start_sides(ADMIN_KEY=ADMIN, IP_WHITELIST="10.0.0.0/8")
        received = yield self.raw(
            listeners(self.service)[2].endpoint.port.getHost().port,
            b"POST /_admin/api/keys HTTP/1.1\r\nHost: proxy\r\n"
            b"Content-Length: 1000000\r\n\r\n",
        )
        self.assertTrue(received.startswith(b"HTTP/1.1 403 "), received)

    @defer.inlineCallbacks
    def test_reload_moves_every_listener(self):
        """A reload that blacklists the client refuses it on the proxy's port
        and both side ports at once; the admin port takes a new admin key."""
        env_file = os.path.abspath(self.mktemp())
        write_env(env_file, ADMIN_KEY=ADMIN)
        metrics, admin = yield self.start_sides(env_file)
        self.assertEqual((yield self.ask(admin, "/_admin/api/keys", ADMIN)), (200, None))
        new_admin = ADMIN + "-new"
        write_env(env_file, ADMIN_KEY=new_admin, **BLOCK_LOOPBACK)
        [service] = [s for s in self.service if isinstance(s, ProxyService)]
        self.assertTrue(service.reload())
        # New connections: the old ones keep the settings they started with.
        yield self.pool.closeCachedConnections()
        self.assertRefused((yield self.ask(self.base, "/v1/models")))
        self.assertRefused((yield self.ask(metrics, "/metrics")))
        self.assertRefused((yield self.ask(admin, "/_admin/api/keys", new_admin)))
        write_env(env_file, ADMIN_KEY=new_admin)
        self.assertTrue(service.reload())
        yield self.pool.closeCachedConnections()
        self.assertEqual((yield self.ask(admin, "/_admin/api/keys", new_admin)), (200, None))
        self.assertEqual((yield self.ask(admin, "/_admin/api/keys", ADMIN))[0], 401)


class TLSGateTests(GateTestCase):
    """A TLS listener (``--port ssl:…``)."""

    start_tls = test_tls_listener.TLSListenerTests.start_tls

    def start_proxy(self, args: Any = None, **env: str) -> Any:  # type: ignore[override]  # same call, looser types
        return super().start_proxy(args, **dict(env, **BLOCK_LOOPBACK))

    @defer.inlineCallbacks
    def test_refused_over_tls(self):
        """A refused client gets 403 over HTTPS; the health check answers."""
        yield self.start_tls()
        self.assertRefused((yield self.ask(self.https_base, "/v1/models", client=self.tls_client)))
        self.assertEqual(
            (yield self.ask(self.https_base, "/healthz", client=self.tls_client)), (200, None)
        )
        self.assertEqual(self.fake.seen, [])


class UnixGateTests(GateTestCase):
    """A unix-socket listener: its peers have no address, so a list refuses
    them unless TRUSTED_PROXIES=unix vouches for a forwarded one."""

    start_unix = test_tls_listener.UnixListenerTests.start_unix

    @defer.inlineCallbacks
    def test_unix_peer_refused_with_a_list(self):
        """With IP_WHITELIST set, an untrusted unix peer gets 403 (its
        address is unknown), the health check still answers it."""
        yield self.start_unix(IP_WHITELIST="198.51.100.0/24")
        base = "http://proxy.local"
        self.assertRefused((yield self.ask(base, "/v1/models", client=self.unix_client)))
        self.assertEqual((yield self.ask(base, "/healthz", client=self.unix_client)), (200, None))
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_trusted_unix_peer_forwards_the_client(self):
        """TRUSTED_PROXIES=unix: the forwarded client is judged instead."""
        yield self.start_unix(IP_WHITELIST="198.51.100.0/24", TRUSTED_PROXIES="unix")
        allowed = yield self.unix_client.get(
            "http://proxy.local/v1/models", headers={b"x-forwarded-for": [b"198.51.100.7"]}
        )
        yield allowed.content()
        self.assertEqual(allowed.code, 200)
        refused = yield self.unix_client.get(
            "http://proxy.local/v1/models", headers={b"x-forwarded-for": [b"203.0.113.7"]}
        )
        self.assertEqual(json.loads((yield refused.content()))["error"]["code"], "ip_not_allowed")


class WorkersGateTests(test_workers.WorkersTestCase):
    """``--workers 2``: each worker runs the gate on its requests."""

    @defer.inlineCallbacks
    def test_refused_by_every_worker(self):
        """Requests on new connections (either worker may take each) are all
        refused with 403; the health check is answered."""
        supervisor = self.start_supervisor(2, **BLOCK_LOOPBACK)
        match = yield supervisor.wait_for(r"listening on 127\.0\.0\.1:(\d+); starting 2 worker")
        base = f"http://127.0.0.1:{int(match.group(1))}"
        yield supervisor.wait_for(r"\[worker-1\] worker 1 serving")
        yield supervisor.wait_for(r"\[worker-2\] worker 2 serving")
        refused_by: set[int] = set()
        for _ in range(300):
            # One connection for both requests: the worker that says its pid
            # is the one that answers the refused request.
            pool = HTTPConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = 1
            client = HTTPClient(Agent(reactor, pool=pool))
            try:
                health = yield client.get(base + "/healthz")
                pid = json.loads((yield health.content()))["pid"]
                response = yield client.get(base + "/v1/models")
                body = json.loads((yield response.content()))
            finally:
                yield pool.closeCachedConnections()
            self.assertEqual((response.code, body["error"]["code"]), (403, "ip_not_allowed"))
            refused_by.add(pid)
            if len(refused_by) == 2:
                break
        self.assertEqual(len(refused_by), 2, "both workers should have answered")
        self.assertEqual(self.fake.seen, [])
        yield self.stop_supervisor(supervisor)
