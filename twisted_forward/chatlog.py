"""
Chat records: the interface the proxy feeds, and the recorders behind it.

The proxy calls :meth:`Recorder.begin` once per exchange on an ``openai``
route; the returned :class:`ExchangeTap` (or None: not recorded) sees the
answer's head, every body chunk as it is relayed, and the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

from twisted.web.http_headers import Headers


@dataclass
class ExchangeInfo:
    """What is known of an exchange when its request has arrived.

    :ivar read_body: returns the request body (only call it if needed).
    """

    request_id: str
    route: str
    method: str
    path: str
    client: str
    key_label: str
    started: float
    read_body: Callable[[], bytes] = field(repr=False)


class ExchangeTap(Protocol):
    """Sees one exchange's answer as it is relayed.  Must never raise."""

    def response(self, status: int, headers: Headers) -> None:
        """The answer's head, as relayed (or the proxy's own error)."""

    def data(self, chunk: bytes) -> None:
        """A body chunk, after it was written to the client."""

    def end(self, outcome: str) -> None:
        """The exchange is over: ``complete``, ``client_left``,
        ``upstream_error``, ``idle_timeout`` or ``proxy_error``."""


class Recorder(Protocol):
    """Decides which exchanges are recorded and records them."""

    def begin(self, info: ExchangeInfo) -> Optional[ExchangeTap]:
        """Start recording an exchange; None if it is not to be recorded."""


class NullRecorder:
    """Records nothing (LOG_CHAT=false)."""

    def begin(self, info: ExchangeInfo) -> Optional[ExchangeTap]:
        return None
