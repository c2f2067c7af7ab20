"""
Live figures for the admin page: requests/s, tokens/s, open exchanges and
errors/s, sampled on the reactor's clock and pushed to every open event
stream (``GET /_admin/api/events``).

The figures come from what the proxy already counts: the Prometheus
registry (exchanges ended, by status; refusals; exchanges open) and the
tokens of every entry the usage ledger is given, counted on the way in by
:class:`LiveTally`, a pass-through :class:`~twisted_forward.ledger.ILedger`.
Sampling costs a few counter reads a second, whether or not anyone watches;
the last few minutes of samples are kept so a page that connects draws a
chart at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any, Callable, Deque, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ..ledger import ILedger, UsageEntry, UsageRow
from ..metrics import Metrics


@implementer(ILedger)
class LiveTally:
    """Counts the tokens and errors of every entry on its way to a ledger.

    :param ledger: the real ledger, or None for none (the entries are then
        counted and dropped).
    """

    def __init__(self, ledger: Optional[ILedger] = None) -> None:
        self.ledger = ledger
        self.entries = 0
        self.tokens = 0
        self.errors = 0

    @property
    def stats(self) -> Any:
        """The wrapped ledger's counters."""
        from ..ledger import LedgerStats

        return self.ledger.stats if self.ledger is not None else LedgerStats(backend="none")

    def record(self, entry: UsageEntry) -> None:
        """Count ``entry``, then pass it on."""
        self.entries += 1
        self.tokens += entry.prompt_tokens + entry.completion_tokens
        if entry.error:
            self.errors += 1
        if self.ledger is not None:
            self.ledger.record(entry)

    def query(
        self,
        since: date,
        until: date,
        key: Optional[str] = None,
        model: Optional[str] = None,
        group: str = "key",
    ) -> "Deferred[list[UsageRow]]":
        """The wrapped ledger's answer."""
        if self.ledger is None:
            from twisted.internet.defer import succeed

            return succeed([])
        return self.ledger.query(since, until, key, model, group)

    def flush(self) -> "Deferred[None]":
        """The wrapped ledger's flush."""
        if self.ledger is None:
            from twisted.internet.defer import succeed

            return succeed(None)
        return self.ledger.flush()


@dataclass(frozen=True)
class Totals:
    """Counts since start-up, read from the metrics and the tally."""

    requests: int = 0
    errors: int = 0
    tokens: int = 0
    open: int = 0


def read_totals(metrics: Metrics, tally: Optional[LiveTally]) -> Totals:
    """What the proxy has done since it started.

    ``requests`` counts forwarded exchanges and requests the proxy refused
    itself; ``errors`` those answered with a status of 400 or more, or with
    no answer at all, and every refusal.
    """
    requests = errors = 0
    for family in metrics.requests.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            count = int(sample.value)
            requests += count
            status = sample.labels.get("status", "")
            if not status.isdigit() or int(status) >= 400:
                errors += count
    for family in metrics.refusals.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                requests += int(sample.value)
                errors += int(sample.value)
    open_now = 0
    for family in metrics.open_exchanges.collect():
        for sample in family.samples:
            open_now += int(sample.value)
    return Totals(requests, errors, tally.tokens if tally is not None else 0, open_now)


@dataclass(frozen=True)
class Sample:
    """One tick's figures, as the event stream sends them.

    :ivar time: POSIX time of the sample.
    :ivar requests_per_s: requests ended per second since the last sample.
    :ivar tokens_per_s: prompt + completion tokens per second.
    :ivar errors_per_s: errors per second.
    :ivar open_streams: exchanges in flight now (open streams included).
    :ivar requests_total: / :ivar tokens_total: / :ivar errors_total:
        counts since the proxy started.
    """

    time: float
    requests_per_s: float
    tokens_per_s: float
    errors_per_s: float
    open_streams: int
    requests_total: int
    tokens_total: int
    errors_total: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


Listener = Callable[[Sample], None]


class LiveFigures:
    """Samples the totals every ``interval`` seconds on ``clock``.

    :param read: returns the current :class:`Totals`.
    :param history: how many samples to keep for a page that connects.
    """

    log = Logger()

    def __init__(
        self,
        read: Callable[[], Totals],
        clock: IReactorTime,
        interval: float = 1.0,
        history: int = 300,
    ) -> None:
        self.read = read
        self.clock = clock
        self.interval = interval
        self.history: Deque[Sample] = deque(maxlen=history)
        self._listeners: list[Listener] = []
        self._last: Optional[tuple[float, Totals]] = None
        self._loop: Optional[LoopingCall] = None

    def start(self) -> None:
        """Sample now, then every ``interval`` seconds."""
        if self._loop is not None:
            return
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("live figures stopped", f)
        )

    def stop(self) -> None:
        """Stop sampling."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with every new sample."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        """Stop calling ``listener``."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    @property
    def listeners(self) -> int:
        """How many listeners there are."""
        return len(self._listeners)

    def tick(self) -> Sample:
        """Take one sample and hand it to the listeners."""
        now = self.clock.seconds()
        totals = self.read()
        if self._last is None:
            elapsed, before = 0.0, totals
        else:
            elapsed, before = now - self._last[0], self._last[1]
        self._last = (now, totals)

        def rate(after: int, was: int) -> float:
            if elapsed <= 0:
                return 0.0
            return round(max(0, after - was) / elapsed, 3)

        sample = Sample(
            time=round(now, 3),
            requests_per_s=rate(totals.requests, before.requests),
            tokens_per_s=rate(totals.tokens, before.tokens),
            errors_per_s=rate(totals.errors, before.errors),
            open_streams=totals.open,
            requests_total=totals.requests,
            tokens_total=totals.tokens,
            errors_total=totals.errors,
        )
        self.history.append(sample)
        for listener in list(self._listeners):
            try:
                listener(sample)
            except Exception:
                self.log.failure("a live-figures listener failed")
                self.unsubscribe(listener)
        return sample
