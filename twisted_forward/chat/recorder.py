"""
Chat records: the interface the proxy feeds, and the recorder behind it.

The proxy calls :meth:`IRecorder.begin` once per exchange on an ``openai``
route; the returned :class:`IExchangeTap` (or None: not recorded) sees the
answer's head, every body chunk as it is relayed, and the end.

:class:`ChatRecorder` taps chat completions, completions, embeddings, audio
and images; at the end of each exchange it emits one event carrying the
record on ``Logger(namespace="twisted_forward.chat")``.  The events go to
the recorder's own :class:`~twisted.logger.LogPublisher` (so conversations
never land in the process log), where a
:class:`~twisted_forward.chat.files.ChatLogObserver` writes them as JSON
lines.  The record's fields are in :mod:`twisted_forward.chat.record` and
the README.

``python -m twisted_forward.chat export ...`` turns the files into one
JSON or JSON-lines export (:mod:`twisted_forward.chat.export`).
"""

from __future__ import annotations

import os
from typing import IO, Any, Callable, Iterable, Optional, Sequence

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger, LogPublisher
from twisted.web.http_headers import Headers
from zope.interface import Interface, implementer

from ..sharedjson import SharedParse
from .files import (
    CHAT_NAMESPACE,
    RECORD_FIELD,
    ChatLogObserver,
    RecordFiles,
    Runner,
    thread_runner,
    utc_iso,
)
from .record import (
    CONVERSATION_KINDS,
    METADATA_LIMIT,
    PEEK,
    REQUEST_LIMIT,
    REQUEST_SCAN_LIMIT,
    AnswerReader,
    MediaCompactor,
    exchange_kind,
    summarize_large_request,
    summarize_request,
)

#: Pieces a large request body is read in for its record.
SCAN_PIECE = 256 * 1024


class RequestBody:
    """A request body as the recorder may see it: its length and bounded
    slices of it, never the whole (Twisted keeps bodies of 100 kB and more
    in a temporary file; reading one whole would put it in memory).

    :param content: the request's body file (``request.content``), or None.
        Its position is left where it was found: the exchange sends the body
        from it.
    """

    __slots__ = ("_content", "length",)

    def __init__(self, content: Optional[IO[bytes]]) -> None:
        self._content = content
        if content is None:
            self.length = 0
        else:
            here = content.tell()
            self.length = content.seek(0, os.SEEK_END)
            content.seek(here)

    def _read(self, offset: int, size: int) -> bytes:
        content = self._content
        if content is None or size <= 0:
            return b""
        if offset == 0 and size >= self.length:
            getvalue = getattr(content, "getvalue", None)
            if getvalue is not None:
                # A body in memory, whole: the file's own bytes object, the
                # one the exchange sends upstream too, not another copy
                # held for the whole answer.
                return getvalue()
        here = content.tell()
        try:
            content.seek(offset)
            return content.read(size)
        finally:
            content.seek(here)

    def head(self, size: int) -> bytes:
        """At most the first ``size`` bytes."""
        return self._read(0, min(size, self.length))

    def scan(self, piece_size: int, take: Callable[[bytes], bool]) -> None:
        """Hand the body to ``take`` in pieces of ``piece_size`` bytes, from
        the start, until it ends or ``take`` says False."""
        content = self._content
        if content is None:
            return
        here = content.tell()
        try:
            content.seek(0)
            while True:
                piece = content.read(piece_size)
                if not piece or not take(piece):
                    return
        finally:
            content.seek(here)

    def tail(self, size: int) -> bytes:
        """At most the last ``size`` bytes (none of them in :meth:`head`'s
        ``size`` bytes when the body is shorter than twice that)."""
        size = min(size, max(0, self.length - size))
        return self._read(self.length - size, size)


class ExchangeInfo:
    """What is known of an exchange when its request has arrived.

    Slotted: every open stream holds one.

    :ivar body: the request body, read only as far as the record needs.
    :ivar cache: what the response cache did (``hit``, ``miss``,
        ``bypass``), set by the exchange once known; ``""`` when the cache
        is off.  A record of a hit says ``"cache": "hit"``.
    :ivar shared: the parses of the request and answer bodies the policies
        made, for the record to take instead of parsing again; None when
        the policies read neither.
    """

    __slots__ = (
        "request_id", "route", "method", "path", "client", "key_label", "started", "body",
        "cache", "shared",
    )

    def __init__(
        self,
        request_id: str,
        route: str,
        method: str,
        path: str,
        client: str,
        key_label: str,
        started: float,
        body: RequestBody,
        cache: str = "",
        shared: Optional[SharedParse] = None,
    ) -> None:
        self.request_id = request_id
        self.route = route
        self.method = method
        self.path = path
        self.client = client
        self.key_label = key_label
        self.started = started
        self.body = body
        self.cache = cache
        self.shared = shared

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self.__slots__
            if name not in ("body", "shared")
        )
        return f"ExchangeInfo({fields})"


class IExchangeTap(Interface):
    """Sees one exchange's answer as it is relayed.  Must never raise."""

    def response(status: int, headers: Headers) -> None:
        """The answer's head, as relayed (or the proxy's own error)."""

    def data(chunk: bytes) -> None:
        """A body chunk, after it was written to the client."""

    def end(outcome: str) -> None:
        """The exchange is over: ``complete``, ``client_left``,
        ``upstream_error``, ``idle_timeout``, ``proxy_error`` or
        ``shutdown`` (cut when the shutdown grace period ran out)."""


class IRecorder(Interface):
    """Decides which exchanges are recorded and records them: the chat
    records, the ledger's counting, or several behind one (:class:`FanOut`)."""

    def begin(info: ExchangeInfo) -> Optional[IExchangeTap]:
        """Start recording an exchange; None if it is not to be recorded."""


@implementer(IRecorder)
class NullRecorder:
    """Records nothing (LOG_CHAT=false)."""

    def begin(self, info: ExchangeInfo) -> Optional[IExchangeTap]:
        return None


@implementer(IRecorder)
class FanOut:
    """Several recorders behind one: each exchange gets the taps of all
    those that want it (the chat records, the ledger's counting, …)."""

    log = Logger()

    def __init__(self, recorders: Sequence[IRecorder]) -> None:
        self.recorders = tuple(recorders)

    def begin(self, info: ExchangeInfo) -> Optional[IExchangeTap]:
        """One tap feeding every recorder's tap; None if none wants it."""
        taps = []
        for recorder in self.recorders:
            try:
                tap = recorder.begin(info)
            except Exception:
                self.log.failure("a recorder could not start")
                continue
            if tap is not None:
                taps.append(tap)
        if not taps:
            return None
        return taps[0] if len(taps) == 1 else FanOutTap(taps)


@implementer(IExchangeTap)
class FanOutTap:
    """Hands each event of an exchange to several taps, shielding each
    from the others' errors."""

    log = Logger()

    def __init__(self, taps: Sequence[IExchangeTap]) -> None:
        self.taps = tuple(taps)

    def response(self, status: int, headers: Headers) -> None:
        for tap in self.taps:
            try:
                tap.response(status, headers)
            except Exception:
                self.log.failure("a tap failed on the answer's head")

    def data(self, chunk: bytes) -> None:
        for tap in self.taps:
            try:
                tap.data(chunk)
            except Exception:
                self.log.failure("a tap failed on a body chunk")

    def end(self, outcome: str) -> None:
        for tap in self.taps:
            try:
                tap.end(outcome)
            except Exception:
                self.log.failure("a tap failed at the end of an exchange")


# ---------------------------------------------------------------- recording


@implementer(IRecorder)
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
        self._writers = [o for o in observers if isinstance(o, ChatLogObserver)]

    def begin(self, info: ExchangeInfo) -> Optional[IExchangeTap]:
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

    def counts(self) -> dict[str, int]:
        """Waiting, failed and dropped records of the record files, summed."""
        total = {"pending": 0, "write_failures": 0, "dropped": 0}
        for writer in self._writers:
            for name, value in writer.counts().items():
                total[name] += value
        return total

    def flush(self) -> "Deferred[Any]":
        """Fires when every record emitted so far is on disk."""
        return gatherResults(
            [o.flush() for o in self._closables if hasattr(o, "flush")], consumeErrors=True
        )

    def close(self) -> "Deferred[Any]":
        """Flush and close the files (at shutdown, after the last exchange)."""
        return gatherResults([o.close() for o in self._closables], consumeErrors=True)


@implementer(IExchangeTap)
class ChatTap:
    """Follows one exchange and turns it into a record at its end.

    Every method swallows its own errors: recording must never break nor
    slow the relay.  The request body is read at the start (Twisted drops
    it when the answer finishes) but parsed only at the end; only a body
    the record can use is read whole (up to :data:`REQUEST_LIMIT` for a
    conversation, :data:`METADATA_LIMIT` otherwise).  A conversation up to
    :data:`REQUEST_SCAN_LIMIT` is read in pieces with its inline media left
    out (:class:`MediaCompactor`) and kept if the rest fits in
    :data:`REQUEST_LIMIT`.  Of any other body only the first and last
    :data:`PEEK` bytes are read.
    """

    __slots__ = (
        "recorder", "info", "kind", "reader", "ended", "broken", "request_fields", "ttfb", "body",
        "request_bytes",
    )

    log = Logger()

    def __init__(self, recorder: ChatRecorder, info: ExchangeInfo, kind: str) -> None:
        self.recorder = recorder
        self.info = info
        self.kind = kind
        self.reader = AnswerReader(kind, info.shared)
        self.ended = False
        self.broken: Optional[str] = None
        self.request_fields: Optional[dict[str, Any]] = None
        #: Seconds from the request to the answer's first head (None: no head).
        self.ttfb: Optional[float] = None
        self.body = b""
        body = info.body
        self.request_bytes = body.length
        limit = REQUEST_LIMIT if kind in CONVERSATION_KINDS else METADATA_LIMIT
        head = body.head(PEEK)
        if kind in CONVERSATION_KINDS and limit < body.length <= REQUEST_SCAN_LIMIT:
            # Large, maybe an inline image or two: read it piece by piece,
            # leaving the media out; parsed at the end if the rest fits.
            compactor = MediaCompactor(REQUEST_LIMIT)
            body.scan(SCAN_PIECE, compactor.feed)
            compacted = compactor.result()
            if compacted is not None:
                self.body = compacted
                return
        if body.length > limit or (kind not in CONVERSATION_KINDS and head.startswith(b"--")):
            # Too large to parse, or a multipart upload (audio, image): take
            # its few fields now from its ends rather than hold it.
            self.request_fields = summarize_large_request(
                kind, head, body.tail(PEEK), body.length
            )
        else:
            self.body = head if body.length <= PEEK else body.head(limit)

    def response(self, status: int, headers: Headers) -> None:
        """The answer's head (or the proxy's own error status)."""
        try:
            if self.ttfb is None:
                self.ttfb = max(0.0, self.recorder.clock.seconds() - self.info.started)
            if self.reader.status is not None:
                self.reader = AnswerReader(self.kind, self.info.shared)  # a second head replaces the first
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
            **({"cache": info.cache} if info.cache else {}),
        }

    def _outcome(self, outcome: str) -> dict[str, Any]:
        return {
            "status": self.reader.status,
            "outcome": outcome,
            "client_left": outcome == "client_left",
            "duration": round(max(0.0, self.recorder.clock.seconds() - self.info.started), 3),
            "request_bytes": self.request_bytes,
            "response_bytes": self.reader.size,
            "ttfb": None if self.ttfb is None else round(self.ttfb, 4),
        }

    def record(self, outcome: str) -> dict[str, Any]:
        """The record of the exchange, ended with ``outcome``."""
        request = self.request_fields
        if request is None:
            request = summarize_request(self.kind, self.body, self.info.shared)
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
