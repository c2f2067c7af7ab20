"""
Guards against a proxy that forwards to itself.

At start-up
    :func:`own_address_conflict` refuses an upstream whose address is the
    proxy's own listening address (``OPENAI_BASE_URL=http://127.0.0.1:9999``
    exported for the SDK, with ``--port 9999``): every request would come
    back, and each round opens another connection until descriptors run out.

At run time
    Loops through names, other interfaces or another proxy cannot all be
    seen at start-up.  Every request forwarded carries this process's hop
    marker (:data:`HOP_HEADER`, a random token drawn when the process
    starts), added after those of the proxies it came through; a request
    arriving with the marker of this very process has gone round (through
    however many other processes: workers, other proxies), and is answered
    ``508 loop_detected`` instead of being sent again; so is one that has
    been through :data:`MAX_HOPS` proxies.  The token is random and says
    nothing about the client; the real upstream sees it, and may ignore it.

Base URLs ending in ``/v1``
    The proxy forwards the client's path as it comes (``/v1/chat/completions``),
    so a base URL ``https://host/v1`` would ask for ``/v1/v1/…``.
    :func:`join_path` drops the duplicate ``/v1`` (a client that leaves
    ``/v1`` out of its paths still gets it from the base), and
    :func:`base_v1_notes` says so at start-up.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Iterable, Optional, Sequence

from twisted.web.http_headers import Headers

from .config import Route

#: The hop marker's header.
HOP_HEADER = b"x-forward-hop"
#: This process's marker.
HOP_TOKEN = os.urandom(12).hex().encode("ascii")


#: A request that has been through this many proxies is refused as a loop.
MAX_HOPS = 10


def _tokens(headers: Headers) -> list[bytes]:
    return [
        token.strip()
        for value in headers.getRawHeaders(HOP_HEADER) or ()
        for token in value.split(b",")
        if token.strip()
    ]


def mark(headers: Headers) -> None:
    """Add this process's hop marker to a request going upstream, after the
    markers of the proxies it came through."""
    tokens = _tokens(headers)[-(MAX_HOPS - 1):] + [HOP_TOKEN]
    headers.setRawHeaders(HOP_HEADER, [b", ".join(tokens)])


def is_loop(headers: Headers) -> bool:
    """Whether a request arriving here has been through this very process
    already (or through :data:`MAX_HOPS` proxies)."""
    tokens = _tokens(headers)
    return HOP_TOKEN in tokens or len(tokens) >= MAX_HOPS


def _addresses(host: str) -> set[str]:
    """The IP addresses ``host`` stands for (an IP literal, or a name
    resolved now); empty if it cannot be resolved."""
    host = host.strip("[]")
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return set()
    return {str(ipaddress.ip_address(str(info[4][0]).split("%")[0])) for info in infos}


def _is_local(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if ip.is_loopback or ip.is_unspecified:
        return True
    try:
        probe = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET)
        try:
            probe.bind((address, 0))  # succeeds only for this machine's own addresses
        finally:
            probe.close()
        return True
    except OSError:
        return False


def own_address_conflict(
    routes: Sequence[Route], listen_host: str, listen_port: int
) -> Optional[Route]:
    """The first route whose upstream is the proxy's own listening address.

    :param listen_host: the listening port's interface (``0.0.0.0`` or
        ``::`` for all).
    """
    wildcard = ipaddress.ip_address(listen_host.strip("[]")).is_unspecified
    for route in routes:
        base = route.base
        host, _, port_text = base.netloc.rpartition(":")
        if not host or "]" in port_text:
            host, port_text = base.netloc, ""
        port = int(port_text) if port_text.isdigit() else (443 if base.scheme == "https" else 80)
        if port != listen_port:
            continue
        addresses = _addresses(host)
        if wildcard:
            if any(_is_local(a) for a in addresses):
                return route
        elif str(ipaddress.ip_address(listen_host.strip("[]"))) in addresses:
            return route
    return None


def join_path(base_path: str, path: bytes) -> bytes:
    """The upstream path: ``base_path`` + ``path``, without ``/v1/v1``."""
    if base_path.endswith("/v1") and (path == b"/v1" or path.startswith(b"/v1/")):
        path = path[3:]
    return base_path.encode("ascii") + path


def base_v1_notes(routes: Iterable[Route]) -> list[str]:
    """Start-up warnings for base URLs that end in ``/v1``."""
    return [
        f"upstream {route.base} ends in /v1: client paths that start with /v1 are "
        f"sent once under it (/v1/chat/completions -> {route.base}/chat/completions), "
        "not as /v1/v1/...; better: drop /v1 from the base URL"
        for route in routes
        if route.base.path.endswith("/v1")
    ]
