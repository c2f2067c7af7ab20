"""
Checks made when a request's head has arrived, before any of its body.

The channel (:class:`~twisted_forward.framing.ForwardChannel`) runs the
site's :class:`IHeadCheck` s in order as soon as a request's header section
is in: before it reads a byte of the body and before it sends
``100 Continue``.  The first refusal wins:

- a request with a body is answered at once and its connection closed
  (the body is never read, so a refused client cannot make the proxy spool
  an upload to disk);
- a request without a body is answered in turn, on a connection that stays
  open (:class:`~twisted_forward.site.ForwardRequest` answers it instead of
  rendering a resource).

Each check runs once per request.  The IP gate and the forward-key check
are the two the proxy has; a policy (a model or rate check) plugs in by
providing :class:`IHeadCheck` and being added to the site's list.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

from twisted.web.iweb import IRequest
from zope.interface import Interface

from .framing import Refusal


class IHeadCheck(Interface):
    """Judges a request from its head alone (method, target, headers, peer)."""

    def check_head(request: IRequest) -> Optional[Refusal]:
        """Why ``request`` must be refused now, or None to let it go on.

        Called on the reactor thread with the request line and headers in
        and no body read; must not block, and must not read the body.
        """


class HeadChecks:
    """The head checks a site's channels run, in order.

    One object, shared by a site and every channel it builds: when a reload
    gives the site new checks (new IP lists, new keys), the next request on
    every connection, kept-alive ones included, meets them.
    """

    def __init__(self, checks: Iterable[IHeadCheck] = ()) -> None:
        self.checks: tuple[IHeadCheck, ...] = tuple(checks)

    def replace(self, checks: Iterable[IHeadCheck]) -> None:
        """Run ``checks`` from the next request head on."""
        self.checks = tuple(checks)

    def __iter__(self) -> Iterator[IHeadCheck]:
        return iter(self.checks)

    def __len__(self) -> int:
        return len(self.checks)


def key_refusal(message: str) -> Refusal:
    """The 401 of a request whose key the proxy does not accept."""
    return Refusal(401, "invalid_api_key", message)
