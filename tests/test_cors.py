"""
CORS for browser clients (:mod:`twisted_forward.cors`): preflights answered
by the proxy (no key, never forwarded, behind the IP gate), the CORS headers
on relayed answers and on the proxy's own errors, ``CORS_ORIGINS``.

The real HTTP parser is fed bytes on a StringTransport, on a
MemoryReactorClock.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from twisted_forward.config import ConfigError, load_config
from twisted_forward.cors import Cors, parse_cors_origins
from twisted_forward.site import build_root

from .test_head_checks import FK, PEER, HeadHarness, post_head
from .test_proxy_unit import FakeResponse

ORIGIN = b"http://chat.example:8080"

PREFLIGHT = (
    b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
    b"Origin: " + ORIGIN + b"\r\n"
    b"Access-Control-Request-Method: POST\r\n"
    b"Access-Control-Request-Headers: authorization, content-type\r\n\r\n"
)


def head_of(raw: bytes) -> Headers:
    """The header lines of the first answer in ``raw``."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    headers = Headers()
    for line in head:
        name, _, value = line.partition(b":")
        headers.addRawHeader(name.strip(), value.strip())
    return headers


class PreflightTests(HeadHarness):
    def test_preflight_answered_without_key(self):
        """A preflight (no credentials) gets 204 with the CORS headers, the
        requested headers echoed: never a 401, never forwarded."""
        channel, transport = self.send(PREFLIGHT)
        self.assertEqual(self.status(transport), 204)
        headers = head_of(transport.value())
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [b"*"])
        self.assertEqual(
            headers.getRawHeaders(b"access-control-allow-headers"),
            [b"authorization, content-type"],
        )
        self.assertIn(b"POST", headers.getRawHeaders(b"access-control-allow-methods")[0])
        self.assertEqual(headers.getRawHeaders(b"access-control-max-age"), [b"600"])
        self.assertIsNone(headers.getRawHeaders(b"vary"))
        self.assertEqual(self.upstream.calls, [])
        self.assertFalse(transport.disconnecting)

    def test_plain_options_still_needs_a_key(self):
        """An OPTIONS without Origin is not a preflight: it is forwarded
        like any request, behind the key."""
        channel, transport = self.send(
            b"OPTIONS /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n"
        )
        self.assertEqual(self.status(transport), 401)

    def test_relayed_answer_gets_cors_headers(self):
        """A cross-origin request's relayed answer carries the proxy's CORS
        headers, the upstream's own Access-Control-* replaced."""
        channel, transport = self.send(
            b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\nOrigin: " + ORIGIN + b"\r\n"
            b"Authorization: Bearer " + FK.encode() + b"\r\n\r\n"
        )
        response = FakeResponse(200, {
            b"content-type": [b"application/json"],
            b"access-control-allow-origin": [b"https://upstream.example"],
            b"x-request-id": [b"req-1"],
        }, length=2)
        self.upstream.calls[0].deferred.callback(response)
        response.protocol.dataReceived(b"{}")
        response.finish()
        headers = head_of(transport.value())
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [b"*"])
        exposed = headers.getRawHeaders(b"access-control-expose-headers")[0]
        for name in (b"x-request-id", b"x-ratelimit-remaining-tokens", b"retry-after"):
            self.assertIn(name, exposed)
        # The browser's Origin is not sent upstream.
        self.assertFalse(self.upstream.calls[0].headers.hasHeader(b"origin"))

    def test_own_error_gets_cors_headers(self):
        """The proxy's own 401 to a keyless cross-origin GET carries CORS
        headers, so the page can read the error."""
        channel, transport = self.send(
            b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\nOrigin: " + ORIGIN + b"\r\n\r\n"
        )
        self.assertEqual(self.status(transport), 401)
        self.assertEqual(
            head_of(transport.value()).getRawHeaders(b"access-control-allow-origin"), [b"*"]
        )

    def test_refusal_before_body_gets_cors_headers(self):
        """A cross-origin POST refused at its head (bad key, body unread)
        carries the CORS headers too."""
        channel, transport = self.send(post_head(b"Origin: " + ORIGIN + b"\r\n"))
        self.assertEqual(self.status(transport), 401)
        self.assertEqual(
            head_of(transport.value()).getRawHeaders(b"access-control-allow-origin"), [b"*"]
        )

    def test_same_origin_request_gets_none(self):
        """No Origin, no CORS headers."""
        channel, transport = self.send(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n")
        self.assertNotIn(b"access-control-", transport.value().lower())

    def test_admin_gets_no_cors(self):
        """The admin API is same-origin: its preflight is not answered as
        one, and its answers carry no CORS headers."""
        channel, transport = self.send(PREFLIGHT.replace(b"/v1/chat/completions", b"/_admin/api/keys"))
        self.assertNotEqual(self.status(transport), 204)
        self.assertNotIn(b"access-control-", transport.value().lower())


class ListedOriginsTests(HeadHarness):
    env = {**HeadHarness.env, "CORS_ORIGINS": "http://chat.example:8080, https://b.example"}

    def test_listed_origin_echoed_with_vary(self):
        """A listed origin is echoed back, with ``Vary: Origin``."""
        channel, transport = self.send(PREFLIGHT)
        headers = head_of(transport.value())
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [ORIGIN])
        self.assertEqual(headers.getRawHeaders(b"vary"), [b"Origin"])

    def test_other_origin_gets_no_allow_origin(self):
        """An origin not in the list gets no Allow-Origin (the browser
        blocks the page), and nothing is forwarded."""
        channel, transport = self.send(PREFLIGHT.replace(ORIGIN, b"https://evil.example"))
        self.assertEqual(self.status(transport), 204)
        headers = head_of(transport.value())
        self.assertIsNone(headers.getRawHeaders(b"access-control-allow-origin"))
        self.assertEqual(self.upstream.calls, [])


class NoCorsTests(HeadHarness):
    env = {**HeadHarness.env, "CORS_ORIGINS": "none"}

    def test_none_means_no_special_preflight(self):
        """``CORS_ORIGINS=none``: the preflight is an ordinary request (it
        needs a key) and no CORS header is added."""
        channel, transport = self.send(PREFLIGHT)
        self.assertEqual(self.status(transport), 401)
        self.assertNotIn(b"access-control-", transport.value().lower())


class ReloadTests(HeadHarness):
    def test_reload_reaches_kept_alive_connections(self):
        """A reload's new CORS_ORIGINS govern the next answers on a
        connection opened before it: the resource's answers and the
        channel's own refusals alike (each reads the site's settings as it
        answers, none keeps a copy)."""
        channel, transport = self.send(
            b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nOrigin: " + ORIGIN + b"\r\n\r\n"
        )
        self.assertEqual(head_of(transport.value()).getRawHeaders(b"access-control-allow-origin"), [b"*"])
        transport.clear()
        config = load_config({}, {**self.env, "OPENAI_BASE_URL": "http://upstream.test",
                                  "LOG_CHAT": "false", "CORS_ORIGINS": "https://b.example"}, None)
        self.site.serve(build_root(config, self.clock, upstream=self.upstream), config)
        channel.dataReceived(
            b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nOrigin: " + ORIGIN + b"\r\n\r\n"
        )
        answered = head_of(transport.value())
        self.assertEqual(self.status(transport), 200)
        self.assertIsNone(answered.getRawHeaders(b"access-control-allow-origin"))
        self.assertEqual(answered.getRawHeaders(b"vary"), [b"Origin"])
        transport.clear()
        channel.dataReceived(post_head(b"Origin: https://b.example\r\n"))
        refused = head_of(transport.value())
        self.assertEqual(self.status(transport), 401)
        self.assertEqual(refused.getRawHeaders(b"access-control-allow-origin"), [b"https://b.example"])
        self.assertEqual(refused.getRawHeaders(b"vary"), [b"Origin"])


class GatedPreflightTests(HeadHarness):
    env = {"IP_BLACKLIST": PEER}

    def test_ip_gate_applies_to_preflights(self):
        """A refused address's preflight gets the IP gate's 403."""
        channel, transport = self.send(PREFLIGHT)
        self.assertEqual(self.status(transport), 403)
        self.assertEqual(self.error_code(transport), "ip_not_allowed")


class SettingTests(SynchronousTestCase):
    def test_parse(self):
        """``*``, ``none`` and a list (normalised to lower case) parse."""
        self.assertEqual(parse_cors_origins("*"), ("*",))
        self.assertEqual(parse_cors_origins("None"), ())
        self.assertEqual(
            parse_cors_origins("https://A.example, http://b.example:81/"),
            ("https://a.example", "http://b.example:81"),
        )

    def test_bad_values_stop_startup(self):
        """A path, a bare host or ``*`` in a list stops start-up naming the
        setting."""
        for value in ("https://a.example/chat", "a.example", "*, https://a.example", ""):
            with self.assertRaises(ConfigError) as caught:
                load_config({}, {"CORS_ORIGINS": value} if value else {"CORS_ORIGINS": " "}, None)
            self.assertIn("CORS_ORIGINS", str(caught.exception))

    def test_default_is_any_origin(self):
        """The default is ``*``, as openai-forward."""
        self.assertEqual(load_config({}, {}, None).cors_origins, ("*",))
        self.assertTrue(Cors().enabled)
        self.assertFalse(Cors(()).enabled)
