"""
Several proxy instances sharing one real redis-server (REDIS_URL): limits
exact across them, both LIMITS_ON_STORE_FAILURE modes when Redis dies, and
reservations given back when an instance is stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
from typing import Any

import txredisapi
from twisted.application.service import IService
from twisted.internet import defer, reactor
from twisted.web.client import ResponseFailed

from twisted_forward.tap import Options, makeService

from .harness import listeners, proxy_env
from .processes import assert_exit, child_env, spawn_twistd
from .redis_server import start_redis
from .test_policies_e2e import ALICE, BOB, DEFAULT, PolicyTestCase, chat

ALICE_ONLY = json.dumps({"alice": {"rpm": 5}})
KEYS = dict(OPENAI_API_KEY=DEFAULT, FORWARD_KEY=f"alice:{ALICE} bob:{BOB}")


class RedisInstancesTests(PolicyTestCase):
    """Two proxy instances (two services, as two machines would run them)
    in front of the fake upstream, sharing one redis-server."""

    timeout = 30

    @defer.inlineCallbacks
    def start_pair(self, **env: str) -> Any:
        """Start redis-server, then instance A (watched for secrets) and
        instance B; returns their base URLs."""
        self.redis = yield start_redis(self)
        # A generous timeout where the store is meant to work: a loaded test
        # machine must not turn into an outage.
        settings = dict(KEYS, REDIS_URL=self.redis.url, KEY_POLICY=ALICE_ONLY,
                        RATE_LIMIT_STRATEGY="moving-window", LIMITS_STORE_TIMEOUT="5")
        settings.update(env)
        a = yield self.start_proxy(**settings)
        b = yield self.start_other(**settings)
        return a, b

    def start_other(self, **env: str) -> Any:
        """A second instance of the plugin on loopback; stopped at cleanup."""
        options = Options()
        options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--env-file", os.devnull])
        environ = proxy_env(self.upstream_port, **{**self.proxy_settings, **env})
        service = makeService(options, reactor=reactor, environ=environ)
        # Bound while the service was built (twisted_forward.listening).
        port = listeners(service)[0].endpoint.port
        IService(service).startService()
        self.addCleanup(service.stopService)
        return defer.succeed(f"http://127.0.0.1:{port.getHost().port}")

    @defer.inlineCallbacks
    def post_to(self, base: str, key: str, body: bytes) -> Any:
        response = yield self.client.post(
            base + "/v1/chat/completions",
            data=body,
            headers={b"authorization": [b"Bearer " + key.encode()],
                     b"content-type": [b"application/json"]},
        )
        content = yield response.content()
        return response, content

    def chats_upstream(self) -> int:
        return sum(1 for s in self.fake.seen if s.uri == b"/v1/chat/completions")

    @defer.inlineCallbacks
    def test_two_instances_enforce_one_limit_exactly(self) -> Any:
        """rpm 5 for alice, 12 requests at once, half to each instance:
        exactly 5 succeed (across both), 7 get 429 with OpenAI's headers,
        and only 5 reach the upstream."""
        a, b = yield self.start_pair()
        results = yield defer.gatherResults(
            [self.post_to((a, b)[i % 2], ALICE, chat()) for i in range(12)]
        )
        codes = [r.code for r, _ in results]
        self.assertEqual(sorted(codes), [200] * 5 + [429] * 7, codes)
        for response, content in results:
            if response.code == 429:
                self.assertEqual(json.loads(content)["error"]["code"], "rate_limit_exceeded")
                self.assertIsNotNone(response.headers.getRawHeaders(b"retry-after"))
            self.assertEqual(response.headers.getRawHeaders(b"x-ratelimit-limit-requests"), [b"5"])
        self.assertEqual(self.chats_upstream(), 5)
        by_instance = {base: [r.code for i, (r, _) in enumerate(results) if (a, b)[i % 2] == base]
                       for base in (a, b)}
        self.assertTrue(all(by_instance.values()), by_instance)

    @defer.inlineCallbacks
    def test_redis_dies_open(self) -> Any:
        """LIMITS_ON_STORE_FAILURE=open: with Redis killed, alice is still
        served and still limited, by each instance's own count; every
        request answers within a second; the failures are in /metrics; a
        key without a policy never notices."""
        a, b = yield self.start_pair(LIMITS_ON_STORE_FAILURE="open", LIMITS_STORE_TIMEOUT="0.3")
        for base in (a, b):
            response, _ = yield self.post_to(base, ALICE, chat())
            self.assertEqual(response.code, 200)
        yield self.redis.kill()
        codes = []
        for _ in range(6):
            started = reactor.seconds()
            response, content = yield self.post_to(a, ALICE, chat())
            self.assertLess(reactor.seconds() - started, 1.0)
            codes.append(response.code)
        # Counted from nothing in this instance: 5 more, then refused.
        self.assertEqual(codes, [200] * 5 + [429])
        response, _ = yield self.post_to(b, BOB, chat())
        self.assertEqual(response.code, 200)
        metrics = yield self.metrics()
        failures = [line for line in metrics.splitlines()
                    if line.startswith("openai_forward_policy_store_failures_total")]
        self.assertTrue(failures and float(failures[0].split()[-1]) >= 1, failures)

    @defer.inlineCallbacks
    def test_redis_dies_closed(self) -> Any:
        """LIMITS_ON_STORE_FAILURE=closed: with Redis killed, alice gets a
        503 (OpenAI's error shape, limits_unavailable) within a second and
        nothing reaches the upstream; bob, with no policy, is served."""
        a, b = yield self.start_pair(LIMITS_ON_STORE_FAILURE="closed", LIMITS_STORE_TIMEOUT="0.3")
        response, _ = yield self.post_to(a, ALICE, chat())
        self.assertEqual(response.code, 200)
        yield self.redis.kill()
        before = self.chats_upstream()
        for base in (a, b, a):
            started = reactor.seconds()
            response, content = yield self.post_to(base, ALICE, chat())
            self.assertLess(reactor.seconds() - started, 1.0)
            self.assertError(response, content, 503, "limits_unavailable")
            self.assertNotIn("redis", content.decode().lower())
        self.assertEqual(self.chats_upstream(), before)
        response, _ = yield self.post_to(b, BOB, chat())
        self.assertEqual(response.code, 200)


class SigtermTests(PolicyTestCase):
    """An instance stopped with SIGTERM while requests hold reservations."""

    timeout = 45

    @defer.inlineCallbacks
    def test_sigterm_gives_back_what_open_requests_held(self) -> Any:
        """A real twistd instance on Redis holds alice's only parallel slot
        and 900 of her 1000 daily tokens for a stalled stream; SIGTERM with
        a short grace cuts the stream, gives both back, and exits; Redis
        holds no slot and no tokens afterwards, and another instance can
        take them at once."""
        redis = yield start_redis(self)
        policy = json.dumps({"alice": {"max_parallel": 1, "tokens_per_day": 1000}})
        env = child_env(
            OPENAI_BASE_URL=f"http://127.0.0.1:{self.upstream_port}",
            SHUTDOWN_GRACE="1", REDIS_URL=redis.url, KEY_POLICY=policy,
            LIMITS_STORE_TIMEOUT="5", **KEYS,
        )
        workdir = self.mktemp()
        os.makedirs(workdir)
        proxy = spawn_twistd(
            self,
            ["-n", "--pidfile=", "openai-forward", "--port",
             "tcp:0:interface=127.0.0.1", "--env-file", os.devnull],
            env, workdir,
        )
        match = yield proxy.wait_for(r"Site starting on (\d+)")
        base = f"http://127.0.0.1:{match.group(1)}"

        self.fake.hold_at = 1
        body = chat(stream=True, max_tokens=900)
        pending = self.client.post(
            base + "/v1/chat/completions", data=body, unbuffered=True,
            headers={b"authorization": [b"Bearer " + ALICE.encode()],
                     b"content-type": [b"application/json"]},
        )
        yield self.fake.arrived
        redis_client = yield txredisapi.UnixConnection(
            redis.socket_path, reconnect=False, convertNumbers=False
        )
        self.addCleanup(redis_client.disconnect)
        slots = "twisted-forward:policy:c:alice/parallel"
        self.assertEqual((yield redis_client.execute_command("ZCARD", slots)), 1)
        tokens = yield redis_client.keys("twisted-forward:policy:f:alice/tokens_per_day:*")
        self.assertEqual(len(tokens), 1)
        self.assertGreaterEqual(float((yield redis_client.get(tokens[0]))), 900)

        proxy.signal("TERM")
        response = yield pending
        # The grace ran out: the stream is cut, not ended as if whole...
        yield self.assertFailure(response.content(), ResponseFailed)
        # ...and the process itself stops in order (exit 0, not by the signal).
        yield proxy.exited()
        assert_exit(self, proxy, 0)
        self.assertEqual((yield redis_client.execute_command("ZCARD", slots)), 0)
        self.assertEqual(float((yield redis_client.get(tokens[0]))), 0)

        # Nothing leaks: another instance takes the slot and the tokens.
        self.fake.hold_at = None
        yield self.start_proxy(REDIS_URL=redis.url, KEY_POLICY=policy,
                               LIMITS_STORE_TIMEOUT="5", **KEYS)
        response, content = yield self.post(ALICE, chat(max_tokens=900))
        self.assertEqual(response.code, 200, content)
        self.assertNotIn("Traceback", proxy.output)
