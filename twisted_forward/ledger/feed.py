"""
Feeding the ledger from the exchanges.

The chat record assembly already reads every answer of the kinds that spend
tokens (chat, completions, embeddings, audio, images, responses) and finds
its ``usage``, streamed answers included.  :class:`RecordFeed` observes the
records it emits and turns each into one :class:`UsageEntry`: the bodies
are parsed once, for both.  Exchanges of other kinds (``/v1/models``,
files, a ``general`` route's traffic) get a small :class:`CountingTap`
from :class:`CountingRecorder` that counts the request, its status, bytes
and time to first byte.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger
from twisted.web.http_headers import Headers
from zope.interface import implementer

from ..chat.files import RECORD_FIELD
from ..chat.record import exchange_kind
from ..chat.recorder import ExchangeInfo, IExchangeTap, IRecorder
from .interfaces import ILedger, UsageEntry

if TYPE_CHECKING:
    from ..chat.recorder import ChatRecorder

#: Outcomes that are not errors: the answer was whole, or the client left
#: (what was used is counted, the exchange itself did not fail).
_FINE_OUTCOMES = ("complete", "client_left")

#: ``(model, prompt, completion, cached) -> USD``: the policies' price table.
Pricer = Callable[[str, int, int, int], float]


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_tokens(usage: Any) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens of an OpenAI ``usage`` object.

    Takes the chat/completions names, the Responses API's
    (``input_tokens``/``output_tokens``) and embeddings' (prompt only).
    """
    if not isinstance(usage, dict):
        return 0, 0, 0
    prompt = _int(usage.get("prompt_tokens")) or _int(usage.get("input_tokens"))
    completion = _int(usage.get("completion_tokens")) or _int(usage.get("output_tokens"))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return prompt, completion, cached


def _time(value: Any, fallback: float) -> float:
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return fallback


def is_error(status: Optional[int], outcome: str) -> bool:
    """An exchange failed: an error status, or an outcome other than a
    whole answer or a client that left."""
    return status is None or status >= 400 or outcome not in _FINE_OUTCOMES


def entry_from_record(record: dict[str, Any], now: float, price: Pricer) -> UsageEntry:
    """The ledger entry of one chat record.  A cache hit (``"cache": "hit"``)
    spent no upstream tokens: its answer's usage is not counted again."""
    if record.get("cache") == "hit":
        prompt = completion = cached = 0
    else:
        prompt, completion, cached = usage_tokens(record.get("usage"))
    model = record.get("model") or record.get("response_model") or ""
    model = model if isinstance(model, str) else ""
    status = record.get("status")
    outcome = str(record.get("outcome") or "")
    ttfb = record.get("ttfb")
    return UsageEntry(
        time=_time(record.get("time"), now),
        key_label=str(record.get("key_label") or ""),
        model=model,
        route=str(record.get("route") or "/"),
        error=is_error(status if isinstance(status, int) else None, outcome),
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        cost_usd=price(model, prompt, completion, cached),
        request_bytes=_int(record.get("request_bytes")),
        response_bytes=_int(record.get("response_bytes")),
        ttfb=float(ttfb) if isinstance(ttfb, (int, float)) else None,
    )


@implementer(ILogObserver)
class RecordFeed:
    """Observes chat record events and records each in the ledger."""

    log = Logger()

    def __init__(self, ledger: ILedger, clock: IReactorTime, price: Pricer) -> None:
        self.ledger = ledger
        self.clock = clock
        self.price = price

    def __call__(self, event: dict[str, Any]) -> None:
        record = event.get(RECORD_FIELD)
        if not isinstance(record, dict):
            return
        try:
            self.ledger.record(entry_from_record(record, self.clock.seconds(), self.price))
        except Exception:
            self.log.failure("ledger: could not count an exchange")


@implementer(IRecorder)
class CountingRecorder:
    """Taps the exchanges the chat records do not cover.

    :param covered: whether the record assembly takes an exchange (then its
        record feeds the ledger and this recorder stays out).
    """

    def __init__(
        self,
        ledger: ILedger,
        clock: IReactorTime,
        covered: Callable[[ExchangeInfo], bool] = lambda info: (
            exchange_kind(info.method, info.path) is not None
        ),
    ) -> None:
        self.ledger = ledger
        self.clock = clock
        self.covered = covered

    def begin(self, info: ExchangeInfo) -> Optional[IExchangeTap]:
        """A counting tap, or None for an exchange a chat record covers."""
        if self.covered(info):
            return None
        return CountingTap(self, info)


@implementer(IExchangeTap)
class CountingTap:
    """Counts one exchange: status, bytes, time to first byte."""

    def __init__(self, recorder: CountingRecorder, info: ExchangeInfo) -> None:
        self.recorder = recorder
        self.info = info
        self.status: Optional[int] = None
        self.ttfb: Optional[float] = None
        self.size = 0
        self.ended = False

    def response(self, status: int, headers: Headers) -> None:
        """The answer's head."""
        if self.ttfb is None:
            self.ttfb = max(0.0, self.recorder.clock.seconds() - self.info.started)
        self.status = status

    def data(self, chunk: bytes) -> None:
        """A relayed body chunk."""
        self.size += len(chunk)

    def end(self, outcome: str) -> None:
        """Record the exchange, once."""
        if self.ended:
            return
        self.ended = True
        try:
            self.recorder.ledger.record(
                UsageEntry(
                    time=self.info.started,
                    key_label=self.info.key_label,
                    route=self.info.route,
                    error=is_error(self.status, outcome),
                    request_bytes=self.info.body.length,
                    response_bytes=self.size,
                    ttfb=self.ttfb,
                )
            )
        except Exception:
            RecordFeed.log.failure("ledger: could not count an exchange")


def feeding_recorder(
    chat: Optional["ChatRecorder"], ledger: ILedger, clock: IReactorTime, price: Pricer
) -> tuple["ChatRecorder", "IRecorder"]:
    """Plug ``ledger`` in beside the chat records.

    :param price: what usage costs (the policies' price table, so the
        ledger's dollars are the quotas' dollars).
    :param chat: the chat recorder, None when LOG_CHAT is off (a recorder
        that assembles records without writing them is made instead).
    :returns: the chat recorder (to flush and close at exit) and the
        recorder for the exchanges: the chat records and the counting taps.
    """
    from ..chat.recorder import ChatRecorder, FanOut

    if chat is None:
        chat = ChatRecorder(clock)
    chat.publisher.addObserver(RecordFeed(ledger, clock, price))
    return chat, FanOut([chat, CountingRecorder(ledger, clock)])
