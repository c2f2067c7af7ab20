"""
The most recent chat records, newest first, for ``GET /_admin/api/exchanges``.

Blocking: the files are read from their ends backwards, a block at a time,
and the caller runs :func:`recent_records` in a thread, never on the
reactor thread.  A search reads at most ``budget`` bytes, so a query that
matches nothing in a large log answers in bounded time and says it stopped
early (``truncated``).

Chat records hold no secret (the recorder masks every configured key before
a line is written); the API masks configured secrets once more on the way
out.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from ..chat.files import record_files

#: Bytes read from the end of a file at a time.
BLOCK = 1 << 16
#: Bytes a search reads at most, over every file.
DEFAULT_BUDGET = 64 << 20


@dataclass
class Found:
    """What a search found.

    :ivar records: the matching records, newest first.
    :ivar scanned: bytes read.
    :ivar truncated: True when the budget ran out before the oldest file's
        start (older records may match too).
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    scanned: int = 0
    truncated: bool = False


def lines_backwards(path: str, block: int = BLOCK) -> Iterator[tuple[bytes, int]]:
    """The lines of ``path``, last first, each with the bytes read so far."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        position = f.tell()
        read = 0
        rest = b""
        while position > 0:
            size = min(block, position)
            position -= size
            f.seek(position)
            chunk = f.read(size)
            read += len(chunk)
            data = chunk + rest
            lines = data.split(b"\n")
            rest = lines[0]
            for line in reversed(lines[1:]):
                if line.strip():
                    yield line, read
        if rest.strip():
            yield rest, read


def _texts(value: Any) -> Iterator[str]:
    """Every string inside a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _texts(item)


#: The fields a search looks in.
SEARCHED = ("request_id", "model", "key_label", "path", "messages", "choices", "error", "excerpt")


def matches(record: dict[str, Any], key: Optional[str], words: list[str]) -> bool:
    """Whether ``record`` is of key label ``key`` (if given) and holds
    every word of the search (case-insensitive)."""
    if key is not None and record.get("key_label") != key:
        return False
    if not words:
        return True
    haystack = "\n".join(
        text for name in SEARCHED for text in _texts(record.get(name))
    ).casefold()
    return all(word in haystack for word in words)


def recent_records(
    directory: str,
    limit: int,
    key: Optional[str] = None,
    query: str = "",
    request_id: Optional[str] = None,
    budget: int = DEFAULT_BUDGET,
) -> Found:
    """Up to ``limit`` records of ``directory``, newest first, that match.

    :param key: only records of this key label.
    :param query: words that must all appear in the record's text.
    :param request_id: only the record of this request (then ``limit`` 1).
    """
    words = query.casefold().split()
    found = Found()
    spent = 0
    for path in reversed(record_files(directory)):
        read_here = 0
        try:
            for line, read_here in lines_backwards(path):
                if spent + read_here > budget:
                    found.truncated = True
                    break
                if request_id is not None and request_id.encode("utf-8") not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(record, dict):
                    continue
                if request_id is not None and record.get("request_id") != request_id:
                    continue
                if matches(record, key, words):
                    found.records.append(record)
                    if len(found.records) >= limit:
                        break
        except OSError:
            continue  # a file removed or unreadable: the others still count
        spent += read_here
        if found.truncated or len(found.records) >= limit:
            break
    found.scanned = spent
    return found
