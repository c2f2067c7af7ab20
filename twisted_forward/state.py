"""
What the proxy learns about one request as it goes through, declared once.

Each field is set in one place (named beside it) and read by the later
stages and the access line.  The one field two stages set, ``error``, says
why beside it.  :class:`~twisted_forward.site.ForwardRequest`
carries one :class:`RequestState` as ``request.state``; :func:`state_of`
gives it for any request (a request made by another factory, as in some unit
tests, gets a fresh one attached the first time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .keys import KeyDecision, KeyRules


class RequestState:
    """One request's facts, for the stages after the one that learns them.

    Slotted: every open stream holds one.
    """

    __slots__ = (
        "path", "query", "route", "client", "key_label", "error", "upstream_seconds", "key_decision",
    )

    def __init__(self) -> None:
        #: The raw path after the route prefix (set by the router).
        self.path: bytes = b"/"
        #: The raw query with its ``?``, or empty (set by the router).
        self.query: bytes = b""
        #: The route's label, ``/`` or its prefix (set by the route's render,
        #: once past the key rules).
        self.route: str = "-"
        #: The client's address as the access gate resolved it (set by the gate).
        self.client: Optional[str] = None
        #: The non-secret label of the key used (set by the route's key
        #: decision, ``ProxyResource._decide``, in its head check or render).
        self.key_label: str = "-"
        #: The error code of the access line.  Two stages, as two things
        #: end a request unanswered: the proxy's own error answer
        #: (:func:`.errors.write_error`), and the connection's end before the
        #: answer's (``ForwardRequest.connectionLost``: the channel's
        #: refusal, unless an error answer was begun, or the client leaving).
        self.error: Optional[str] = None
        #: Seconds from sending upstream to the end (set by the exchange,
        #: as it stops its clock).
        self.upstream_seconds: Optional[float] = None
        #: The key rules' decision on the head, and the rules that made it
        #: (set by the route's head check, taken again by its render).
        self.key_decision: Optional[tuple["KeyRules", "KeyDecision"]] = None

    def __repr__(self) -> str:
        # Not the key decision: it holds a client's own credentials.
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self.__slots__ if name != "key_decision"
        )
        return f"RequestState({fields})"


def state_of(request: Any) -> RequestState:
    """The request's :class:`RequestState`."""
    state = getattr(request, "state", None)
    if not isinstance(state, RequestState):
        state = request.state = RequestState()
    return state
