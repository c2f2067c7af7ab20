"""
One JSON parse of a body for all of an exchange's readers.

With policies on, a request body is read by the gate (its model, its token
estimate) and by the chat record (its messages), and a non-stream answer by
the usage tap (its tokens, to settle) and by the chat record (its choices):
each body parsed twice.  The exchange's :class:`SharedParse` lets the first
reader hand its parse to the second: the second reader asks for the same
bytes and gets the value the first one made, and the share lets go of it.

A parse is handed on only when the two readers could not disagree:
``NaN`` and ``Infinity`` (which the readers parse differently, the record
turning them into strings) are not in the body, so the value is the same
whatever ``parse_constant`` each reader asked for.  Readers only read the
value; none changes it.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

#: The literals ``json.loads`` hands to ``parse_constant`` (``-Infinity``
#: contains ``Infinity``).
_CONSTANTS = (b"NaN", b"Infinity")


def parse(body: bytes, parse_constant: Optional[Callable[[str], Any]] = None) -> Any:
    """``json.loads`` of ``body``: the one place a shared body is parsed."""
    if parse_constant is None:
        return json.loads(body)
    return json.loads(body, parse_constant=parse_constant)


class SharedParse:
    """The parses one exchange's readers hand on (at most a request's and
    an answer's, each until its second reader takes it)."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: list[tuple[bytes, Any]] = []

    def loads(self, body: bytes, parse_constant: Optional[Callable[[str], Any]] = None) -> Any:
        """The value of ``body``: the one kept for these bytes (then let
        go), else parsed now (raises as ``json.loads`` does)."""
        held = self._held
        for i, (kept, value) in enumerate(held):
            if kept is body or kept == body:
                del held[i]
                return value
        return parse(body, parse_constant)

    def keep(self, body: bytes, value: Any) -> None:
        """Offer ``value``, parsed from ``body``, to the next reader of the
        same bytes; kept only when every reader would parse it alike."""
        if _CONSTANTS[0] in body or _CONSTANTS[1] in body:
            return
        self._held.append((body, value))

    def __len__(self) -> int:
        return len(self._held)
