"""
The cache's two extension points.

:class:`ICacheStore` is a backend: bytes in, bytes out, every call a
Deferred, nothing blocking the reactor.  :class:`IExchangeCache` is the one
thing the forwarding exchange calls: before forwarding (hit: replay, or
proceed) and, on a miss, a tap that sees the answer as it is relayed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.web.iweb import IRequest
    from twisted.web.server import Request

    from ..chat.recorder import IExchangeTap
    from ..config import Route
    from ..keys import KeyDecision
    from .hook import Lookup
    from .replay import Replay


class ICacheStore(Interface):
    """Where cached answers live (memory, LMDB, Redis).

    Keys are ASCII bytes, values :class:`~.entry.Entry` bytes.  The store
    applies its TTL and size bound itself and reports evictions to the
    cache metrics it was given.  A failing store fails the Deferred; the
    caller turns that into a miss.
    """

    name = Attribute("The backend's name, for logs: memory, lmdb, redis.")

    def get(key: bytes) -> "Deferred[Optional[bytes]]":
        """The value stored under ``key``, or None."""

    def put(key: bytes, value: bytes) -> "Deferred[None]":
        """Store ``value`` under ``key``, evicting as the bound needs."""

    def close() -> "Deferred[None]":
        """Release the store's connections, threads and files."""


class IExchangeCache(Interface):
    """What the forwarding exchange asks of the cache, once per request.

    The exchange calls :meth:`lookup` before forwarding and gets a
    :class:`~.hook.Lookup`: ``hit`` (replay its entry; nothing goes
    upstream, no default key is spent), ``miss`` (forward, feeding the
    lookup's tap so a whole 200 is stored) or ``bypass`` (forward, not
    stored).  Either way it sends the lookup's ``body`` instead of the
    client's when there is one (the ``caching`` field taken out).
    """

    def on(route: Route) -> bool:
        """Whether requests on ``route`` (a :class:`~twisted_forward.config.Route`)
        go through the cache at all."""

    def lookup(request: IRequest, route: Route, target: bytes,
               decision: KeyDecision) -> "Deferred[Lookup]":
        """Examine a request; never fails (a broken store is a miss).

        :param request: the client's request (its method and body are read).
        :param route: the :class:`~twisted_forward.config.Route`.
        :param target: the path and query under the route.
        :param decision: the request's :class:`~twisted_forward.keys.KeyDecision`.
        """

    def replay(request: Request, lookup: Lookup, tap: Optional[IExchangeTap] = None,
               headers: Sequence[tuple[bytes, bytes]] = ()) -> "Replay":
        """Answer ``request`` from a hit; returns the
        :class:`~.replay.Replay`, whose ``done`` fires with the outcome
        (``complete`` or ``client_left``) and whose ``sent`` counts the bytes
        written.  ``tap`` (an :class:`IExchangeTap`, or None) sees the
        replayed answer, for the chat records; ``headers`` are added to the
        answer (other hooks', such as ``x-ratelimit-*``)."""
