"""
Redis at start-up, against a real redis-server: a Redis the limits need
(failing closed) must answer, or start-up stops with one line that names
REDIS_URL and never its password; one only wanted (failing open) is a warning.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher

from twisted_forward.config import ConfigError
from twisted_forward.tap import Options, build_service

from .harness import ProxyTestCase, listeners, proxy_env
from .redis_server import start_redis

PASSWORD = "redis-start-pass-0123456789"
POLICY = '{"*": {"rpm": 10}}'


def closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class RedisAtStartTests(ProxyTestCase):
    """The start-up check of REDIS_URL."""

    def build(self, **env: str) -> Any:
        options = Options()
        options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--env-file", "/dev/null"])
        return build_service(options, reactor, proxy_env(self.upstream_port, **env))

    @defer.inlineCallbacks
    def test_wrong_password_stops_start_up(self) -> Any:
        """A real server that refuses the URL's password: ConfigError naming
        REDIS_URL and WRONGPASS, without the password."""
        server = yield start_redis(self, password=PASSWORD)
        url = f"{server.url}?password=not-the-{PASSWORD}"
        e = self.assertRaises(ConfigError, self.build, REDIS_URL=url, KEY_POLICY=POLICY)
        self.assertIn("REDIS_URL (--redis-url): cannot reach unix://", str(e))
        self.assertIn("the server refused AUTH (WRONGPASS)", str(e))
        self.assertNotIn(PASSWORD, str(e))

    @defer.inlineCallbacks
    def test_right_password_starts(self) -> Any:
        """The same server with the right password: the proxy starts and
        serves."""
        server = yield start_redis(self, password=PASSWORD)
        yield self.start_proxy(REDIS_URL=f"{server.url}?password={PASSWORD}", KEY_POLICY=POLICY)
        response = yield self.client.get(self.url("/healthz"))
        yield response.content()
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_failing_open_warns_and_starts(self) -> Any:
        """Nothing at REDIS_URL but LIMITS_ON_STORE_FAILURE=open: one warning
        line naming the server (not its password), and the proxy serves."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        port = closed_port()
        yield self.start_proxy(
            REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:{port}/0", KEY_POLICY=POLICY,
            LIMITS_ON_STORE_FAILURE="open",
        )
        said = [formatEvent(e) for e in events if "cannot reach" in formatEvent(e)]
        self.assertEqual(said, [
            f"REDIS_URL (--redis-url): cannot reach redis://127.0.0.1:{port}/0 (Connection "
            "refused); starting anyway, and using it once it answers (until then: limits as "
            "LIMITS_ON_STORE_FAILURE=open says, cache misses)"
        ])
        response = yield self.client.get(self.url("/healthz"))
        yield response.content()
        self.assertEqual(response.code, 200)

    def test_no_policy_no_requirement(self) -> None:
        """REDIS_URL set but no key policy (nothing is counted): not
        required, so an unreachable server does not stop start-up."""
        # Raises ConfigError if the check wrongly required the server.
        service = self.build(REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0")
        for listener in listeners(service):
            listener.endpoint.port.stopListening()
