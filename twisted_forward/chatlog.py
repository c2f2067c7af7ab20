"""
Chat records: the interface the proxy feeds, and the recorder behind it.

The proxy calls :meth:`Recorder.begin` once per exchange on an ``openai``
route; the returned :class:`ExchangeTap` (or None: not recorded) sees the
answer's head, every body chunk as it is relayed, and the end.

:class:`ChatRecorder` taps chat completions, completions, embeddings, audio
and images; at the end of each exchange it emits one event carrying the
record on ``Logger(namespace="twisted_forward.chat")``.  The events go to
the recorder's own :class:`~twisted.logger.LogPublisher` (so conversations
never land in the process log), where a
:class:`~twisted_forward.chatfiles.ChatLogObserver` writes them as JSON
lines.  The record's fields are in :mod:`twisted_forward.chatrecord` and
``notes/README-chatlog.md``.

``python -m twisted_forward.chatlog export ...`` turns the files into one
JSON or JSON-lines export (see :class:`ExportOptions`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from fnmatch import fnmatchcase
from typing import IO, Any, Callable, Iterable, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger, LogPublisher
from twisted.python import usage
from twisted.web.http_headers import Headers

from .chatfiles import (
    CHAT_NAMESPACE,
    RECORD_FIELD,
    ChatLogObserver,
    RecordFiles,
    Runner,
    read_records,
    record_files,
    thread_runner,
    utc_iso,
)
from .chatrecord import CONVERSATION_KINDS, AnswerReader, exchange_kind, summarize_request


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


# ---------------------------------------------------------------- recording


class ChatRecorder:
    """Taps the recorded kinds of exchange and emits one record each.

    :param clock: the reactor's clock, for durations.
    :param observers: log observers for the record events (the JSON-lines
        writer; tests add their own).  More can be added to
        :attr:`publisher` later.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, observers: Sequence[ILogObserver] = ()) -> None:
        self.clock = clock
        self.publisher = LogPublisher(*observers)
        self.chat_log = Logger(namespace=CHAT_NAMESPACE, observer=self.publisher)
        self._closables = [o for o in observers if hasattr(o, "close")]

    def begin(self, info: ExchangeInfo) -> Optional[ExchangeTap]:
        """A tap for a recorded kind of exchange; None for any other."""
        try:
            kind = exchange_kind(info.method, info.path)
            if kind is None:
                return None
            return ChatTap(self, info, kind)
        except Exception:
            self.log.failure("chat recorder: could not start a record")
            return None

    def emit(self, record: dict[str, Any]) -> None:
        """Publish one finished exchange's record."""
        self.chat_log.info(
            "{kind} exchange {request_id}: {status} {outcome}",
            kind=record.get("kind"),
            request_id=record.get("request_id"),
            status=record.get("status"),
            outcome=record.get("outcome"),
            **{RECORD_FIELD: record},
        )

    def flush(self) -> "Deferred[Any]":
        """Fires when every record emitted so far is on disk."""
        return gatherResults(
            [o.flush() for o in self._closables if hasattr(o, "flush")], consumeErrors=True
        )

    def close(self) -> "Deferred[Any]":
        """Flush and close the files (at shutdown, after the last exchange)."""
        return gatherResults([o.close() for o in self._closables], consumeErrors=True)


class ChatTap:
    """Follows one exchange and turns it into a record at its end.

    Every method swallows its own errors: recording must never break nor
    slow the relay.  The request body is read at the start (Twisted drops
    it when the answer finishes) but parsed only at the end.
    """

    log = Logger()

    def __init__(self, recorder: ChatRecorder, info: ExchangeInfo, kind: str) -> None:
        self.recorder = recorder
        self.info = info
        self.kind = kind
        self.reader = AnswerReader(kind)
        self.ended = False
        self.broken: Optional[str] = None
        self.request_fields: Optional[dict[str, Any]] = None
        body = info.read_body()
        if kind not in CONVERSATION_KINDS and body.startswith(b"--"):
            # A multipart upload (audio, image): take its few fields now
            # rather than hold megabytes until the end.
            self.request_fields = summarize_request(kind, body)
            self.body = b""
        else:
            self.body = body

    def response(self, status: int, headers: Headers) -> None:
        """The answer's head (or the proxy's own error status)."""
        try:
            if self.reader.status is not None:
                self.reader = AnswerReader(self.kind)  # a second head replaces the first
            self.reader.head(status, headers)
        except Exception:
            self._break()

    def data(self, chunk: bytes) -> None:
        """A relayed body chunk: decoded for the record, never changed."""
        if self.broken is not None:
            self.reader.size += len(chunk)
            return
        try:
            self.reader.feed(chunk)
        except Exception:
            self._break()

    def _break(self) -> None:
        self.broken = "the recorder failed to decode the answer"
        self.log.failure("chat recorder: decoding failed for {request_id}",
                         request_id=self.info.request_id)

    def end(self, outcome: str) -> None:
        """The exchange is over: build its record and emit it, once."""
        if self.ended:
            return
        self.ended = True
        try:
            record = self.record(outcome)
        except Exception:
            self.log.failure("chat recorder: building the record failed")
            record = self._base(outcome)
            record.update(self._outcome(outcome))
            record["problems"] = ["the recorder failed to build this record"]
        try:
            self.recorder.emit(record)
        except Exception:
            self.log.failure("chat recorder: emitting the record failed")

    def _base(self, outcome: str) -> dict[str, Any]:
        info = self.info
        return {
            "time": utc_iso(info.started),
            "request_id": info.request_id,
            "kind": self.kind,
            "route": info.route,
            "path": info.path,
            "client": info.client,
            "key_label": info.key_label,
        }

    def _outcome(self, outcome: str) -> dict[str, Any]:
        return {
            "status": self.reader.status,
            "outcome": outcome,
            "client_left": outcome == "client_left",
            "duration": round(max(0.0, self.recorder.clock.seconds() - self.info.started), 3),
            "response_bytes": self.reader.size,
        }

    def record(self, outcome: str) -> dict[str, Any]:
        """The record of the exchange, ended with ``outcome``."""
        request = self.request_fields
        if request is None:
            request = summarize_request(self.kind, self.body)
        self.body = b""
        answer = self.reader.result()
        problems = list(request.pop("problems", ())) + answer.pop("problems")
        if self.broken is not None:
            problems.append(self.broken)
        record = self._base(outcome)
        record["model"] = request.pop("model") or answer.get("response_model")
        record["stream"] = request.pop("stream") or answer["format"] == "sse"
        record.update(request)  # messages or prompt, params
        record.update(self._outcome(outcome))
        choices = answer.get("choices")
        excerpt = answer.pop("excerpt", None)
        record.update(answer)
        if choices is not None:
            record["finish_reason"] = choices[0]["finish_reason"] if choices else None
            record["usage"] = record.pop("usage")
            record["error"] = record.pop("error")
        record["problems"] = problems
        if excerpt is not None:
            record["excerpt"] = excerpt
        return record


def open_chat_log(
    directory: str,
    reactor: Any,
    secrets: Iterable[str] = (),
    run: Optional[Runner] = None,
    max_bytes: int = 100 * 1000 * 1000,
) -> ChatRecorder:
    """The recorder of the running proxy: JSON lines in ``directory``.

    The directory is created now, so a LOG_DIR the proxy cannot write to
    stops it at start-up rather than losing records later.

    :raises OSError: when the directory cannot be created or written to.
    """
    os.makedirs(directory, exist_ok=True)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"{directory} is not writable")
    observer = ChatLogObserver(
        RecordFiles(directory, max_bytes),
        reactor,
        run if run is not None else thread_runner(reactor),
        secrets,
    )
    return ChatRecorder(reactor, [observer])


# ---------------------------------------------------------------- export


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
    """``python -m twisted_forward.chatlog``: tools for the chat records."""

    synopsis = "Usage: python -m twisted_forward.chatlog"
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
    sub = options.subOptions
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
