"""
The admin JSON API: usage from the ledger, keys and their health, recent
chat records, and live figures as server-sent events.

Each handler takes the parsed query and returns an :class:`Answer` (or a
Deferred of one); :class:`~.resource.AdminResource` checks the admin key,
writes the answer with the admin headers, and masks every configured
secret in the body on the way out.  Bad parameters raise :class:`BadParam`,
answered as an OpenAI-shaped 400 naming the parameter.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from ..keys import DefaultKeys
from ..ledger import FIGURES, GROUPS, ILedger, UsageRow
from ..ledger.interfaces import GROUP_DIMENSIONS
from ..ledger.report import parse_day as read_day
from .exchanges import Found, recent_records
from .limits import IKeyLimits

#: Records ``/api/exchanges`` answers with at most.
MAX_EXCHANGES = 200
#: Days a usage query may span at most.
MAX_DAYS = 3660


#: Runs a blocking callable off the reactor thread.
Runner = Callable[[Callable[[], Any]], "Deferred[Any]"]


class BadParam(ValueError):
    """A query parameter the API cannot take.

    :ivar param: the parameter's name, for the error's ``param`` field.
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Answer:
    """One API answer: status, content type and body."""

    body: bytes
    content_type: bytes = b"application/json"
    status: int = 200
    filename: Optional[str] = None


def json_answer(obj: Any) -> Answer:
    """``obj`` as a JSON answer."""
    return Answer(json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8"))


def iso_time(seconds: float) -> str:
    """A POSIX time as ``2026-12-02T15:04:05Z``."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_day(param: str, value: str, today: date) -> date:
    """A day for the query parameter ``param``, read as the command line
    reads it (:func:`twisted_forward.ledger.report.parse_day`)."""
    try:
        return read_day(value, today)
    except ValueError as e:
        raise BadParam(param, f"{param}: {e}") from None


def one(query: Mapping[str, Sequence[str]], name: str, default: Optional[str] = None) -> Optional[str]:
    """The single value of parameter ``name``."""
    values = query.get(name)
    if not values:
        return default
    if len(values) > 1:
        raise BadParam(name, f"{name}: give it once")
    return values[0]


def check_params(query: Mapping[str, Sequence[str]], allowed: Sequence[str]) -> None:
    """Refuse parameters the endpoint does not know (a typo would else be
    silently ignored)."""
    for name in query:
        if name not in allowed:
            takes = ", ".join(allowed) if allowed else "no parameter"
            raise BadParam(name, f"unknown parameter {name!r}; this endpoint takes {takes}")


def usage_csv(rows: list[UsageRow], group: str) -> bytes:
    """Rows as CSV: the kept dimensions, then every figure."""
    dims = list(GROUP_DIMENSIONS[group])
    columns = dims + list(FIGURES) + ["total_tokens", "ttfb_mean"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        data = row.as_dict()
        writer.writerow(["" if data.get(c) is None else data.get(c) for c in columns])
    return out.getvalue().encode("utf-8")


class AdminAPI:
    """The handlers behind ``/_admin/api/…``.

    :param ledger: where usage is read from.
    :param default_keys: the default keys, for their health (never the keys).
    :param forward_labels: the forward keys' labels, in configured order.
    :param limits: per-key policies and what remains of them, or None.
    :param log_dir: the chat records' directory; None when LOG_CHAT is off.
    :param clock: for "today" and for resting keys' times.
    :param run: runs a blocking callable off the reactor thread.
    """

    def __init__(
        self,
        ledger: ILedger,
        default_keys: DefaultKeys,
        forward_labels: Sequence[str],
        limits: Optional[IKeyLimits],
        log_dir: Optional[str],
        clock: IReactorTime,
        run: Runner,
    ) -> None:
        self.ledger = ledger
        self.default_keys = default_keys
        self.forward_labels = tuple(forward_labels)
        self.limits = limits
        self.log_dir = log_dir
        self.clock = clock
        self.run = run

    def today(self) -> date:
        """The UTC day now."""
        return datetime.fromtimestamp(self.clock.seconds(), timezone.utc).date()

    # ------------------------------------------------------------ usage

    def usage(self, query: Mapping[str, Sequence[str]]) -> "Deferred[Answer]":
        """``GET /_admin/api/usage``: ledger rows for a period."""
        check_params(query, ("since", "until", "key", "model", "group", "format"))
        today = self.today()
        since = parse_day("since", one(query, "since", "7d") or "7d", today)
        until = parse_day("until", one(query, "until", "today") or "today", today)
        if until < since:
            raise BadParam("until", "until: must not be before since")
        if (until - since).days >= MAX_DAYS:
            raise BadParam("since", f"since: a query may span {MAX_DAYS} days at most")
        group = one(query, "group", "key") or "key"
        if group not in GROUPS:
            raise BadParam("group", f"group: one of {', '.join(GROUPS)}")
        fmt = one(query, "format", "json") or "json"
        if fmt not in ("json", "csv"):
            raise BadParam("format", "format: json or csv")
        key = one(query, "key")
        model = one(query, "model")
        d = self.ledger.query(since, until, key or None, model or None, group)

        def answer(rows: list[UsageRow]) -> Answer:
            if fmt == "csv":
                return Answer(
                    usage_csv(rows, group),
                    b"text/csv; charset=utf-8",
                    filename=f"usage_{since}_{until}_{group}.csv",
                )
            total = UsageRow()
            for row in rows:
                total.add(row)
            return json_answer(
                {
                    "object": "usage",
                    "since": since.isoformat(),
                    "until": until.isoformat(),
                    "group": group,
                    "key": key,
                    "model": model,
                    "data": [row.as_dict() for row in rows],
                    "total": total.as_dict(),
                    "ledger": _ledger_stats(self.ledger),
                }
            )

        return d.addCallback(answer)

    # ------------------------------------------------------------ keys

    def keys(self, query: Mapping[str, Sequence[str]]) -> "Deferred[Answer]":
        """``GET /_admin/api/keys``: forward keys with their limits, default
        keys with their health."""
        check_params(query, ())
        now = self.clock.seconds()
        default = []
        for health in self.default_keys.health():
            entry: dict[str, Any] = {"label": health.label, "state": health.state}
            if health.until is not None:
                entry["until"] = iso_time(health.until)
                entry["seconds_left"] = round(max(0.0, health.until - now), 1)
            default.append(entry)
        if self.limits is not None:
            d = self.limits.describe(self.forward_labels)
        else:
            d = succeed({label: {"policy": None, "remaining": None} for label in self.forward_labels})

        def answer(described: Mapping[str, Mapping[str, Any]]) -> Answer:
            forward = [
                {"label": label, **described.get(label, {"policy": None, "remaining": None})}
                for label in self.forward_labels
            ]
            return json_answer(
                {"object": "keys", "time": iso_time(now), "forward_keys": forward,
                 "default_keys": default}
            )

        return d.addCallback(answer)

    # ------------------------------------------------------------ exchanges

    def exchanges(self, query: Mapping[str, Sequence[str]]) -> "Deferred[Answer]":
        """``GET /_admin/api/exchanges``: the newest chat records that match."""
        check_params(query, ("limit", "key", "q", "id"))
        raw_limit = one(query, "limit", "50") or "50"
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_EXCHANGES:
            raise BadParam("limit", f"limit: a whole number from 1 to {MAX_EXCHANGES}")
        limit = int(raw_limit)
        key = one(query, "key") or None
        text = one(query, "q", "") or ""
        if len(text) > 200:
            raise BadParam("q", "q: 200 characters at most")
        request_id = one(query, "id") or None
        if self.log_dir is None:
            return succeed(json_answer(
                {"object": "list", "recording": False, "data": [], "truncated": False}
            ))
        directory = self.log_dir
        d = self.run(
            lambda: recent_records(
                directory, 1 if request_id else limit, key, text, request_id
            )
        )

        def answer(found: Found) -> Answer:
            return json_answer(
                {"object": "list", "recording": True, "data": found.records,
                 "truncated": found.truncated, "scanned_bytes": found.scanned}
            )

        return d.addCallback(answer)


def _ledger_stats(ledger: ILedger) -> dict[str, Any]:
    stats = ledger.stats
    return {
        "backend": stats.backend,
        "pending_rows": stats.pending_rows,
        "dropped": stats.dropped,
        "write_failures": stats.write_failures,
    }
