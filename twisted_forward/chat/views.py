"""
Readable views of the chat records for a terminal: ``chat show`` prints
whole conversations, ``chat tail`` one line per exchange (and, with
``--follow``, the new ones as they are written).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from fnmatch import fnmatchcase
from typing import IO, Any, Callable, Iterable, Optional

from twisted.python import usage

from .files import read_records, record_files


def _text(content: Any) -> str:
    """A message's content as text: parts joined, media named, not shown."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if isinstance(part, dict):
                kind = part.get("type", "")
                if isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                elif kind:
                    pieces.append(f"[{kind}]")
            elif isinstance(part, str):
                pieces.append(part)
        return "\n".join(pieces)
    return json.dumps(content, ensure_ascii=False)


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _tokens(record: dict[str, Any]) -> str:
    usage_ = record.get("usage")
    if not isinstance(usage_, dict):
        return "-"
    prompt = usage_.get("prompt_tokens", usage_.get("input_tokens"))
    completion = usage_.get("completion_tokens", usage_.get("output_tokens"))
    if prompt is None and completion is None:
        return "-"
    return f"{prompt or 0}+{completion or 0}"


def _question(record: dict[str, Any]) -> str:
    messages = record.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _text(message.get("content"))
    prompt = record.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def _answer(record: dict[str, Any]) -> str:
    choices = record.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        text = _text(choice.get("content")) or _text(choice.get("text"))
        if not text and choice.get("tool_calls"):
            names = [c.get("function", {}).get("name", "?") for c in choice["tool_calls"]
                     if isinstance(c, dict)]
            text = "→ " + ", ".join(names)
        return text
    error = record.get("error")
    if isinstance(error, dict):
        return f"error: {error.get('message', '')}"
    return ""


def summary_line(record: dict[str, Any], width: int = 60) -> str:
    """One exchange on one line: when, who, what, how it went, and the
    question and answer cut to ``width`` characters each."""
    when = str(record.get("time", ""))[:19].replace("T", " ")
    parts = [
        when,
        record.get("key_label") or "-",
        record.get("model") or "-",
        str(record.get("status") or "-"),
        record.get("outcome") or "-",
        _tokens(record),
        f"{record.get('duration', 0):.2f}s" if isinstance(record.get("duration"), (int, float))
        else "-",
    ]
    question = _one_line(_question(record), width)
    answer = _one_line(_answer(record), width)
    line = "  ".join(str(p) for p in parts)
    if question or answer:
        line += f"  {question!r} → {answer!r}"
    return line


def conversation(record: dict[str, Any]) -> str:
    """One exchange in full: a heading, every message, every answer choice."""
    out = [
        "── {time}  {kind}  {model}  key={key}  {status} {outcome}  {duration}s  {rid}".format(
            time=record.get("time", "?"), kind=record.get("kind", "?"),
            model=record.get("model") or "-", key=record.get("key_label") or "-",
            status=record.get("status"), outcome=record.get("outcome"),
            duration=record.get("duration"), rid=record.get("request_id", ""),
        )
    ]
    messages = record.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            role = message.get("role", "?")
            out.append(f"{role}: {_text(message.get('content'))}")
            for call in message.get("tool_calls") or ():
                if isinstance(call, dict):
                    function = call.get("function") or {}
                    out.append(f"  → {function.get('name')}({function.get('arguments', '')})")
    elif isinstance(record.get("prompt"), str):
        out.append(f"prompt: {record['prompt']}")
    found = record.get("choices")
    choices: list[Any] = found if isinstance(found, list) else []
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        label = "assistant" if len(choices) == 1 else f"assistant[{choice.get('index')}]"
        out.append(f"{label}: {_text(choice.get('content')) or _text(choice.get('text'))}")
        for call in choice.get("tool_calls") or ():
            if isinstance(call, dict):
                function = call.get("function") or {}
                out.append(f"  → {function.get('name')}({function.get('arguments', '')})")
    error = record.get("error")
    if isinstance(error, dict):
        out.append(f"error: {error.get('message', '')}")
    out.append(f"[finish: {record.get('finish_reason') or '-'} · tokens {_tokens(record)}]")
    return "\n".join(out) + "\n"


class _FilterOptions(usage.Options):
    """The options ``show`` and ``tail`` share."""

    optParameters = [
        ["log-dir", "d", None, "Directory of the records [default: $LOG_DIR, else Log]."],
        ["key-label", "k", None, "Only records of this key label (shell pattern)."],
        ["model", "m", None, "Only records of this model (shell pattern)."],
    ]

    def postOptions(self) -> None:
        if self["log-dir"] is None:
            self["log-dir"] = os.environ.get("LOG_DIR") or "Log"

    def accepts(self, record: dict[str, Any]) -> bool:
        for option, field in (("key-label", "key_label"), ("model", "model")):
            if self[option] is not None and not fnmatchcase(str(record.get(field)), self[option]):
                return False
        return True


class ShowOptions(_FilterOptions):
    """``chat show``: conversations in full."""

    synopsis = "[--request-id ID | -n N] [options]"
    longdesc = "Print the last N exchanges (or the one with --request-id) as conversations."
    optParameters = [
        ["request-id", "r", None, "The exchange with this request id."],
        ["number", "n", "1", "How many of the latest exchanges."],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if not str(self["number"]).isdigit() or int(self["number"]) < 1:
            raise usage.UsageError("--number must be a whole number of at least 1")
        self["number"] = int(self["number"])


class TailOptions(_FilterOptions):
    """``chat tail``: one line per exchange."""

    synopsis = "[-n N] [--follow] [options]"
    longdesc = "Print the last N exchanges one line each; --follow prints new ones as they come."
    optFlags = [["follow", "f", "Keep printing records as they are written (Ctrl-C stops)."]]
    optParameters = [["number", "n", "20", "How many of the latest exchanges."]]

    def postOptions(self) -> None:
        super().postOptions()
        if not str(self["number"]).isdigit():
            raise usage.UsageError("--number must be a whole number")
        self["number"] = int(self["number"])


def _records(options: _FilterOptions) -> Iterable[dict[str, Any]]:
    return (r for r in read_records(record_files(options["log-dir"])) if options.accepts(r))


def show(options: ShowOptions, out: IO[str]) -> int:
    """Print conversations; returns how many."""
    if options["request-id"] is not None:
        found = [r for r in _records(options) if r.get("request_id") == options["request-id"]]
    else:
        found = list(deque(_records(options), maxlen=options["number"]))
    for i, record in enumerate(found):
        if i:
            out.write("\n")
        out.write(conversation(record))
    return len(found)


def tail(
    options: TailOptions,
    out: IO[str],
    sleep: Callable[[float], None] = time.sleep,
    rounds: Optional[int] = None,
) -> int:
    """Print summary lines; with ``--follow``, poll for new records once a
    second (``rounds`` bounds the polls, for tests).  Returns how many."""
    count = 0
    for record in deque(_records(options), maxlen=options["number"]):
        out.write(summary_line(record) + "\n")
        count += 1
    out.flush()
    if not options["follow"]:
        return count
    offsets = {path: os.path.getsize(path) for path in record_files(options["log-dir"])}
    while rounds is None or rounds > 0:
        sleep(1.0)
        if rounds is not None:
            rounds -= 1
        for path in record_files(options["log-dir"]):
            start = offsets.get(path, 0)
            size = os.path.getsize(path)
            if size <= start:
                continue
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(size - start)
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits
            offsets[path] = start + len(complete)
            for line in complete.splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and options.accepts(record):
                    out.write(summary_line(record) + "\n")
                    count += 1
        out.flush()
    return count
