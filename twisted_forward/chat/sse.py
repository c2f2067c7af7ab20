"""
An incremental decoder for ``text/event-stream`` bodies (Server-Sent Events).

It follows the WHATWG HTML standard's event-stream interpretation
(section 9.2.6): lines end with ``\\r\\n``, ``\\n`` or ``\\r`` (a ``\\r`` at
the end of one chunk and a ``\\n`` at the start of the next are one line
end); a line starting with ``:`` is a comment; ``field: value`` loses one
space after the colon; ``data`` lines of one event are joined with ``\\n``;
an empty line dispatches the event, and an event with no ``data`` is not
dispatched; a UTF-8 byte order mark at the very start is dropped; an
unfinished event at the end of the stream is not dispatched.

OpenAI's streams end with ``data: [DONE]``: the decoder stops there and
ignores whatever follows.

Bytes are split into lines before they are decoded (line ends are ASCII, so
a multi-byte UTF-8 sequence split across chunks is never cut), and each
event's data is decoded once, as UTF-8 with replacement characters for
invalid sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

_BOM = b"\xef\xbb\xbf"
#: Default bound on an unfinished line or event, against an endless one.
MAX_EVENT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Event:
    """One dispatched server-sent event.

    :ivar data: the event's data lines joined with ``\\n``.
    :ivar event: the event type (``message`` unless an ``event:`` field said
        otherwise).
    :ivar id: the last event ID seen so far in the stream, if any.
    """

    data: str
    event: str = "message"
    id: Optional[str] = None


class SSEDecoder:
    """Turns the chunks of one event stream into :class:`Event` objects.

    Feed every chunk, in order, to :meth:`feed`; call :meth:`close` at the end
    of the stream.  Nothing is ever raised for bad input: a stream whose
    unfinished line or event grows beyond ``max_event_bytes`` sets
    :attr:`overflow` and is decoded no further.

    :ivar done: ``data: [DONE]`` was seen; later bytes are ignored.
    :ivar after_done: how many bytes came after ``[DONE]``.
    :ivar overflow: an event grew past the bound; decoding stopped.
    :ivar comments: how many comment lines were seen.
    :ivar retry: the last valid ``retry:`` value, in milliseconds.
    """

    __slots__ = (
        "max_event_bytes", "done", "after_done", "overflow", "comments", "retry", "_parts",
        "_parts_size", "_skip_lf", "_first", "_bom", "_data", "_data_size", "_event", "_last_id",
    )

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.done = False
        self.after_done = 0
        self.overflow = False
        self.comments = 0
        self.retry: Optional[int] = None
        self._parts: list[bytes] = []  # an unfinished line, in pieces
        self._parts_size = 0
        self._skip_lf = False  # the last chunk ended with \r
        self._first = True  # no byte seen yet (for the BOM)
        self._bom = b""  # the start of a possible BOM
        self._data: list[bytes] = []
        self._data_size = 0
        self._event = b""
        self._last_id: Optional[bytes] = None

    @property
    def pending(self) -> bool:
        """True while an unfinished line or undispatched event is held."""
        return bool(self._parts or self._data or self._event or self._bom)

    def feed(self, chunk: bytes) -> list[Event]:
        """Decode one more chunk; returns the events it completed."""
        if self.done:
            self.after_done += len(chunk)
            return []
        if self.overflow or not chunk:
            return []
        if self._first:
            # A byte order mark may open the stream, even split across chunks.
            head = self._bom + chunk
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._bom = head
                return []
            self._first = False
            self._bom = b""
            chunk = head[len(_BOM) :] if head.startswith(_BOM) else head
            if not chunk:
                return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return []
        lines = chunk.splitlines(True)
        last = lines[-1]
        tail: Optional[bytes] = None
        if last[-1:] not in (b"\n", b"\r"):
            tail = lines.pop()
        elif last[-1:] == b"\r":
            self._skip_lf = True
        events: list[Event] = []
        for i, raw in enumerate(lines):
            if self._parts:
                self._parts.append(raw)
                raw = b"".join(self._parts)
                self._parts = []
                self._parts_size = 0
            if raw[-2:] == b"\r\n":
                line = raw[:-2]
            else:
                line = raw[:-1]
            self._line(line, events)
            if self.done:
                self._skip_lf = False
                self.after_done += sum(len(rest) for rest in lines[i + 1 :])
                if tail is not None:
                    self.after_done += len(tail)
                return events
            if self.overflow:
                return events
        if tail is not None:
            self._parts.append(tail)
            self._parts_size += len(tail)
            if self._parts_size + self._data_size > self.max_event_bytes:
                self._overflow()
        return events

    def close(self) -> bool:
        """The stream ended.  Returns True if it ended mid-event.

        Per the standard, an unfinished event is discarded, not dispatched.
        """
        unfinished = self.pending and not self.done
        self._parts = []
        self._data = []
        self._event = b""
        return unfinished

    def _overflow(self) -> None:
        self.overflow = True
        self._parts = []
        self._data = []
        self._event = b""

    def _line(self, line: bytes, events: list[Event]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line[:1] == b":":
            self.comments += 1
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._data_size += len(value) + 1
            if self._data_size > self.max_event_bytes:
                self._overflow()
        elif name == b"event":
            self._event = value
        elif name == b"id":
            if b"\0" not in value:
                self._last_id = value
        elif name == b"retry":
            if value.isdigit():
                self.retry = int(value)
        # Any other field name is ignored, as the standard says.

    def _dispatch(self, events: list[Event]) -> None:
        if not self._data:
            self._event = b""
            return
        data = b"\n".join(self._data).decode("utf-8", "replace")
        event_type = self._event.decode("utf-8", "replace") or "message"
        last_id = None if self._last_id is None else self._last_id.decode("utf-8", "replace")
        self._data = []
        self._data_size = 0
        self._event = b""
        if data == "[DONE]":
            self.done = True
            return
        events.append(Event(data, event_type, last_id))
