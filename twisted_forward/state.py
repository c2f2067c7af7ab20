"""
What the proxy learns about one request as it goes through, declared once.

Each field is set in one place (named beside it) and read by the later
stages and the access line.  :class:`~twisted_forward.site.ForwardRequest`
carries one :class:`RequestState` as ``request.state``; :func:`state_of`
gives it for any request (a request made by another factory, as in some unit
tests, gets a fresh one attached the first time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class RequestState:
    """One request's facts, for the stages after the one that learns them."""

    #: The raw path after the route prefix (set by the router).
    path: bytes = b"/"
    #: The raw query with its ``?``, or empty (set by the router).
    query: bytes = b""
    #: The route's label, ``/`` or its prefix (set by the exchange).
    route: str = "-"
    #: The client's address as the access gate resolved it (set by the gate).
    client: Optional[str] = None
    #: The non-secret label of the key used (set by the key decision).
    key_label: str = "-"
    #: The code of the proxy's own error answer (set by :mod:`.errors`).
    error: Optional[str] = None
    #: Seconds from sending upstream to the end (set by the exchange).
    upstream_seconds: Optional[float] = None


def state_of(request: Any) -> RequestState:
    """The request's :class:`RequestState`."""
    state = request.__dict__.get("state")
    if state is None:
        state = request.state = RequestState()
    return state
