"""
``python -m twisted_forward.chat export ...``: chat records as one JSON or
JSON-lines export, filtered by time, model, key label and kind.
"""

from __future__ import annotations

import json
import os
import re
import sys
from datetime import datetime, timedelta, timezone
from fnmatch import fnmatchcase
from typing import IO, Any, Optional, Sequence

from twisted.python import usage

from .files import read_records, record_files


def _iso(value: str) -> datetime:
    """``datetime.fromisoformat`` that takes a trailing ``Z`` before 3.11 too."""
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    return datetime.fromisoformat(value)


def _parse_when(value: str, end: bool) -> datetime:
    """A date or date-time bound; a bare date as an end bound means its
    whole day.  Times without an offset are UTC."""
    try:
        if _DATE_ONLY.match(value):
            when = datetime.fromisoformat(value).replace(tzinfo=timezone.utc)
            return when + timedelta(days=1) if end else when
        when = _iso(value)
    except ValueError:
        raise usage.UsageError(f"{value!r} is not a date (YYYY-MM-DD) or ISO date-time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when


_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class ExportOptions(usage.Options):
    """``export``: chat records as one JSON or JSON-lines file."""

    synopsis = "[options]"
    longdesc = (
        "Read the chat_*.jsonl files of the log directory and write the records "
        "that pass every filter, in file order, as JSON lines or one JSON array. "
        "Repeat --model, --key-label or --kind to accept any of several values; "
        "they take shell-style patterns (gpt-4o*)."
    )
    optParameters = [
        ["log-dir", "d", None, "Directory of the records [default: $LOG_DIR, else Log]."],
        ["since", None, None, "Records from this UTC date or ISO date-time on."],
        ["until", None, None,
         "Records up to this UTC date (inclusive) or before this ISO date-time."],
        ["format", "f", "jsonl", "jsonl (one record a line) or json (one array)."],
        ["output", "o", "-", "Write here instead of standard output."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["model"] = []
        self["key-label"] = []
        self["kind"] = []

    def opt_model(self, pattern: str) -> None:
        """Only records whose model matches (repeatable)."""
        self["model"].append(pattern)

    def opt_key_label(self, pattern: str) -> None:
        """Only records made with this forward-key label (repeatable)."""
        self["key-label"].append(pattern)

    def opt_kind(self, kind: str) -> None:
        """Only records of this kind: chat, completion, embeddings, audio, images."""
        self["kind"].append(kind)

    opt_m = opt_model
    opt_k = opt_key_label

    def postOptions(self) -> None:
        if self["format"] not in ("jsonl", "json"):
            raise usage.UsageError("--format must be jsonl or json")
        if self["log-dir"] is None:
            self["log-dir"] = os.environ.get("LOG_DIR") or "Log"
        self["since-time"] = _parse_when(self["since"], False) if self["since"] else None
        self["until-time"] = _parse_when(self["until"], True) if self["until"] else None

    def accepts(self, record: dict[str, Any]) -> bool:
        """Whether ``record`` passes the filters."""
        if self["since-time"] is not None or self["until-time"] is not None:
            try:
                when = _iso(str(record.get("time")))
            except ValueError:
                return False
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            if self["since-time"] is not None and when < self["since-time"]:
                return False
            if self["until-time"] is not None and when >= self["until-time"]:
                return False
        for option, value in (
            ("model", record.get("model")),
            ("key-label", record.get("key_label")),
            ("kind", record.get("kind")),
        ):
            patterns = self[option]
            if patterns and not any(fnmatchcase(str(value), p) for p in patterns):
                return False
        return True


class ChatLogOptions(usage.Options):
    """``python -m twisted_forward.chat``: tools for the chat records."""

    synopsis = "Usage: python -m twisted_forward.chat"
    longdesc = "Tools for the chat records that twistd openai-forward writes to LOG_DIR."
    subCommands = [
        ["export", None, ExportOptions, "Export records as one JSON or JSON-lines file."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("say what to do: export")


def export(options: ExportOptions, out: IO[bytes]) -> tuple[int, list[str]]:
    """Write the records ``options`` select to ``out``.

    :returns: how many records were written, and the places of lines that
        were not records.
    """
    first_day = last_day = None
    if options["since-time"] is not None:
        first_day = options["since-time"].astimezone(timezone.utc).date().isoformat()
    if options["until-time"] is not None:
        last_day = options["until-time"].astimezone(timezone.utc).date().isoformat()
    paths = record_files(options["log-dir"], first_day, last_day)
    bad: list[str] = []
    count = 0
    as_array = options["format"] == "json"
    if as_array:
        out.write(b"[")
    for record in read_records(paths, bad):
        if not options.accepts(record):
            continue
        line = json.dumps(record, ensure_ascii=False).encode("utf-8", "backslashreplace")
        if as_array:
            out.write(b"\n" if count == 0 else b",\n")
            out.write(line)
        else:
            out.write(line + b"\n")
        count += 1
    if as_array:
        out.write(b"\n]\n" if count else b"]\n")
    return count, bad


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    options = ChatLogOptions()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        sys.stderr.write(f"{options}\nerror: {e}\n")
        return 2
    return run_export(options.subOptions)


def run_export(sub: ExportOptions) -> int:
    """The ``export`` command with parsed options; returns the exit status."""
    if not os.path.isdir(sub["log-dir"]):
        sys.stderr.write(f"error: {sub['log-dir']} is not a directory\n")
        return 1
    if sub["output"] == "-":
        count, bad = export(sub, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        with open(sub["output"], "wb") as out:
            count, bad = export(sub, out)
    sys.stderr.write(f"exported {count} record(s)\n")
    for place in bad[:20]:
        sys.stderr.write(f"skipped a line that is not a record: {place}\n")
    if len(bad) > 20:
        sys.stderr.write(f"... and {len(bad) - 20} more\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
