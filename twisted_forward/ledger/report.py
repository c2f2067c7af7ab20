"""
``twisted-forward usage``: the ledger's figures on the command line, read
straight from the SQLite file or PostgreSQL (no running proxy needed).
"""

from __future__ import annotations

import csv
import os
import re
import sqlite3
from datetime import date, datetime, timedelta, timezone
from typing import IO, Any, Optional, Sequence

from twisted.python import usage

from ..config import ConfigError, load_config, read_env_file
from . import sql
from .database import DirectDatabase
from .interfaces import GROUP_DIMENSIONS, GROUPS, UsageRow

_RELATIVE = re.compile(r"^(\d{1,4})d$")


def utc_today() -> date:
    """Today's UTC date (the ledger's days are UTC days)."""
    return datetime.now(timezone.utc).date()


def parse_day(value: str, today: date) -> date:
    """``YYYY-MM-DD`` (a longer ISO time is cut to its day), ``today``,
    ``yesterday``, or ``Nd``: the first of the last N UTC days (``1d`` is
    today, ``7d`` the week ending today).  The command line and the admin
    API both read days with it.

    :raises ValueError: for anything else, saying why.
    """
    text = value.strip().lower()
    if text == "today":
        return today
    if text == "yesterday":
        return today - timedelta(days=1)
    match = _RELATIVE.match(text)
    if match:
        days = int(match.group(1))
        if days < 1:
            raise ValueError(f"{value!r} must be at least 1d")
        return today - timedelta(days=days - 1)
    try:
        return date.fromisoformat(text[:10])
    except ValueError:
        raise ValueError(
            f"{value!r} is not a day: YYYY-MM-DD, today, yesterday or Nd (7d: the last 7 days)"
        ) from None


def _cli_day(value: str, today: date) -> date:
    """:func:`parse_day` for the command line."""
    try:
        return parse_day(value, today)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


class UsageOptions(usage.Options):
    """``usage``: requests, tokens and cost from the ledger."""

    synopsis = "[--since 7d] [--until DAY] [--by key|model|day|route|detail] [--csv]"
    longdesc = (
        "Print the ledger's figures for a period of UTC days (both ends included), "
        "grouped by key label, model, day or route. Reads DATABASE_URL (PostgreSQL) or "
        "the SQLite file in DATA_DIR, from the options, the environment or the .env file, "
        "as the proxy does; the proxy need not be running."
    )
    optFlags = [["csv", None, "Write CSV (the admin API's column names) instead of a table."]]
    optParameters = [
        ["since", "s", "7d", "First day: YYYY-MM-DD, today, yesterday or Nd (the last N days)."],
        ["until", "u", "today", "Last day (included), same forms."],
        ["by", "b", "key", f"Group rows by: {', '.join(GROUPS)}."],
        ["key", "k", None, "Only this key label."],
        ["model", "m", None, "Only this model."],
        ["data-dir", None, None, "Directory of ledger.sqlite3 [DATA_DIR]."],
        ["database-url", None, None, "postgresql://… ledger instead [DATABASE_URL]."],
        ["log-dir", None, None, "LOG_DIR, to find the default DATA_DIR beside it [LOG_DIR]."],
        ["env-file", None, ".env", "Read settings from this file if it exists."],
    ]

    def postOptions(self) -> None:
        if self["by"] not in GROUPS:
            raise usage.UsageError(f"--by must be one of {', '.join(GROUPS)}")
        today = utc_today()
        self["since-day"] = _cli_day(self["since"], today)
        self["until-day"] = _cli_day(self["until"], today)
        if self["since-day"] > self["until-day"]:
            raise usage.UsageError("--since is after --until")


def open_database(options: UsageOptions, environ: dict[str, str]) -> DirectDatabase:
    """The ledger's database the options and settings name, for reading.

    :raises ConfigError: a bad setting, or no ledger where it should be.
    """
    config = load_config(
        {"data-dir": options["data-dir"], "database-url": options["database-url"],
         "log-dir": options["log-dir"]},
        environ,
        read_env_file(options["env-file"]),
    )
    if config.database_url:
        return DirectDatabase(sql.postgresql_dialect(config.database_url))
    path = os.path.join(config.ledger_dir, sql.SQLITE_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"no ledger at {path} (set DATA_DIR or DATABASE_URL)")

    def connect() -> sqlite3.Connection:
        # Read-only: the command never creates nor changes the ledger.
        return sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, timeout=sql.STATEMENT_TIMEOUT, isolation_level=None
        )

    return DirectDatabase(sql.Dialect("sqlite", connect, path, "?"))


def read_rows(database: DirectDatabase, options: UsageOptions) -> list[UsageRow]:
    """The rows the options ask for (none when the ledger has no table yet)."""
    dialect = database.dialect

    def work(cursor: Any) -> list[UsageRow]:
        if sql.schema_version_or_none(cursor, dialect) is None:
            return []
        return sql.select(
            cursor, dialect, options["since-day"], options["until-day"],
            options["key"], options["model"], options["by"],
        )

    return database.run_blocking(work, write=False)


_COLUMNS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens",
            "total_tokens", "cost_usd", "request_bytes", "response_bytes", "ttfb_mean")
_HEADINGS = {"key_label": "key", "prompt_tokens": "prompt", "completion_tokens": "completion",
             "cached_tokens": "cached", "total_tokens": "tokens", "cost_usd": "cost $",
             "request_bytes": "bytes in", "response_bytes": "bytes out", "ttfb_mean": "ttfb s"}


def _dimensions(group: str) -> list[str]:
    kept = GROUP_DIMENSIONS[group]
    return [d for d in ("day", "key_label", "model", "route") if d in kept]


def write_csv(rows: Sequence[UsageRow], group: str, out: IO[str]) -> None:
    """Rows as CSV, with the admin API's field names."""
    names = _dimensions(group) + list(_COLUMNS)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        fields = row.as_dict()
        writer.writerow(["" if fields.get(n) is None else fields[n] for n in names])


def _cell(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name == "cost_usd":
        return f"{value:.4f}"
    if name == "ttfb_mean":
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value) or "(none)"


def write_table(rows: Sequence[UsageRow], group: str, out: IO[str]) -> None:
    """Rows as an aligned table with a total line."""
    dims = _dimensions(group)
    names = dims + list(_COLUMNS)
    lines = [[_HEADINGS.get(n, n) for n in names]]
    total = UsageRow()
    for row in rows:
        fields = row.as_dict()
        lines.append([_cell(n, fields.get(n)) for n in names])
        total.add(row)
    if len(rows) > 1:
        fields = total.as_dict()
        lines.append(["total"] + [""] * (len(dims) - 1) + [_cell(n, fields.get(n)) for n in _COLUMNS])
    widths = [max(len(line[i]) for line in lines) for i in range(len(names))]
    for line in lines:
        cells = [
            cell.ljust(width) if i < len(dims) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths))
        ]
        out.write("  ".join(cells).rstrip() + "\n")


def run_usage(options: UsageOptions, out: IO[str], err: IO[str],
              environ: Optional[dict[str, str]] = None) -> int:
    """The ``usage`` command; returns the exit status."""
    try:
        database = open_database(options, dict(os.environ if environ is None else environ))
        rows = read_rows(database, options)
        database.close()
    except ConfigError as e:
        err.write(f"twisted-forward usage: {e}\n")
        return 1
    except Exception as e:  # the database's own error, one line
        lines = str(e).strip().splitlines()
        err.write(f"twisted-forward usage: cannot read the ledger: {type(e).__name__}: "
                  f"{lines[0] if lines else ''}\n")
        return 1
    if options["csv"]:
        write_csv(rows, options["by"], out)
    elif not rows:
        err.write(f"no usage from {options['since-day']} to {options['until-day']}\n")
    else:
        write_table(rows, options["by"], out)
    return 0
