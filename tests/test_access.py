"""
The IP gate: address parsing, the trusted-proxy walk, and the gate itself
(a head check, the one place the gate decides) driven through the real HTTP
parser on a StringTransport.
"""

from __future__ import annotations

import ipaddress
import json
import random
from typing import Optional

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from twisted_forward.access import (
    AccessGate,
    TrustedProxies,
    forwarded_hops,
    parse_node,
    resolve_client,
    x_forwarded_for_hops,
)
from twisted_forward.chat.recorder import ExchangeInfo
from twisted_forward.config import (
    ConfigError,
    load_config,
    parse_networks,
    parse_trusted_proxies,
)
from twisted_forward.site import ForwardSite, build_root, make_site
from twisted_forward.state import state_of
from twisted_forward.tap import ProxyService

ip = ipaddress.ip_address


def tcp(host: str, port: int = 40000):
    return (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)


def trusted(value: str) -> TrustedProxies:
    return TrustedProxies(parse_trusted_proxies(value))


def hdrs(**values) -> Headers:
    h = Headers()
    for name, value in values.items():
        for v in value if isinstance(value, list) else [value]:
            h.addRawHeader(name.replace("_", "-").encode(), v.encode("latin-1"))
    return h


class ParseNodeTests(SynchronousTestCase):
    def test_addresses(self):
        """IPv4 and IPv6 node values, with or without a port, bracketed or not, padded with
        spaces, and IPv4-mapped IPv6 all parse to the plain address (a mapped one to its
        IPv4 form), so the lists match however a proxy wrote it."""
        for text, expected in [
            ("192.0.2.1", "192.0.2.1"),
            (" 192.0.2.1 ", "192.0.2.1"),
            ("192.0.2.1:4711", "192.0.2.1"),
            ("2001:db8::1", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("[2001:db8::1]:4711", "2001:db8::1"),
            ("::ffff:192.0.2.1", "192.0.2.1"),
            ("[::ffff:192.0.2.1]:80", "192.0.2.1"),
        ]:
            self.assertEqual(parse_node(text), ip(expected), text)

    def test_garbage(self):
        """Names, partial or out-of-range addresses, bad ports, unbalanced brackets, zone
        ids, non-ASCII digits and NULs parse to None: nothing that is not an address can
        be matched against a list."""
        for text in [
            "", "unknown", "_hidden", "example.com", "192.0.2", "192.0.2.256", "01.2.3.4",
            "192.0.2.1:", "192.0.2.1:port", "192.0.2.1:123456", "192.0.2.1:80:80",
            "[192.0.2.1]", "[2001:db8::1", "[2001:db8::1]x", "[2001:db8::1]:", "2001:db8::1]",
            "fe80::1%eth0", "[fe80::1%25eth0]", "².2.3.4", "1.2.3.4\x00", "[]", ":",
        ]:
            self.assertIsNone(parse_node(text), repr(text))


class HeaderParsingTests(SynchronousTestCase):
    def test_x_forwarded_for(self):
        """X-Forwarded-For values across several header lines give one hop per
        comma-separated item, in order, with unknown, empty or undecodable items as None
        placeholders."""
        self.assertEqual(
            x_forwarded_for_hops([b"198.51.100.7, unknown,,[2001:db8::2]:9", b"10.0.0.1"]),
            [ip("198.51.100.7"), None, ip("2001:db8::2"), ip("10.0.0.1")],
        )
        self.assertEqual(x_forwarded_for_hops([b""]), [])
        self.assertEqual(x_forwarded_for_hops([b"\xff\xfe, 1.2.3.4"]), [None, ip("1.2.3.4")])

    def test_forwarded(self):
        """Forwarded (RFC 7239) gives the for= node of each element across header lines,
        case-blind, quoted or not, with quoted-pair escapes and ports removed; obfuscated
        or unknown nodes are None."""
        self.assertEqual(
            forwarded_hops(
                [
                    b'for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8:cafe::17]:4711"',
                    b'for=unknown, proto=https, for="_gazonk", for=198.51.100.1 ; host=x',
                ]
            ),
            [ip("192.0.2.60"), ip("2001:db8:cafe::17"), None, None, None, ip("198.51.100.1")],
        )
        self.assertEqual(forwarded_hops([b'for="\\1\\9\\2.0.2.1"']), [ip("192.0.2.1")])
        self.assertEqual(forwarded_hops([b"for=[2001:db8::9]:80"]), [ip("2001:db8::9")])
        self.assertEqual(forwarded_hops([b",, for=192.0.2.1 ,"]), [ip("192.0.2.1")])

    def test_malformed_forwarded(self):
        """A Forwarded header that breaks RFC 7239 (unclosed quote, two for= in one element,
        missing value, spaces around =, stray tokens, bad bytes) is refused whole (None),
        not read in part."""
        for value in [
            b'for="192.0.2.1', b"for=192.0.2.1;for=192.0.2.2", b"for", b"=1.2.3.4",
            b"for=", b"for = 1.2.3.4", b"for=1.2.3.4 x", b'for="a\\', b"for=1.2.3.4;;;\x00",
            b"f\xf6r=1.2.3.4",
        ]:
            self.assertIsNone(forwarded_hops([value]), value)


class ResolveTests(SynchronousTestCase):
    """The trusted-proxy walk."""

    def resolve(self, peer, trust="", **headers):
        return resolve_client(peer, hdrs(**headers), trusted(trust))

    def test_untrusted_peer_headers_ignored(self):
        """A peer that is not a trusted proxy is the client whatever X-Forwarded-For or
        Forwarded say: a client cannot claim another address."""
        client = self.resolve(tcp("203.0.113.5"), x_forwarded_for="10.0.0.1", forwarded="for=10.0.0.1")
        self.assertEqual((client.address, client.name), (ip("203.0.113.5"), "203.0.113.5"))
        client = self.resolve(tcp("203.0.113.5"), "10.0.0.0/8", x_forwarded_for="10.0.0.1")
        self.assertEqual(client.address, ip("203.0.113.5"))

    def test_spoofed_left_hops_ignored(self):
        """The client wrote the left part; the trusted proxy appended the
        client's real address: the real one wins."""
        client = self.resolve(
            tcp("10.0.0.2"), "10.0.0.0/8", x_forwarded_for="10.9.9.9, 1.1.1.1, 198.51.100.7"
        )
        self.assertEqual(client.address, ip("198.51.100.7"))

    def test_chained_trusted_proxies(self):
        """Behind a chain of trusted proxies the client is the rightmost untrusted hop; hops
        to its left (which the client itself may have written) are not believed."""
        client = self.resolve(
            tcp("10.0.0.2"), "10.0.0.0/8 192.168.0.0/16",
            x_forwarded_for="203.0.113.1, 198.51.100.7, 192.168.1.1, 10.0.0.3",
        )
        self.assertEqual(client.address, ip("198.51.100.7"))

    def test_all_hops_trusted_leftmost(self):
        """When every hop is a trusted proxy, the leftmost hop is the client."""
        client = self.resolve(tcp("10.0.0.2"), "10.0.0.0/8", x_forwarded_for="10.0.0.9, 10.0.0.3")
        self.assertEqual(client.address, ip("10.0.0.9"))

    def test_trusted_peer_without_header_is_client(self):
        """A trusted proxy that sends no forwarding header is itself the client."""
        self.assertEqual(self.resolve(tcp("10.0.0.2"), "10.0.0.0/8").address, ip("10.0.0.2"))

    def test_garbage_reached_is_unknown(self):
        """When the walk from the right reaches a hop that is not an address, the client is
        "unknown" with no address, so it can match no list entry."""
        for value in ["garbage", "198.51.100.7, unknown", "198.51.100.7, _obf", "", " , ",
                      "198.51.100.7, 10.0.0.1:x", "1.2.3.4 5.6.7.8"]:
            client = self.resolve(tcp("10.0.0.2"), "10.0.0.0/8", x_forwarded_for=value)
            self.assertEqual((client.address, client.name), (None, "unknown"), value)

    def test_garbage_left_of_client_ignored(self):
        """Garbage to the left of the rightmost untrusted hop does not matter: the walk
        stops at the client before reaching it."""
        client = self.resolve(tcp("10.0.0.2"), "10.0.0.0/8", x_forwarded_for="garbage, 198.51.100.7")
        self.assertEqual(client.address, ip("198.51.100.7"))

    def test_ipv6(self):
        """The walk works over IPv6 peers, trusted networks and hops (bracketed with port,
        or in Forwarded), including a link-local peer with a zone id."""
        client = self.resolve(
            tcp("2001:db8::10"), "2001:db8::/64",
            x_forwarded_for="2001:db8:ffff::1, [2001:db8::11]:443",
        )
        self.assertEqual(client.address, ip("2001:db8:ffff::1"))
        client = self.resolve(tcp("fe80::1%eth0"), "fe80::/10", forwarded='for="[2001:db8::5]"')
        self.assertEqual(client.address, ip("2001:db8::5"))

    def test_ipv4_mapped_peer(self):
        """A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d."""
        client = self.resolve(tcp("::ffff:10.0.0.2"), "10.0.0.0/8", x_forwarded_for="::ffff:198.51.100.7")
        self.assertEqual((client.address, client.name), (ip("198.51.100.7"), "198.51.100.7"))
        client = self.resolve(tcp("::ffff:203.0.113.5"))
        self.assertEqual(client.name, "203.0.113.5")
        # A trusted range written in the mapped form matches IPv4 peers.
        client = self.resolve(tcp("10.0.0.2"), "::ffff:10.0.0.0/104", x_forwarded_for="198.51.100.7")
        self.assertEqual(client.address, ip("198.51.100.7"))

    def test_unix_peer(self):
        """A unix-socket peer is the client "unix" with no address unless TRUSTED_PROXIES
        lists "unix": only then is its X-Forwarded-For believed (an IP entry does not
        trust it)."""
        peer = UNIXAddress(None)
        client = self.resolve(peer, "", x_forwarded_for="198.51.100.7")
        self.assertEqual((client.address, client.name), (None, "unix"))
        client = self.resolve(peer, "127.0.0.1", x_forwarded_for="198.51.100.7")
        self.assertEqual(client.address, None)
        client = self.resolve(peer, "unix", x_forwarded_for="198.51.100.7")
        self.assertEqual(client.address, ip("198.51.100.7"))
        client = self.resolve(peer, "unix")
        self.assertEqual((client.address, client.name), (None, "unix"))

    def test_forwarded_header(self):
        """Through a trusted proxy the Forwarded header alone gives the client (the
        rightmost untrusted for=); a malformed one, or one without for=, gives no
        address."""
        client = self.resolve(
            tcp("10.0.0.2"), "10.0.0.0/8",
            forwarded='for=10.9.9.9, for="198.51.100.7:1234";proto=https, for=10.0.0.5',
        )
        self.assertEqual(client.address, ip("198.51.100.7"))
        for value in ['for="198.51.100.7', "proto=https", "for=10.0.0.5;for=10.0.0.6"]:
            client = self.resolve(tcp("10.0.0.2"), "10.0.0.0/8", forwarded=value)
            self.assertIsNone(client.address, value)

    def test_both_headers_must_agree(self):
        """When a trusted proxy sends both X-Forwarded-For and Forwarded, the client is
        taken only if both name the same address; if they disagree there is no address
        (no choosing the convenient one)."""
        client = self.resolve(
            tcp("10.0.0.2"), "10.0.0.0/8",
            x_forwarded_for="198.51.100.7", forwarded="for=198.51.100.7",
        )
        self.assertEqual(client.address, ip("198.51.100.7"))
        client = self.resolve(
            tcp("10.0.0.2"), "10.0.0.0/8",
            x_forwarded_for="198.51.100.7", forwarded="for=10.1.1.1",
        )
        self.assertIsNone(client.address)

    def test_fuzz_never_raises_never_invents(self):
        """Random header bytes: no exception, and an address is only ever
        one that is written in the headers."""
        rng = random.Random(3)
        alphabet = b'0123456789abcdef.:[]", ;=_-%\\\t\xff' + b"for" * 3
        for _ in range(1500):
            values = {
                name: bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
                for name in (b"x-forwarded-for", b"forwarded")
                if rng.random() < 0.7
            }
            h = Headers({k: [v] for k, v in values.items()})
            client = resolve_client(tcp("10.0.0.2"), h, trusted("10.0.0.0/8"))
            if client.address is not None and values:
                text = b" ".join(values.values()).decode("latin-1").lower()
                self.assertTrue(
                    client.address == ip("10.0.0.2")
                    or client.address.compressed in text
                    or client.address.exploded in text
                    or str(client.address) in text
                    or "::ffff:" in text,
                    (values, client),
                )


class ConfigTests(SynchronousTestCase):
    def test_trusted_proxies_unix(self):
        """TRUSTED_PROXIES accepts "unix" (also "unix:") beside networks; a bad network is a
        ValueError and a host name stops start-up with a ConfigError."""
        self.assertEqual(
            parse_trusted_proxies("unix, 10.0.0.0/8 unix:"),
            ("unix", ipaddress.ip_network("10.0.0.0/8")),
        )
        self.assertRaises(ValueError, parse_trusted_proxies, "unix 1.2.3")
        self.assertRaises(ConfigError, load_config, {}, {"TRUSTED_PROXIES": "localhost"})


# ---------------------------------------------------------------- the gate


class Leaf(Resource):
    """Records what reached it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def render(self, request):
        self.seen.append((request.uri, request.prepath, request.postpath, state_of(request).client))
        request.setHeader(b"content-type", b"text/plain")
        return b"inside"


class GateHarness(SynchronousTestCase):
    def gate(self, allow="", deny="", trust="", wrapped=None, exempt=()):
        self.leaf = wrapped if wrapped is not None else Leaf()
        gate = AccessGate(
            parse_networks(allow), parse_networks(deny),
            parse_trusted_proxies(trust), exempt_paths=exempt,
        )
        self.site = ForwardSite(
            self.leaf, reactor=MemoryReactorClock(), timeout=None, head_checks=(gate,)
        )
        return gate

    def request(self, peer, target=b"/v1/models", headers=b"", method=b"GET", body=b"") -> StringTransport:
        channel = self.site.buildProtocol(None)
        transport = StringTransport(peerAddress=peer)
        channel.makeConnection(transport)
        if body:
            headers += b"Content-Length: %d\r\n" % len(body)
        channel.dataReceived(
            method + b" " + target + b" HTTP/1.1\r\nHost: proxy\r\n" + headers + b"\r\n" + body
        )
        return transport

    @staticmethod
    def status(transport) -> int:
        return int(transport.value().split(b" ", 2)[1])

    @staticmethod
    def body(transport) -> bytes:
        return transport.value().split(b"\r\n\r\n", 1)[1]

    def assertRefused(self, transport):
        self.assertEqual(self.status(transport), 403)
        error = json.loads(self.body(transport))["error"]
        self.assertEqual((error["code"], error["type"]), ("ip_not_allowed", "permission_error"))
        self.assertIn(b"content-type: application/json", transport.value().lower())


class GateTests(GateHarness):
    def test_no_lists_everyone_passes(self):
        """With neither IP_WHITELIST nor IP_BLACKLIST every peer (IPv4, IPv6, unix) is
        served, and the resource sees each client's name."""
        self.gate()
        for peer in (tcp("203.0.113.5"), tcp("2001:db8::1"), UNIXAddress(None)):
            self.assertEqual(self.status(self.request(peer)), 200)
        self.assertEqual([s[3] for s in self.leaf.seen], ["203.0.113.5", "2001:db8::1", "unix"])

    def test_whitelist(self):
        """With IP_WHITELIST only listed networks or addresses (IPv4, IPv6, IPv4-mapped) are
        served; others and unix peers are refused with 403 and never reach the resource."""
        self.gate(allow="10.0.0.0/8, 2001:db8::/32 192.0.2.7")
        for peer in (tcp("10.1.2.3"), tcp("2001:db8::1"), tcp("192.0.2.7"), tcp("::ffff:10.0.0.1")):
            self.assertEqual(self.status(self.request(peer)), 200, peer)
        for peer in (tcp("11.0.0.1"), tcp("2001:db9::1"), tcp("192.0.2.8"), UNIXAddress(None)):
            self.assertRefused(self.request(peer))
        self.assertEqual(len(self.leaf.seen), 4)

    def test_blacklist(self):
        """With IP_BLACKLIST listed networks are refused (also as IPv4-mapped IPv6, and ::1)
        and everyone else is served."""
        self.gate(deny="203.0.113.0/24 ::1")
        self.assertRefused(self.request(tcp("203.0.113.9")))
        self.assertRefused(self.request(tcp("::ffff:203.0.113.9")))
        self.assertRefused(self.request(tcp("::1")))
        self.assertEqual(self.status(self.request(tcp("198.51.100.1"))), 200)

    def test_deny_wins_over_allow(self):
        """An address in both lists is refused: the blacklist carves holes in the whitelist."""
        self.gate(allow="10.0.0.0/8", deny="10.6.6.0/24")
        self.assertRefused(self.request(tcp("10.6.6.6")))
        self.assertEqual(self.status(self.request(tcp("10.7.7.7"))), 200)

    def test_spoofed_header_from_untrusted_peer(self):
        """An untrusted peer outside the whitelist is refused even when X-Forwarded-For,
        Forwarded and X-Real-IP all claim a listed address."""
        self.gate(allow="10.0.0.0/8")
        t = self.request(
            tcp("203.0.113.5"),
            headers=b"X-Forwarded-For: 10.0.0.1\r\nForwarded: for=10.0.0.1\r\nX-Real-IP: 10.0.0.1\r\n",
        )
        self.assertRefused(t)

    def test_behind_trusted_proxy(self):
        """Behind a trusted proxy the gate judges the forwarded client, not the proxy: a
        listed client passes (and is the name the resource sees), an unlisted one is
        refused, and the proxy itself is refused when it sends no header."""
        self.gate(allow="198.51.100.0/24", trust="127.0.0.1 ::1")
        t = self.request(tcp("127.0.0.1"), headers=b"X-Forwarded-For: 10.0.0.1, 198.51.100.7\r\n")
        self.assertEqual(self.status(t), 200)
        self.assertEqual(self.leaf.seen[-1][3], "198.51.100.7")
        t = self.request(tcp("::1"), headers=b"X-Forwarded-For: 198.51.100.7, 203.0.113.1\r\n")
        self.assertRefused(t)
        # The trusted proxy itself is not in the whitelist.
        self.assertRefused(self.request(tcp("127.0.0.1")))

    def test_garbage_never_grants(self):
        """With either list set, a garbage or contradictory forwarding header from a trusted
        proxy is refused and never reaches the resource: an unknown client cannot pass a
        whitelist nor slip past a blacklist."""
        for allow, deny in (("198.51.100.0/24", ""), ("", "203.0.113.0/24")):
            self.gate(allow=allow, deny=deny, trust="127.0.0.1")
            for header in (
                b"X-Forwarded-For: 198.51.100.7 garbage\r\n",
                b"X-Forwarded-For: unknown\r\n",
                b"X-Forwarded-For:\r\n",
                b"Forwarded: for=\"198.51.100.7\r\n",
                b"Forwarded: for=198.51.100.7\r\nX-Forwarded-For: 198.51.100.8\r\n",
                b"X-Forwarded-For: \xff\xfe\xfd\r\n",
            ):
                t = self.request(tcp("127.0.0.1"), headers=header)
                self.assertRefused(t)
                self.assertEqual(self.leaf.seen, [])

    def test_garbage_without_lists_passes_as_unknown(self):
        """With no lists, a garbage forwarding header is served, the client named "unknown"
        (there is nothing to refuse it on)."""
        self.gate(trust="127.0.0.1")
        t = self.request(tcp("127.0.0.1"), headers=b"X-Forwarded-For: nonsense\r\n")
        self.assertEqual(self.status(t), 200)
        self.assertEqual(self.leaf.seen[-1][3], "unknown")

    def test_unix_socket_peer(self):
        """A unix-socket peer is refused by a whitelist even with a listed X-Forwarded-For,
        unless TRUSTED_PROXIES has "unix"; then its forwarded client is judged, and
        without a header it is refused."""
        self.gate(allow="198.51.100.0/24")
        self.assertRefused(self.request(UNIXAddress(None), headers=b"X-Forwarded-For: 198.51.100.7\r\n"))
        self.gate(allow="198.51.100.0/24", trust="unix")
        t = self.request(UNIXAddress(b"/run/x.sock"), headers=b"X-Forwarded-For: 198.51.100.7\r\n")
        self.assertEqual(self.status(t), 200)
        self.assertRefused(self.request(UNIXAddress(None)))

    def test_head_refused_without_body(self):
        """A refused HEAD request gets 403 with an empty body, as HTTP requires for HEAD."""
        self.gate(deny="203.0.113.0/24")
        t = self.request(tcp("203.0.113.9"), method=b"HEAD")
        self.assertEqual(self.status(t), 403)
        self.assertEqual(self.body(t), b"")

    def test_refusal_logged_without_headers(self):
        """A refusal is logged with the client's address and the reason ("not in
        IP_WHITELIST"), not with the spoofed header it sent."""
        self.gate(allow="10.0.0.0/8")
        with capturedLogs() as events:
            self.request(tcp("203.0.113.5"), headers=b"X-Forwarded-For: 10.0.0.1\r\n")
        [event] = [e for e in events if e.get("log_format", "").startswith("refused")]
        self.assertEqual((event["client"], event["why"]), ("203.0.113.5", "not in IP_WHITELIST"))

    def test_tree_traversal_untouched(self):
        """The gate decides on the head and leaves traversal alone: the tree
        sees the full path, split by Twisted as usual."""
        root = Resource()
        child = Leaf()
        root.putChild(b"v1", child)
        self.gate(allow="10.0.0.0/8", wrapped=root)
        self.assertEqual(self.status(self.request(tcp("10.0.0.1"), b"/v1/x/y")), 200)
        self.assertEqual(child.seen, [(b"/v1/x/y", [b"v1"], [b"x", b"y"], "10.0.0.1")])
        self.assertRefused(self.request(tcp("11.0.0.1"), b"/v1/x/y"))
        self.assertEqual(len(child.seen), 1)

    def test_exempt_paths(self):
        """An exempt path (the health check) passes the gate exactly, with or without a
        query; lookalikes (trailing slash, suffix, prefix, double slash) are still
        refused."""
        self.gate(allow="10.0.0.0/8", exempt=[b"/healthz"])
        self.assertEqual(self.status(self.request(tcp("11.0.0.1"), b"/healthz")), 200)
        self.assertEqual(self.status(self.request(tcp("11.0.0.1"), b"/healthz?probe=1")), 200)
        for target in (b"/healthz/", b"/healthzx", b"/x/healthz", b"//healthz"):
            self.assertRefused(self.request(tcp("11.0.0.1"), target))


# ------------------------------------------------------- with the real tree


class RecordingUpstream:
    """An upstream that records requests and never answers."""

    def __init__(self) -> None:
        self.calls: list = []

    def request(self, method, url, headers, body) -> Deferred:
        self.calls.append((method, url, headers))
        return Deferred()

    def close(self) -> Deferred:
        return succeed(None)


class Recorder:
    def __init__(self) -> None:
        self.infos: list[ExchangeInfo] = []

    def begin(self, info: ExchangeInfo) -> Optional[object]:
        self.infos.append(info)
        return None


class BuiltTreeTests(GateHarness):
    def build(self, **env):
        self.upstream = RecordingUpstream()
        self.recorder = Recorder()
        config = load_config({}, {"OPENAI_BASE_URL": "http://upstream.test", **env})
        built = build_root(config, MemoryReactorClock(), self.recorder, self.upstream)
        self.site = make_site(built, config, MemoryReactorClock(), timeout=None)
        return built

    def test_refusal_never_reaches_upstream(self):
        """In the built tree, a blacklisted client's POST is refused before any upstream
        request is made, while an allowed client's request goes upstream."""
        self.build(IP_BLACKLIST="203.0.113.0/24", OPENAI_API_KEY="sk-default-000000000")
        self.assertRefused(
            self.request(tcp("203.0.113.9"), b"/v1/chat/completions", method=b"POST", body=b"{}")
        )
        self.assertEqual(self.upstream.calls, [])
        self.request(tcp("198.51.100.9"))
        self.assertEqual(len(self.upstream.calls), 1)

    def test_one_layer(self):
        """The gate is the site's first head check and nothing else: the
        resource tree holds no second gate, so a site serving the tree
        without the head checks would not refuse (every listener is built
        with them: tests/test_gate_listeners.py)."""
        built = self.build(IP_BLACKLIST="203.0.113.0/24")
        self.assertIs(built.head_checks[0], built.gate)
        self.assertIsInstance(built.gate, AccessGate)
        self.assertEqual(tuple(self.site.head_checks), built.head_checks)
        self.assertRefused(self.request(tcp("203.0.113.9")))
        self.assertEqual(self.upstream.calls, [])
        self.site = ForwardSite(built.root, reactor=MemoryReactorClock(), timeout=None)
        self.request(tcp("203.0.113.9"))
        self.assertEqual(len(self.upstream.calls), 1)

    def test_reload_reaches_kept_alive_connections(self):
        """A reload's new lists refuse the next request on a connection
        opened before it, not only on new connections."""
        self.build()
        channel = self.site.buildProtocol(None)
        transport = StringTransport(peerAddress=tcp("203.0.113.9"))
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
        self.assertEqual(self.status(transport), 200)
        transport.clear()
        config = load_config({}, {"OPENAI_BASE_URL": "http://upstream.test",
                                  "IP_BLACKLIST": "203.0.113.0/24"})
        self.site.serve(build_root(config, MemoryReactorClock(), None, self.upstream), config)
        channel.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n")
        self.assertRefused(transport)
        self.assertEqual(self.upstream.calls, [])

    def test_health_check_exempt(self):
        """The health check answers {"status": "ok"} to a refused address, at /healthz and
        under ROUTE_PREFIX, while API paths stay refused and nothing goes upstream."""
        self.build(IP_WHITELIST="10.0.0.0/8", ROUTE_PREFIX="/openai")
        for target in (b"/healthz", b"/openai/healthz"):
            t = self.request(tcp("203.0.113.9"), target)
            self.assertEqual(self.status(t), 200)
            self.assertEqual(json.loads(self.body(t)), {"status": "ok"})
        self.assertRefused(self.request(tcp("203.0.113.9"), b"/openai/v1/models"))
        self.assertEqual(self.upstream.calls, [])

    def test_health_path_setting_followed(self):
        """HEALTHZ_PATH moves the exemption: the configured path is reachable by a refused
        address and /healthz no longer is."""
        self.build(IP_WHITELIST="10.0.0.0/8", HEALTHZ_PATH="/ready")
        self.assertEqual(self.status(self.request(tcp("203.0.113.9"), b"/ready")), 200)
        self.assertRefused(self.request(tcp("203.0.113.9"), b"/healthz"))

    def test_client_address_in_chat_record(self):
        """The chat record gets the resolved client address (the forwarded one behind a
        trusted proxy, the IPv4 form of a mapped one) and the key's label; an unlabelled
        forward key is recorded as a fingerprint, never by its text."""
        self.build(TRUSTED_PROXIES="127.0.0.1", OPENAI_API_KEY="sk-default-000000000",
                   FORWARD_KEY="alice:fk-alice-00000000 fk-anon-00000000")
        self.request(tcp("127.0.0.1"), headers=b"X-Forwarded-For: 198.51.100.7\r\n"
                     b"Authorization: Bearer fk-alice-00000000\r\n")
        self.request(tcp("::ffff:203.0.113.4"), headers=b"Authorization: Bearer fk-anon-00000000\r\n")
        self.assertEqual([i.client for i in self.recorder.infos], ["198.51.100.7", "203.0.113.4"])
        self.assertEqual(self.recorder.infos[0].key_label, "alice")
        self.assertTrue(self.recorder.infos[1].key_label.startswith("fk#"))
        self.assertNotIn("anon", self.recorder.infos[1].key_label)

    def test_key_label_on_every_request_for_the_access_log(self):
        """The access log gets the client and a key label for every request, refused ones
        included (label "refused"), and a refused key never goes upstream."""
        logged = []

        class Site(ForwardSite):
            def log(self, request):
                logged.append((state_of(request).client, state_of(request).key_label))

        self.build(OPENAI_API_KEY="sk-default-000000000", FORWARD_KEY="alice:fk-alice-00000000")
        self.site = Site(self.site.resource, reactor=MemoryReactorClock(), timeout=None,
                         head_checks=self.site.head_checks)
        self.request(tcp("198.51.100.9"), headers=b"Authorization: Bearer fk-wrong-00000000\r\n")
        self.request(tcp("198.51.100.9"), headers=b"Authorization: Bearer sk-own\r\n")
        self.assertEqual(logged[0], ("198.51.100.9", "refused"))
        self.assertEqual(len(self.upstream.calls), 1)

    def test_access_line_route_key_and_error(self):
        """Each request's access line gets its key's label whichever stage
        decided on the key, and the route only once past the key rules: a key
        refused at the head (answered without a render) or at the render (a
        site without the head checks) has route "-"; a policy refusal and a
        forwarded request whose client left have the route, with their
        error codes."""
        logged: list[tuple[str, str, Optional[str], int]] = []

        class Site(ForwardSite):
            def access_line(self, request):
                state = state_of(request)
                logged.append((state.route, state.key_label, state.error, request.code))
                return super().access_line(request)

        built = self.build(OPENAI_API_KEY="sk-default-000000000", FORWARD_KEY="alice:fk-alice-00000000",
                           KEY_POLICY=json.dumps({"alice": {"rpm": 1}}))
        bad = b"Authorization: Bearer fk-wrong-00000000\r\n"
        alice = b"Authorization: Bearer fk-alice-00000000\r\n"
        self.site = Site(built.root, reactor=MemoryReactorClock(), timeout=None,
                         head_checks=built.head_checks)
        self.request(tcp("198.51.100.9"), headers=bad)
        channel = self.site.buildProtocol(None)
        channel.makeConnection(StringTransport(peerAddress=tcp("198.51.100.9")))
        channel.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n" + alice + b"\r\n")
        self.assertEqual(len(self.upstream.calls), 1)  # and no answer yet
        self.request(tcp("198.51.100.9"), headers=alice)
        channel.connectionLost(Failure(ConnectionDone()))
        self.site = Site(built.root, reactor=MemoryReactorClock(), timeout=None)
        self.request(tcp("198.51.100.9"), headers=bad)
        self.assertEqual(logged, [
            ("-", "refused", "invalid_api_key", 401),
            ("/", "alice", "rate_limit_exceeded", 429),
            ("/", "alice", "client_left", 499),
            ("-", "refused", "invalid_api_key", 401),
        ])

    def test_key_refusal_before_upstream(self):
        """A missing key, an unknown forward key (in Authorization or Api-Key) or a forward
        key without "Bearer" gets 401 invalid_api_key in OpenAI's shape, echoes no
        forward key, and sends nothing upstream."""
        self.build(OPENAI_API_KEY="sk-default-000000000", FORWARD_KEY="fk-good-00000000")
        for auth in (b"", b"Authorization: Bearer fk-bad-000000000\r\n", b"Api-Key: fk-bad-0000000\r\n",
                     b"Authorization: fk-good-00000000\r\n"):
            t = self.request(tcp("198.51.100.9"), headers=auth)
            self.assertEqual(self.status(t), 401)
            error = json.loads(self.body(t))["error"]
            self.assertEqual((error["code"], error["type"]), ("invalid_api_key", "invalid_request_error"))
            self.assertNotIn(b"fk-", self.body(t).replace(b"fk-\\u2026", b""))
        self.assertEqual(self.upstream.calls, [])


class GeneralRouteTests(GateHarness):
    """general routes spend no key of ours, and never forward a forward key."""

    def test_general_route(self):
        """On a general route a forward key is refused with 401 (it is ours, not the other
        service's), a keyless request goes with no Authorization, and the client's own
        X-Api-Key is passed through untouched."""
        upstream = RecordingUpstream()
        config = load_config({}, {
            "OPENAI_API_KEY": "sk-default-000000000", "FORWARD_KEY": "fk-good-00000000",
            "FORWARD_CONFIG": '[{"base_url": "http://other.test", "route": "/other", "type": "general"}]',
        })
        built = build_root(config, MemoryReactorClock(), None, upstream)
        self.site = make_site(built, config, MemoryReactorClock(), timeout=None)
        t = self.request(tcp("198.51.100.9"), b"/other/x", b"Authorization: Bearer fk-good-00000000\r\n")
        self.assertEqual(self.status(t), 401)
        self.assertEqual(upstream.calls, [])
        self.request(tcp("198.51.100.9"), b"/other/x")
        self.request(tcp("198.51.100.9"), b"/other/x", b"X-Api-Key: other-service-key\r\n")
        [(_, _, keyless), (_, _, own)] = upstream.calls
        self.assertIsNone(keyless.getRawHeaders(b"authorization"))
        self.assertEqual(own.getRawHeaders(b"x-api-key"), [b"other-service-key"])


class StartupWarningTests(SynchronousTestCase):
    """The open-relay warning, from the service that starts the proxy."""

    def warnings(self, **env) -> list[str]:
        config = load_config({}, {"OPENAI_BASE_URL": "http://upstream.test", **env})
        clock = MemoryReactorClock()
        service = ProxyService(build_root(config, clock, upstream=RecordingUpstream()), config, clock)
        with capturedLogs() as events:
            service.startService()
        from twisted.logger import LogLevel, formatEvent

        return [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]

    def test_open_relay_warned(self):
        """With default keys and no FORWARD_KEY, start-up warns that anyone who can reach
        the port spends the OpenAI keys, names FORWARD_KEY as the fix, and does not print
        the key."""
        [warning] = self.warnings(OPENAI_API_KEY="sk-default-000000000")
        self.assertIn("anyone who can reach this port spends your OpenAI keys", warning)
        self.assertIn("FORWARD_KEY", warning)
        self.assertNotIn("sk-default", warning)

    def test_no_warning_with_forward_keys_or_without_keys(self):
        """No open-relay warning when forward keys guard the default keys, nor when there
        are no default keys to spend."""
        self.assertEqual(
            self.warnings(OPENAI_API_KEY="sk-default-000000000", FORWARD_KEY="fk-good-00000000"), []
        )
        self.assertEqual(self.warnings(), [])
