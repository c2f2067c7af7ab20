"""
The IP gate: who the client is, and whether it may use the proxy.

The client's address is the TCP peer's.  Only when the peer is a trusted
proxy (TRUSTED_PROXIES) are its ``X-Forwarded-For`` and ``Forwarded``
headers believed, and then only as far as they go through trusted hops:
the hops are walked right to left (the rightmost was written by the peer
itself) and the first hop that is not a trusted proxy is the client.
Everything to its left was written by the client or by proxies nobody
vouches for, so it is never looked at: a client cannot choose its address.

When the address cannot be known (a malformed or ``unknown`` hop, both
headers present and disagreeing, a unix-socket peer that is not trusted)
the client is refused whenever an allow or deny list is set: bad input
never grants access.

The gate is one head check (:mod:`twisted_forward.headcheck`) that every
listener's channel runs on each request head, before any body is read and
before any routing: a refusal (403, OpenAI-shaped) happens there and only
there, and nothing reaches the upstream.  The health check paths are exempt,
so orchestrators can probe from anywhere.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from zope.interface import implementer

from .config import UNIX_PEERS, IPNetwork, TrustedProxy
from .framing import IP_NOT_ALLOWED, Refusal
from .headcheck import IHeadCheck
from .state import state_of
from .target import BadTarget, split_target

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

#: The client name when the address cannot be known.
UNKNOWN = "unknown"
#: The client name of a unix-socket peer with no (believed) forwarding header.
UNIX = "unix"

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


@dataclass(frozen=True)
class Client:
    """Who a request came from, as far as the gate can tell.

    :ivar address: the client's IP address, None when unknown.
    :ivar name: the address as text for logs and chat records, or
        ``unix`` / ``unknown``.
    :ivar why: for an unknown address, why (for the refusal's log line).
    """

    address: Optional[IPAddress]
    name: str
    why: str = ""


def _unknown(why: str) -> Client:
    return Client(None, UNKNOWN, why)


def _client(address: IPAddress) -> Client:
    return Client(address, str(address))


def normalise_address(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, what a dual-stack
    socket reports for an IPv4 client) as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normalise_network(network: IPNetwork) -> IPNetwork:
    """An IPv6 range inside ``::ffff:0:0/96`` as the IPv4 range it maps."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        return ipaddress.IPv4Network(
            (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
        )
    return network


def parse_node(text: str) -> Optional[IPAddress]:
    """The IP address in one forwarding hop, or None if there is none.

    Takes what proxies write in X-Forwarded-For and in Forwarded's ``for=``:
    ``192.0.2.1``, ``192.0.2.1:4711``, ``2001:db8::1``, ``[2001:db8::1]``,
    ``[2001:db8::1]:4711``.  ``unknown``, obfuscated names (``_hidden``),
    zone ids and anything else are None.
    """
    text = text.strip()
    if not text.isascii() or "%" in text:
        return None
    host = text
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1 :]
        if rest and not _is_port_suffix(rest):
            return None
        if ":" not in host:
            return None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not _is_port_suffix(":" + port):
            return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return normalise_address(address)


def _is_port_suffix(text: str) -> bool:
    digits = text[1:]
    return text[:1] == ":" and 0 < len(digits) <= 5 and digits.isdigit()


def _joined(values: Sequence[bytes]) -> str:
    """Field lines of one header, combined as RFC 9110 §5.3 allows."""
    return ",".join(v.decode("latin-1") for v in values)


def x_forwarded_for_hops(values: Sequence[bytes]) -> list[Optional[IPAddress]]:
    """The hops of X-Forwarded-For header(s), left to right.

    Empty list elements are skipped (RFC 9110 §5.6.1); a hop that is not an
    address is None.
    """
    return [parse_node(item) for item in _joined(values).split(",") if item.strip()]


_TCHAR = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class _Malformed(ValueError):
    pass


def _forwarded_elements(text: str) -> list[dict[str, str]]:
    """Parse RFC 7239 ``Forwarded`` into its elements' parameters.

    :raises _Malformed: on a syntax error or a repeated parameter.
    """
    elements: list[dict[str, str]] = []
    pairs: dict[str, str] = {}
    i, n = 0, len(text)

    def skip_ows(i: int) -> int:
        while i < n and text[i] in " \t":
            i += 1
        return i

    while True:
        i = skip_ows(i)
        if i < n and text[i] not in ",;":
            start = i
            while i < n and text[i] in _TCHAR:
                i += 1
            name = text[start:i].lower()
            if not name or i >= n or text[i] != "=":
                raise _Malformed("parameter name")
            i += 1
            if i < n and text[i] == '"':
                i += 1
                chars = []
                while True:
                    if i >= n:
                        raise _Malformed("unterminated quoted string")
                    c = text[i]
                    if c == "\\":
                        if i + 1 >= n:
                            raise _Malformed("dangling escape")
                        chars.append(text[i + 1])
                        i += 2
                    elif c == '"':
                        i += 1
                        break
                    else:
                        chars.append(c)
                        i += 1
                value = "".join(chars)
            else:
                # A token; ':' and brackets are let through, as some proxies
                # write for=[2001:db8::1]:80 unquoted.
                start = i
                while i < n and (text[i] in _TCHAR or text[i] in ":[]"):
                    i += 1
                value = text[start:i]
                if not value:
                    raise _Malformed("empty value")
            if name in pairs:
                raise _Malformed("repeated parameter")
            pairs[name] = value
            i = skip_ows(i)
        if i >= n:
            if pairs:
                elements.append(pairs)
            return elements
        if text[i] == ";":
            i += 1
        elif text[i] == ",":
            if pairs:
                elements.append(pairs)
            pairs = {}
            i += 1
        else:
            raise _Malformed("unexpected character")


def forwarded_hops(values: Sequence[bytes]) -> Optional[list[Optional[IPAddress]]]:
    """The ``for=`` hops of Forwarded header(s), left to right.

    A hop without ``for=`` or with no address in it is None; the whole
    header is None when it cannot be parsed.
    """
    try:
        elements = _forwarded_elements(_joined(values))
    except _Malformed:
        return None
    return [parse_node(e["for"]) if "for" in e else None for e in elements]


class TrustedProxies:
    """Which peers and hops are proxies whose forwarding headers we believe."""

    def __init__(self, entries: Iterable[TrustedProxy]) -> None:
        entries = list(entries)
        self.unix = UNIX_PEERS in entries
        self.networks = tuple(
            normalise_network(e) for e in entries if not isinstance(e, str)
        )

    def __bool__(self) -> bool:
        return self.unix or bool(self.networks)

    def __contains__(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


@functools.lru_cache(maxsize=4096)
def _parse_peer(host: str) -> Union[IPAddress, str]:
    # Parsing an address is a few microseconds, on every request; clients
    # come back, so the recent ones are kept.
    try:
        return normalise_address(ipaddress.ip_address(host))
    except ValueError:
        return UNKNOWN


def peer_address(peer: Optional[IAddress]) -> Union[IPAddress, str]:
    """The TCP peer's IP address, :data:`UNIX` for a unix socket, else
    :data:`UNKNOWN`."""
    if isinstance(peer, (IPv4Address, IPv6Address)):
        return _parse_peer(peer.host)
    if isinstance(peer, UNIXAddress):
        return UNIX
    return UNKNOWN


def _walk(hops: list[Optional[IPAddress]], trusted: TrustedProxies) -> Client:
    """Right to left, the first hop that is not a trusted proxy."""
    if not hops:
        return _unknown("empty forwarding header")
    for hop in reversed(hops):
        if hop is None:
            return _unknown("a forwarding hop with no address")
        if hop not in trusted:
            return _client(hop)
    first = hops[0]
    assert first is not None  # the loop above returned on any None hop
    return _client(first)  # every hop is a trusted proxy: the first one asked


def resolve_client(
    peer: Optional[IAddress], headers: Headers, trusted: TrustedProxies
) -> Client:
    """Who the client is: the peer, or what trusted proxies say it is."""
    address = peer_address(peer)
    if isinstance(address, str):
        peer_trusted = address == UNIX and trusted.unix
    else:
        peer_trusted = address in trusted
    if not peer_trusted:
        if isinstance(address, str):
            return Client(None, address, f"a {address} peer")
        return _client(address)
    xff = headers.getRawHeaders(b"x-forwarded-for")
    fwd = headers.getRawHeaders(b"forwarded")
    if xff is None and fwd is None:
        if isinstance(address, str):
            return Client(None, address, "a unix peer with no forwarding header")
        return _client(address)
    found: list[Client] = []
    if xff is not None:
        found.append(_walk(x_forwarded_for_hops(xff), trusted))
    if fwd is not None:
        hops = forwarded_hops(fwd)
        found.append(
            _walk(hops, trusted) if hops is not None else _unknown("malformed Forwarded")
        )
    for client in found:
        if client.address is None:
            return client
    if len(found) == 2 and found[0].address != found[1].address:
        return _unknown("X-Forwarded-For and Forwarded disagree")
    return found[0]


@implementer(IHeadCheck)
class AccessGate:
    """The IP gate: allowed clients go on, others get 403.

    It is a head check (:mod:`twisted_forward.headcheck`), and the only
    place the gate decides: every listener's channel runs it on each request
    head before anything else sees the request (the proxy's port and its
    workers', TLS and unix listeners, METRICS_PORT and ADMIN_PORT), so a
    refused client sends no body and gets no ``100 Continue``.

    Sets the request state's ``client`` (a str) to the resolved client
    address on every request, allowed or not, for logs and chat records.

    :param allow: IP_WHITELIST; when not empty, only these may connect.
    :param deny: IP_BLACKLIST; these are refused (deny wins over allow).
    :param trusted: TRUSTED_PROXIES.
    :param exempt_paths: raw paths served to everyone (the health check).
    """

    log = Logger()

    def __init__(
        self,
        allow: Sequence[IPNetwork],
        deny: Sequence[IPNetwork],
        trusted: Sequence[TrustedProxy],
        exempt_paths: Iterable[bytes] = (),
    ) -> None:
        self.allow = tuple(normalise_network(n) for n in allow)
        self.deny = tuple(normalise_network(n) for n in deny)
        self.trusted = TrustedProxies(trusted)
        self.exempt_paths = frozenset(exempt_paths)

    def refusal(self, client: Client) -> Optional[str]:
        """Why ``client`` may not pass, or None if it may."""
        if not (self.allow or self.deny):
            return None
        address = client.address
        if address is None:
            return f"address unknown ({client.why})"
        if any(address in n for n in self.deny):
            return "in IP_BLACKLIST"
        if self.allow and not any(address in n for n in self.allow):
            return "not in IP_WHITELIST"
        return None

    def _exempt(self, request: IRequest) -> bool:
        if not self.exempt_paths:
            return False
        try:
            path, _ = split_target(request.uri)
        except BadTarget:
            return False
        return path in self.exempt_paths

    def _resolve(self, request: IRequest) -> Client:
        try:
            return resolve_client(
                request.getClientAddress(), request.requestHeaders, self.trusted
            )
        except Exception:
            # Never expected; never a way in either.
            self.log.failure("resolving the client address failed")
            return _unknown("resolution failed")

    def check_head(self, request: IRequest) -> Optional[Refusal]:
        """Resolve the client (into the request's state) and refuse it with
        403 when the lists say so; the exempt paths (the health check) are
        served to everyone."""
        client = self._resolve(request)
        state_of(request).client = client.name
        why = self.refusal(client)
        if why is None or self._exempt(request):
            return None
        self.log.info(
            "refused {client} ({why}): {method} {path}",
            client=client.name,
            why=why,
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
        )
        return IP_NOT_ALLOWED
