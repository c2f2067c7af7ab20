"""
Caps on what one process holds open: client connections (in all, and from
one client address) and upstream requests in flight.

Each cap is a setting (``MAX_CONNECTIONS``, ``MAX_CONNECTIONS_PER_CLIENT``,
``MAX_UPSTREAM_CONNECTIONS``; 0 turns one off).  Unset, they follow the
process's file-descriptor limit, so the proxy refuses work before the
operating system refuses it a socket: with ``L`` descriptors, a reserve of
:data:`FD_RESERVE` is kept for idle pooled upstream connections, files and
listeners, and the rest is shared equally between client connections and
upstream connections; one client address may hold half of the client
connections.

A connection over a cap is answered at once (``503 server_busy`` when the
proxy is full, ``429 too_many_connections`` when its address holds its
share) and closed; a request that would need an upstream connection over
the cap gets ``503 upstream_busy``.  Every refusal is counted in
``openai_forward_refusals_total`` under that reason.

The per-address cap counts the TCP peer: peers listed in TRUSTED_PROXIES
(a load balancer in front, which carries everyone's connections) are
exempt, and so are unix-socket peers.  With ``--workers N`` every worker
applies the caps to its own connections.
"""

from __future__ import annotations

import resource
from typing import TYPE_CHECKING, Callable, Optional

from twisted.internet.interfaces import IAddress
from twisted.logger import Logger

from .access import TrustedProxies, peer_address
from .framing import Refusal

if TYPE_CHECKING:
    from .config import Config

#: Descriptors kept back from the caps' share of RLIMIT_NOFILE: idle pooled
#: upstream connections (up to 256 per upstream), files, listeners.
FD_RESERVE = 320
#: The smallest default cap, whatever the descriptor limit says.
MIN_CAP = 16

SERVER_BUSY = Refusal(
    503, "server_busy", "The proxy has as many connections as it serves; retry shortly."
)
TOO_MANY_CONNECTIONS = Refusal(
    429,
    "too_many_connections",
    "Your address has as many connections open as this proxy allows one client.",
)


def descriptor_limit() -> int:
    """The process's soft limit on open file descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_descriptor_limit(
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> tuple[int, int]:
    """Raise the soft limit on open descriptors as far as the hard limit
    allows, so one process can hold tens of thousands of streams.

    Called once at start-up, before :func:`resolve_caps` derives the
    connection caps from the limit (and before workers are spawned: they
    inherit it).  A refusal from the system leaves the limit as it was.

    :return: ``(before, after)`` soft limits.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or (soft >= hard and hard != resource.RLIM_INFINITY):
        return soft, soft
    # An unlimited hard limit is not a value setrlimit takes for the soft one
    # on Linux (nr_open caps it): aim for 2**20, then what the kernel allows.
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    try:
        setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def default_caps(fd_limit: Optional[int] = None) -> tuple[int, int, int]:
    """``(connections, per client, upstream)`` for a descriptor limit."""
    limit = descriptor_limit() if fd_limit is None else fd_limit
    share = max(MIN_CAP, (limit - FD_RESERVE) // 2)
    return share, max(MIN_CAP, share // 2), share


def resolve_caps(config: "Config") -> tuple[Optional[int], Optional[int], Optional[int]]:
    """``(connections, per client, upstream)`` caps for ``config``, None
    where there is no cap: unset settings take :func:`default_caps`, 0 is
    no cap, and an unset per-client cap is half of a set total."""
    total, per_client, upstream = default_caps()
    if config.max_connections is not None and config.max_connections > 0:
        per_client = max(1, config.max_connections // 2)

    def pick(value: Optional[int], default: int) -> Optional[int]:
        if value is None:
            return default
        return value or None

    return (
        pick(config.max_connections, total),
        pick(config.max_connections_per_client, per_client),
        pick(config.max_upstream_connections, upstream),
    )


class ConnectionLimits:
    """Counts client connections; says which to refuse.

    :param total: the most connections at once; None for no cap.
    :param per_client: the most from one address; None for no cap.
    :param trusted: peers exempt from the per-address cap.
    :param now: the clock, for at most one log line a minute per cap.
    """

    log = Logger()

    def __init__(
        self,
        total: Optional[int],
        per_client: Optional[int],
        trusted: TrustedProxies,
        now: Callable[[], float],
    ) -> None:
        self.total = total
        self.per_client = per_client
        self.trusted = trusted
        self._now = now
        #: Connections open now.
        self.open = 0
        self._by_address: dict[str, int] = {}
        self._logged: dict[str, float] = {}
        self._refused: dict[str, int] = {}

    def _address_key(self, peer: Optional[IAddress]) -> Optional[str]:
        """The name a peer is counted under, None when it is exempt."""
        address = peer_address(peer)
        if isinstance(address, str):  # unix, unknown: local or not an IP peer
            return None
        if address in self.trusted:
            return None
        return str(address)

    def admit(self, peer: Optional[IAddress]) -> Optional[Refusal]:
        """Count a new connection from ``peer``, or say why it is refused
        (then it is not counted)."""
        if self.total is not None and self.open >= self.total:
            self._note(SERVER_BUSY)
            return SERVER_BUSY
        per_client = self.per_client
        key = self._address_key(peer) if per_client is not None else None
        if key is not None and per_client is not None:
            held = self._by_address.get(key, 0)
            if held >= per_client:
                self._note(TOO_MANY_CONNECTIONS)
                return TOO_MANY_CONNECTIONS
            self._by_address[key] = held + 1
        self.open += 1
        return None

    def release(self, peer: Optional[IAddress]) -> None:
        """A counted connection from ``peer`` closed."""
        self.open -= 1
        key = self._address_key(peer) if self.per_client is not None else None
        if key is not None:
            held = self._by_address.get(key, 0) - 1
            if held > 0:
                self._by_address[key] = held
            else:
                self._by_address.pop(key, None)

    def _note(self, refusal: Refusal) -> None:
        """Log a cap being hit, at most once a minute (a flood of
        connections must not become a flood of log lines)."""
        code = refusal.code
        self._refused[code] = self._refused.get(code, 0) + 1
        now = self._now()
        if now - self._logged.get(code, float("-inf")) < 60:
            return
        self._logged[code] = now
        count, self._refused[code] = self._refused[code], 0
        self.log.warn(
            "refusing client connections: {code} ({count} since the last such line); "
            "{open} open",
            code=code, count=count, open=self.open,
        )


class UpstreamSlots:
    """Counts upstream requests in flight (each holds one upstream
    connection); refuses one past the cap.

    :param cap: the most at once; None for no cap.
    """

    def __init__(self, cap: Optional[int]) -> None:
        self.cap = cap
        #: Upstream requests in flight now.
        self.used = 0

    def acquire(self) -> bool:
        """Take a slot; False when none is free."""
        if self.cap is not None and self.used >= self.cap:
            return False
        self.used += 1
        return True

    def release(self) -> None:
        """Give a slot back."""
        self.used -= 1
