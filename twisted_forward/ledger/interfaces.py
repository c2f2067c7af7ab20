"""
The usage ledger's contract: what an exchange adds, what a query returns.

Every answered exchange is :meth:`ILedger.record`\\ ed as one
:class:`UsageEntry`; the ledger adds it to the row of its key label ×
model × UTC day × route.  :meth:`ILedger.query` reads those rows back,
summed over the dimensions the caller does not group by.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from datetime import date, datetime, timezone
from typing import Any, Optional

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

#: The ways :meth:`ILedger.query` can group its rows.  ``detail`` keeps
#: every dimension (key × model × day × route).
GROUPS = ("key", "model", "day", "route", "detail")

#: The dimensions each group keeps; the others are summed over (None).
GROUP_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "key": ("key_label",),
    "model": ("model",),
    "day": ("day",),
    "route": ("route",),
    "detail": ("day", "key_label", "model", "route"),
}

#: The dimensions of a stored row, in key order.
DIMENSIONS = ("day", "key_label", "model", "route")

#: The additive figures of a row, in column order.
FIGURES = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost_usd",
    "request_bytes",
    "response_bytes",
    "ttfb_sum",
    "ttfb_count",
)


def utc_day(when: float) -> str:
    """The UTC day (``YYYY-MM-DD``) of a POSIX time."""
    return datetime.fromtimestamp(when, timezone.utc).date().isoformat()


@dataclass(frozen=True)
class UsageEntry:
    """What one answered exchange adds to the ledger.

    :ivar time: POSIX time the exchange started; its UTC day is the row's.
    :ivar key_label: the forward key's label (never a key); ``""`` for a
        client's own key or a keyless request.
    :ivar model: the model asked for (or answered); ``""`` when unknown.
    :ivar route: the route prefix (``/`` for the root route).
    :ivar error: the exchange failed: a status of 400 or more, or no whole
        answer (upstream error, timeout).  A client leaving early is not an
        error: what was used is counted.
    :ivar cost_usd: the price of the tokens, 0.0 when the model is not in
        the price table.
    :ivar ttfb: seconds to the upstream's response head, None if none came.
    """

    time: float
    key_label: str = ""
    model: str = ""
    route: str = "/"
    error: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    request_bytes: int = 0
    response_bytes: int = 0
    ttfb: Optional[float] = None


@dataclass
class UsageRow:
    """The figures of one ledger row, or of a group of rows summed.

    A dimension the query grouped away is None.

    :ivar ttfb_sum: seconds to first byte, summed over the ``ttfb_count``
        exchanges that had a response head; :attr:`ttfb_mean` divides them.
    """

    day: Optional[str] = None
    key_label: Optional[str] = None
    model: Optional[str] = None
    route: Optional[str] = None
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    request_bytes: int = 0
    response_bytes: int = 0
    ttfb_sum: float = 0.0
    ttfb_count: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    @property
    def ttfb_mean(self) -> Optional[float]:
        """Mean seconds to first byte, None when no exchange had one."""
        return self.ttfb_sum / self.ttfb_count if self.ttfb_count else None

    def add(self, other: "UsageRow") -> None:
        """Add ``other``'s figures to this row's."""
        for name in FIGURES:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def add_entry(self, entry: UsageEntry) -> None:
        """Add one exchange's figures to this row's."""
        self.requests += 1
        self.errors += 1 if entry.error else 0
        self.prompt_tokens += entry.prompt_tokens
        self.completion_tokens += entry.completion_tokens
        self.cached_tokens += entry.cached_tokens
        self.cost_usd += entry.cost_usd
        self.request_bytes += entry.request_bytes
        self.response_bytes += entry.response_bytes
        if entry.ttfb is not None:
            self.ttfb_sum += entry.ttfb
            self.ttfb_count += 1

    def copy(self) -> "UsageRow":
        """An independent copy."""
        return replace(self)

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON-ready fields (dimensions grouped away left out),
        with ``total_tokens`` and ``ttfb_mean`` added."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in DIMENSIONS and value is None:
                continue
            out[f.name] = value
        out["cost_usd"] = round(self.cost_usd, 6)
        out["total_tokens"] = self.total_tokens
        out["ttfb_mean"] = None if self.ttfb_mean is None else round(self.ttfb_mean, 4)
        return out


@dataclass
class LedgerStats:
    """Counters a ledger keeps about itself (for metrics and the admin page).

    :ivar recorded: entries handed to :meth:`ILedger.record`.
    :ivar written: entries whose figures reached the store.
    :ivar dropped: entries lost because the store was down longer than the
        pending bound allowed.
    :ivar write_failures: batches the store refused (kept and retried).
    :ivar pending_rows: rows waiting for the next write.
    """

    recorded: int = 0
    written: int = 0
    dropped: int = 0
    write_failures: int = 0
    pending_rows: int = 0
    backend: str = field(default="memory")


class ILedger(Interface):
    """The usage ledger: exchanges in, summed rows out."""

    stats = Attribute(":class:`LedgerStats`: the ledger's own counters, live.")

    def record(entry: UsageEntry) -> None:
        """Add one answered exchange.  Never blocks, never raises: the
        figures are batched and written off the hot path."""

    def query(
        since: date,
        until: date,
        key: Optional[str] = None,
        model: Optional[str] = None,
        group: str = "key",
    ) -> "Deferred[list[UsageRow]]":
        """Rows of the UTC days ``since`` to ``until``, both included.

        :param key: only this key label.
        :param model: only this model.
        :param group: one of :data:`GROUPS`: which dimensions the rows keep.
            Rows are sorted by their kept dimensions.
        :raises ValueError: (synchronously) for an unknown ``group``.

        Entries recorded before the call are included (pending ones are
        written first).
        """

    def flush() -> "Deferred[None]":
        """Fires when everything recorded so far is written (or, with the
        store down, kept for the next try)."""
