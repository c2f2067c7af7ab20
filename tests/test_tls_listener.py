"""
The plugin listening on other endpoints than TCP: TLS (``ssl:``) with a
certificate made in the test, a unix socket (``unix:``), and a socket
inherited the way systemd's socket activation hands it over (``systemd:``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import ssl
import stat
import sys
import tempfile

import openai
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.threads import deferToThread
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseNeverReceived,
)
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from .fake_upstream import chat_chunks
from .harness import ProxyTestCase
from .processes import TWISTD, assert_exit, child_env, spawn
from .tls_fixtures import ThrowawayCA

_CA = None


def shared_ca() -> ThrowawayCA:
    global _CA
    if _CA is None:
        _CA = ThrowawayCA()
    return _CA


def _streamed(text: str) -> bytes:
    """The SSE body the fake upstream streams for a chat answer."""
    return b"".join(chat_chunks(text, "m"))


def _escape(path: str) -> str:
    """A path as an endpoint-string value (``:`` and ``\\`` escaped)."""
    return path.replace("\\", "\\\\").replace(":", "\\:")


class TLSListenerTests(ProxyTestCase):
    """``--port ssl:…:privateKey=…:certKey=…`` serves the proxy over TLS."""

    @defer.inlineCallbacks
    def start_tls(self) -> defer.Deferred:
        directory = self.mktemp()
        os.makedirs(directory)
        cert_path, key_path = shared_ca().issue(["localhost", "127.0.0.1"]).write(directory)
        self.ca_path = shared_ca().write(os.path.join(directory, "ca.pem"))
        yield self.start_proxy(
            [
                "--port",
                f"ssl:0:interface=127.0.0.1:privateKey={_escape(key_path)}"
                f":certKey={_escape(cert_path)}",
            ]
        )
        self.https_base = f"https://localhost:{self.proxy_port}"
        policy = BrowserLikePolicyForHTTPS(trustRoot=shared_ca().trust_root())
        self.tls_client = HTTPClient(
            Agent(
                reactor,
                contextFactory=policy,
                pool=HTTPConnectionPool(reactor, persistent=False),
            )
        )

    @defer.inlineCallbacks
    def test_https_clients(self):
        """On an ssl: port, HTTPS clients trusting the test CA get plain and streamed
        answers through the proxy."""
        yield self.start_tls()
        response = yield self.tls_client.get(self.https_base + "/v1/models")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads((yield response.content()))["data"][0]["id"], "gpt-4o-mini")

        response = yield self.tls_client.post(
            self.https_base + "/v1/chat/completions",
            data=json.dumps({"model": "m", "stream": True, "messages": []}).encode(),
            headers={b"content-type": b"application/json"},
        )
        self.assertEqual((yield response.content()), _streamed(self.fake.answer_text))

    @defer.inlineCallbacks
    def test_plain_http_refused_on_tls_port(self):
        """The TLS port speaks TLS only: a plain-HTTP request gets no answer
        and never reaches the upstream."""
        yield self.start_tls()
        d = self.client.get(self.base + "/v1/models")
        yield self.assertFailure(d, ResponseNeverReceived)
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_sdk_over_tls(self):
        """The openai SDK, trusting the test CA, through the TLS listener."""
        yield self.start_tls()

        def call() -> list[str]:
            context = ssl.create_default_context(cafile=self.ca_path)
            with openai.OpenAI(
                base_url=self.https_base + "/v1",
                api_key="sk-client-own",
                max_retries=0,
                timeout=10,
                http_client=openai.DefaultHttpxClient(verify=context, trust_env=False),
            ) as client:
                completion = client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}]
                )
                return [completion.choices[0].message.content]

        self.assertEqual((yield deferToThread(call)), [self.fake.answer_text])


@implementer(IAgentEndpointFactory)
class _UnixSocket:
    """Every request goes to one unix socket."""

    def __init__(self, path: str) -> None:
        self.path = path

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(reactor, self.path)


class UnixListenerTests(ProxyTestCase):
    """``--port unix:/path:mode=…`` serves the proxy on a unix socket."""

    @defer.inlineCallbacks
    def start_unix(self, **env: str) -> defer.Deferred:
        """Start the plugin on a unix socket (the harness reads TCP ports)."""
        directory = tempfile.mkdtemp(prefix="tf-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.socket_path = os.path.join(directory, "proxy.sock")
        yield self.start_service(f"unix:{_escape(self.socket_path)}:mode=660", **env)
        self.unix_client = HTTPClient(
            Agent.usingEndpointFactory(
                reactor,
                _UnixSocket(self.socket_path),
                HTTPConnectionPool(reactor, persistent=False),
            )
        )

    @defer.inlineCallbacks
    def test_unix_socket(self):
        """A unix: port with mode=660 creates the socket with those permissions and serves
        plain and streamed requests; the upstream sees its own host name, not the socket."""
        yield self.start_unix()
        self.assertEqual(stat.S_IMODE(os.stat(self.socket_path).st_mode), 0o660)
        response = yield self.unix_client.get("http://proxy.local/v1/models?x=1")
        self.assertEqual(response.code, 200)
        yield response.content()
        response = yield self.unix_client.post(
            "http://proxy.local/v1/chat/completions",
            data=json.dumps({"model": "m", "stream": True, "messages": []}).encode(),
            headers={b"content-type": b"application/json"},
        )
        self.assertEqual((yield response.content()), _streamed(self.fake.answer_text))
        self.assertEqual(
            [s.uri for s in self.fake.seen], [b"/v1/models?x=1", b"/v1/chat/completions"]
        )
        # The upstream sees its own name, not the unix client's.
        self.assertEqual(self.fake.seen[0].header(b"host"), b"127.0.0.1:%d" % self.upstream_port)

    @defer.inlineCallbacks
    def test_healthz_on_unix_socket(self):
        """The health check answers {"status": "ok"} on a unix socket too."""
        yield self.start_unix()
        response = yield self.unix_client.get("http://proxy.local/healthz")
        self.assertEqual(json.loads((yield response.content())), {"status": "ok"})


#: What systemd does for a socket unit, as a shell line: descriptor 3 is the
#: socket, LISTEN_PID the pid of the process that reads it (``exec`` keeps
#: it), and LISTEN_FDNAMES is set as systemd >= 227 does (Twisted ignores
#: inherited sockets without it).
_ACTIVATED = (
    "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=openai-forward.socket exec "
    + " ".join(shlex.quote(word) for word in TWISTD)
    + " -n --pidfile= openai-forward --env-file /dev/null --port systemd:domain=INET:index=0"
)


class SystemdActivationTests(ProxyTestCase):
    """``twistd -n openai-forward --port systemd:domain=INET:index=0``
    serves a listening socket it inherited as descriptor 3."""

    if not sys.platform.startswith("linux"):
        skip = "systemd socket activation is Linux's"

    @defer.inlineCallbacks
    def test_inherited_socket(self):
        """A socket bound before twistd started (systemd's socket
        activation, descriptor 3) is the one it serves on, with the
        configured route, and SIGTERM stops it in order (exit 0)."""
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        port = listening.getsockname()[1]
        workdir = self.mktemp()
        os.makedirs(workdir)
        child = spawn(
            self,
            ["/bin/sh", "-c", _ACTIVATED],
            child_env(OPENAI_BASE_URL=f"http://127.0.0.1:{self.upstream_port}"),
            workdir,
            name="twistd (socket-activated)",
            child_fds={0: "w", 1: "r", 2: "r", 3: listening.fileno()},
        )
        # twistd says it serves the inherited socket (no "starting on" line:
        # it did not bind one).
        yield child.wait_for(rf"route / -> http://127\.0\.0\.1:{self.upstream_port}")
        client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        # The kernel queues the connection on the socket until twistd accepts.
        d = client.get(f"http://127.0.0.1:{port}/v1/models")
        child.ended.addCallback(lambda reason: (d.called or d.cancel(), reason)[1])
        try:
            response = yield d
        except defer.CancelledError:
            self.fail(f"twistd ended ({child.status()}); its last lines:\n{child.tail()}")
        self.assertEqual(json.loads((yield response.content()))["data"][0]["id"], "gpt-4o-mini")
        self.assertEqual(self.fake.seen[0].uri, b"/v1/models")
        child.signal("TERM")
        yield child.exited()
        assert_exit(self, child, 0)
