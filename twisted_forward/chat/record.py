"""
What goes into a chat record: the question, taken from the request body, and
the answer, reassembled from the body the proxy relayed.

Pure functions and small accumulators, no I/O: :mod:`twisted_forward.chat.recorder`
feeds them and turns the result into one JSON line.

- :func:`exchange_kind` says which exchanges are recorded at all.
- :func:`summarize_request` reads the request body once, after the answer.
- :class:`AnswerReader` follows the answer chunk by chunk: it undoes gzip or
  deflate, decodes SSE events or buffers a JSON body (bounded), and folds
  streamed chunks into whole choices with :class:`ChoiceAssembler`.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any, Callable, Iterable, Optional

from twisted.web.http_headers import Headers

from ..decoding import INFLATABLE, Inflater
from ..keys import scrub
from ..sharedjson import SharedParse
from .sse import SSEDecoder

#: Kinds whose conversation is recorded in full.
CONVERSATION_KINDS = frozenset({"chat", "completion"})

_KINDS: tuple[tuple["re.Pattern[str]", str], ...] = (
    (re.compile(r"(?:^|/)chat/completions/?$"), "chat"),
    (re.compile(r"(?:^|/)completions/?$"), "completion"),
    (re.compile(r"(?:^|/)embeddings/?$"), "embeddings"),
    (re.compile(r"(?:^|/)audio/(?:transcriptions|translations|speech)/?$"), "audio"),
    (re.compile(r"(?:^|/)images/(?:generations|edits|variations)/?$"), "images"),
)

#: Request fields kept for metadata-only kinds (embeddings, audio, images):
#: settings, never content (no input text, prompt, audio or image).
METADATA_FIELDS = frozenset(
    {
        "model", "n", "size", "quality", "style", "response_format",
        "encoding_format", "dimensions", "user", "language", "temperature",
        "voice", "speed", "background", "output_format", "output_compression",
        "moderation", "stream", "input_fidelity", "timestamp_granularities",
        "timestamp_granularities[]", "include[]", "chunking_strategy",
    }
)

#: Answer bodies kept whole up to this size for decoding.
BODY_LIMIT = 32 * 1024 * 1024
#: Chat and completion request bodies up to this size are read (from the
#: request's spool file) and parsed for their record; a larger one is
#: recorded from its first bytes only (model, stream, size).  Never more of a
#: request body is in memory for its record.
REQUEST_LIMIT = 4 * 1024 * 1024
#: What is read of the start (and of the end) of a body too large to parse,
#: or of a multipart upload, for its model and small fields.
PEEK = 64 * 1024
#: A chat or completion body over REQUEST_LIMIT but not over this is read
#: piece by piece with its inline media left out (:class:`MediaCompactor`);
#: if what remains fits in REQUEST_LIMIT, it is parsed for the record.
REQUEST_SCAN_LIMIT = 32 * 1024 * 1024
#: Metadata answers are parsed whole up to this size; past it only the tail
#: is searched for ``usage``.
METADATA_LIMIT = 1024 * 1024
#: How much of the tail of a large answer is kept to find ``usage`` in.
TAIL = 64 * 1024
#: How much of an undecodable body a record quotes.
EXCERPT = 1024
#: Reassembled text past this many characters per choice is cut off.
TEXT_LIMIT = 16 * 1024 * 1024
#: Strings in messages longer than this that are data URLs or base64 are
#: replaced by a placeholder (images, audio and files sent inline).
INLINE_MEDIA = 1024

_BASE64 = re.compile(r"[A-Za-z0-9+/=_-]+")
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
_STREAM = re.compile(rb'"stream"\s*:\s*true\b')


def exchange_kind(method: str, path: str) -> Optional[str]:
    """The record kind for a request, or None when it is not recorded.

    Only POSTs to the endpoints that create something are recorded; the
    path is matched at its end, so a base URL ending in ``/v1`` or an Azure
    deployment path works too.
    """
    if method != "POST":
        return None
    for pattern, kind in _KINDS:
        if pattern.search(path):
            return kind
    return None


def loads(text: "str | bytes") -> Any:
    """``json.loads`` that turns NaN and Infinity into strings (valid JSON out)."""
    return json.loads(text, parse_constant=str)


def excerpt(body: bytes) -> str:
    """The start of an undecodable body, as text, for a record."""
    text = body[:EXCERPT].decode("utf-8", "replace")
    return text + ("…" if len(body) > EXCERPT else "")


def strip_media(value: Any) -> Any:
    """``value`` with inline images, audio and files replaced by placeholders.

    A data URL or a long base64 string would swell the records with bytes
    nobody reads in a log; the placeholder says what was there and how big.
    """
    if isinstance(value, str):
        if len(value) > INLINE_MEDIA:
            if value.startswith("data:"):
                head = value[: min(value.find(","), 100)] if "," in value else value[:40]
                return f"{head},… ({len(value)} characters omitted)"
            if _BASE64.fullmatch(value):
                return f"… (base64, {len(value)} characters omitted)"
        return value
    if isinstance(value, list):
        return [strip_media(v) for v in value]
    if isinstance(value, dict):
        return {k: strip_media(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------- requests

_QUOTE_OR_ESCAPE = re.compile(rb'["\\]')
#: Bytes of a JSON string literal that rule out base64 (a backslash is let
#: through: some encoders write ``/`` as ``\/``).
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=_\-\\]")


class MediaCompactor:
    """Copies a JSON text piece by piece, leaving out inline media.

    A string literal longer than :data:`INLINE_MEDIA` bytes that is a data
    URL, or base64 only, is written as the placeholder :func:`strip_media`
    would give it; everything else is copied as it is.  So a chat request
    of tens of MiB that is mostly an inline image can be recorded from a
    copy of a few KiB, never holding the image.

    :param keep: the most bytes the copy may hold; past it, :meth:`feed`
        says False and :meth:`result` is None.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.out = bytearray()
        self.over = False
        self._in_string = False
        self._escape = False
        self._head = bytearray()  # a string's first bytes, until it is judged
        self._length = 0
        self._kind: Optional[str] = None  # None (undecided), "data", "base64", "text"
        self._base64 = True

    def feed(self, piece: bytes) -> bool:
        """The next piece of the text; False once the copy is too large."""
        i, n = 0, len(piece)
        while i < n and not self.over:
            if not self._in_string:
                j = piece.find(b'"', i)
                if j < 0:
                    self._emit(piece[i:])
                    break
                self._emit(piece[i:j + 1])
                i = j + 1
                self._open_string()
                continue
            if self._escape:
                self._content(piece[i:i + 1])
                self._escape = False
                i += 1
                continue
            match = _QUOTE_OR_ESCAPE.search(piece, i)
            end = match.start() if match is not None else n
            if end > i:
                self._content(piece[i:end])
            if match is None:
                break
            if piece[end:end + 1] == b"\\":
                self._content(b"\\")
                self._escape = True
            else:
                self._close_string()
            i = end + 1
        return not self.over

    def result(self) -> Optional[bytes]:
        """The copy, or None if it grew too large or the text ended inside
        a string."""
        if self.over or self._in_string:
            return None
        return bytes(self.out)

    def _emit(self, data: "bytes | bytearray") -> None:
        self.out += data
        if len(self.out) > self.keep:
            self.over = True

    def _open_string(self) -> None:
        self._in_string = True
        self._escape = False
        self._head = bytearray()
        self._length = 0
        self._kind = None
        self._base64 = True

    def _content(self, data: bytes) -> None:
        self._length += len(data)
        if self._kind == "text":
            self._emit(data)
            return
        if self._kind is not None:
            return  # media: counted, not kept
        self._head += data
        if self._base64 and _NOT_BASE64.search(data):
            self._base64 = False
        if self._length <= INLINE_MEDIA:
            return
        if self._head.startswith(b"data:"):
            self._kind = "data"
        elif self._base64:
            self._kind = "base64"
        else:
            self._kind = "text"
            self._emit(self._head)
        if self._kind != "text":
            self._head = self._head[:100]

    def _close_string(self) -> None:
        self._in_string = False
        if self._kind is None:
            self._emit(self._head)
        elif self._kind == "data":
            head = bytes(self._head)
            comma = head.find(b",")
            prefix = head[:comma] if 0 <= comma else head[:40]
            prefix = prefix.split(b"\\", 1)[0]  # never half an escape
            self._emit(prefix + f",… ({self._length} characters omitted)".encode())
        elif self._kind == "base64":
            self._emit(f"… (base64, {self._length} characters omitted)".encode())
        self._emit(b'"')
        self._head = bytearray()



def multipart_fields(body: bytes, wanted: Iterable[str]) -> dict[str, str]:
    """Small text fields of a ``multipart/form-data`` body, files skipped.

    The boundary is read from the body's first line, so no header is needed.
    """
    wanted = frozenset(wanted)
    first_end = body.find(b"\r\n")
    if not body.startswith(b"--") or first_end < 3 or first_end > 200:
        return {}
    delimiter = b"\r\n" + body[:first_end]
    fields: dict[str, str] = {}
    pos = first_end + 2
    while True:
        head_end = body.find(b"\r\n\r\n", pos, pos + 4096)
        if head_end < 0:
            break
        head = body[pos:head_end].decode("latin-1").lower()
        end = body.find(delimiter, head_end + 4)
        if end < 0:
            break
        name = re.search(r'\bname="([^"]*)"', head)
        if name and "filename=" not in head and name.group(1) in wanted:
            value = body[head_end + 4 : end]
            if len(value) <= 256:
                fields[name.group(1)] = value.decode("utf-8", "replace")
        pos = end + len(delimiter)
        if body[pos : pos + 2] != b"\r\n":
            break  # the closing delimiter ``--``
        pos += 2
    return fields


def multipart_fields_at_ends(head: bytes, tail: bytes, wanted: Iterable[str]) -> dict[str, str]:
    """Small text fields of a multipart body of which only the first and
    last bytes were read: fields before the file(s) and after them."""
    fields = multipart_fields(head, wanted)
    first_end = head.find(b"\r\n")
    if first_end < 3 or not tail:
        return fields
    delimiter = b"\r\n" + head[:first_end]
    start = tail.find(delimiter)
    if start >= 0:
        for name, value in multipart_fields(tail[start + 2:], wanted).items():
            fields.setdefault(name, value)
    return fields


def summarize_large_request(kind: str, head: bytes, tail: bytes, length: int) -> dict[str, Any]:
    """The record fields of a request body too large to read whole: the
    model and stream flag found in its first (or last) bytes, settings of
    a multipart upload, and for a conversation a note that its messages
    were not recorded."""
    out: dict[str, Any] = {"model": None, "stream": False, "params": {}}
    if head.startswith(b"--"):
        fields = multipart_fields_at_ends(head, tail, METADATA_FIELDS)
        out["model"] = fields.pop("model", None)
        out["stream"] = fields.get("stream", "").lower() == "true"
        out["params"] = fields
        return out
    model = _MODEL.search(head) or _MODEL.search(tail)
    out["model"] = model.group(1).decode("utf-8", "replace") if model else None
    out["stream"] = bool(_STREAM.search(head) or _STREAM.search(tail))
    if kind in CONVERSATION_KINDS:
        out["problems"] = [
            f"request body of {length} bytes too large to record (over {REQUEST_LIMIT})"
        ]
    return out


def summarize_request(
    kind: str, body: bytes, shared: Optional[SharedParse] = None
) -> dict[str, Any]:
    """The record fields taken from a request body.

    Conversation kinds keep ``messages`` (chat) or ``prompt`` (completion)
    and the other settings as ``params``; metadata kinds keep only the
    settings in :data:`METADATA_FIELDS` (and how many inputs an embeddings
    request had).  ``shared`` may hold the policies' parse of the body.
    """
    out: dict[str, Any] = {"model": None, "stream": False}
    if body.startswith(b"--"):
        fields = multipart_fields(body, METADATA_FIELDS)
        out["model"] = fields.pop("model", None)
        out["stream"] = fields.get("stream", "").lower() == "true"
        out["params"] = fields
        return out
    if kind not in CONVERSATION_KINDS and len(body) > METADATA_LIMIT:
        # A big embeddings input: not worth parsing for a few settings.
        model = _MODEL.search(body[:TAIL]) or _MODEL.search(body[-TAIL:])
        out["model"] = model.group(1).decode("utf-8", "replace") if model else None
        out["params"] = {}
        return out
    if len(body) > BODY_LIMIT:
        out["problems"] = [f"request body of {len(body)} bytes too large to record"]
        return out
    try:
        obj = shared.loads(body, str) if shared is not None else loads(body)
    except (ValueError, RecursionError):
        out["problems"] = ["request body is not JSON"]
        if kind in CONVERSATION_KINDS:
            out["request_excerpt"] = excerpt(body)
        return out
    if not isinstance(obj, dict):
        out["problems"] = ["request body is not a JSON object"]
        return out
    model = obj.get("model")
    out["model"] = model if isinstance(model, str) else None
    out["stream"] = obj.get("stream") is True
    if kind == "chat":
        out["messages"] = strip_media(obj.get("messages"))
    elif kind == "completion":
        out["prompt"] = obj.get("prompt")
    if kind in CONVERSATION_KINDS:
        out["params"] = strip_media(
            {k: v for k, v in obj.items() if k not in ("model", "messages", "prompt", "stream")}
        )
    else:
        out["params"] = {
            k: v
            for k, v in obj.items()
            if k in METADATA_FIELDS and k not in ("model", "stream")
            and (v is None or isinstance(v, (str, int, float, bool)))
        }
        if kind == "embeddings":
            items = obj.get("input")
            out["params"]["input_count"] = (
                len(items) if isinstance(items, list) and items and not isinstance(items[0], int)
                else 1
            )
    return out


# ---------------------------------------------------------------- answers


class _Choice:
    """One choice being reassembled from streamed deltas."""

    __slots__ = (
        "index", "role", "content", "reasoning", "refusal", "text", "transcript",
        "tool_calls", "tool_ids", "function_call", "finish_reason", "size", "cut",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.role: Optional[str] = None
        # Each made on its first piece: a streamed answer uses one or two
        # of them, and an open stream would hold the rest empty.
        self.content: Optional[list[str]] = None
        self.reasoning: Optional[list[str]] = None
        self.refusal: Optional[list[str]] = None
        self.text: Optional[list[str]] = None
        self.transcript: Optional[list[str]] = None
        self.tool_calls: Optional[dict[int, dict[str, Any]]] = None
        self.tool_ids: Optional[dict[str, int]] = None
        self.function_call: Optional[dict[str, Any]] = None
        self.finish_reason: Optional[str] = None
        self.size = 0
        self.cut = False

    def add_text(self, parts: list[str], piece: Any) -> None:
        if piece is None:
            return
        if not isinstance(piece, str):
            piece = json.dumps(piece, ensure_ascii=False)
        if self.size + len(piece) > TEXT_LIMIT:
            self.cut = True
            return
        self.size += len(piece)
        parts.append(piece)

    def add_part(self, field: str, piece: Any) -> None:
        """Add ``piece`` to the text parts named ``field`` (made on the
        first piece)."""
        if piece is None:
            return
        parts = getattr(self, field)
        if parts is None:
            parts = []
            setattr(self, field, parts)
        self.add_text(parts, piece)

    def add_delta(self, delta: dict[str, Any]) -> None:
        role = delta.get("role")
        if isinstance(role, str) and role:
            self.role = role
        self.add_part("content", delta.get("content"))
        self.add_part("reasoning", delta.get("reasoning_content"))
        self.add_part("refusal", delta.get("refusal"))
        audio = delta.get("audio")
        if isinstance(audio, dict):
            self.add_part("transcript", audio.get("transcript"))
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                if isinstance(call, dict):
                    self._add_tool_call(call)
        function_call = delta.get("function_call")
        if isinstance(function_call, dict):
            if self.function_call is None:
                self.function_call = {"name": ""}
            _merge_call_fields(self, self.function_call, function_call)

    def _add_tool_call(self, call: dict[str, Any]) -> None:
        if self.tool_calls is None or self.tool_ids is None:
            self.tool_calls, self.tool_ids = {}, {}
        index = call.get("index")
        call_id = call.get("id")
        if not isinstance(index, int):
            # No index (some servers): a new id is a new call, else the last.
            if isinstance(call_id, str) and call_id and call_id not in self.tool_ids:
                index = len(self.tool_calls)
            elif isinstance(call_id, str) and call_id in self.tool_ids:
                index = self.tool_ids[call_id]
            else:
                index = max(self.tool_calls, default=0)
        slot = self.tool_calls.get(index)
        if slot is None:
            slot = self.tool_calls[index] = {"id": None, "type": None, "fields": {}}
        if isinstance(call_id, str) and call_id:
            slot["id"] = call_id
            self.tool_ids[call_id] = index
        kind = call.get("type")
        if isinstance(kind, str) and kind:
            slot["type"] = kind
        for key, value in call.items():
            if isinstance(value, dict) and key not in ("index",):
                fields = slot["fields"].setdefault(key, {"name": ""})
                _merge_call_fields(self, fields, value)

    def result(self, conversation_kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if conversation_kind == "completion":
            out["text"] = "".join(self.text or ())
        else:
            out["role"] = self.role or "assistant"
            out["content"] = "".join(self.content) if self.content else None
            if self.reasoning:
                out["reasoning_content"] = "".join(self.reasoning)
            if self.refusal:
                out["refusal"] = "".join(self.refusal)
            if self.transcript:
                out["audio_transcript"] = "".join(self.transcript)
            if self.tool_calls:
                out["tool_calls"] = [
                    _tool_call_result(self.tool_calls[i]) for i in sorted(self.tool_calls)
                ]
            if self.function_call is not None:
                out["function_call"] = _fields_result(self.function_call, arguments=True)
        out["finish_reason"] = self.finish_reason
        if self.cut:
            out["truncated"] = True
        return out


def _merge_call_fields(choice: _Choice, into: dict[str, Any], piece: dict[str, Any]) -> None:
    """Merge one streamed piece of a function (or custom tool) call."""
    for key, value in piece.items():
        if not isinstance(value, str):
            continue
        if key == "name":
            name = into["name"]
            if not name or value.startswith(name):
                into["name"] = value
            elif value != name:
                into["name"] = name + value
        else:
            parts = into.setdefault(key, [])
            if isinstance(parts, list):
                choice.add_text(parts, value)


def _fields_result(fields: dict[str, Any], arguments: bool = False) -> dict[str, Any]:
    out = {k: ("".join(v) if isinstance(v, list) else v) for k, v in fields.items()}
    if arguments:
        out.setdefault("arguments", "")
    return out


def _tool_call_result(slot: dict[str, Any]) -> dict[str, Any]:
    kind = slot["type"] or ("function" if "function" in slot["fields"] or not slot["fields"] else None)
    out: dict[str, Any] = {"id": slot["id"], "type": kind}
    for key, fields in slot["fields"].items():
        out[key] = _fields_result(fields, arguments=key == "function")
    return out


class ChoiceAssembler:
    """Folds chat or completion chunk objects (streamed or whole) into choices.

    Choices are kept apart by their ``index`` (n > 1); a first delta without
    a role is fine (the role defaults to ``assistant``).
    """

    __slots__ = ("kind", "choices", "usage", "response_id", "response_model", "error",)

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.choices: dict[int, _Choice] = {}
        self.usage: Any = None
        self.response_id: Optional[str] = None
        self.response_model: Optional[str] = None
        self.error: Any = None

    def add(self, obj: dict[str, Any]) -> None:
        """One chunk object of a stream, or a whole answer object."""
        if self.response_id is None and isinstance(obj.get("id"), str):
            self.response_id = obj["id"]
        if self.response_model is None and isinstance(obj.get("model"), str):
            self.response_model = obj["model"]
        if obj.get("usage") is not None:
            self.usage = obj["usage"]
        if obj.get("error") is not None:
            self.error = obj["error"]
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            index = choice.get("index")
            if not isinstance(index, int):
                index = position
            slot = self.choices.get(index)
            if slot is None:
                slot = self.choices[index] = _Choice(index)
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice.get("message")
            if isinstance(delta, dict):
                slot.add_delta(delta)
            if "text" in choice:
                slot.add_part("text", choice["text"])
            reason = choice.get("finish_reason")
            if reason is not None:
                slot.finish_reason = reason

    def result(self) -> list[dict[str, Any]]:
        """The reassembled choices, by index."""
        return [self.choices[i].result(self.kind) for i in sorted(self.choices)]


class _Tail:
    """Keeps a body whole up to a limit, then its head and tail only."""

    __slots__ = ("limit", "parts", "size", "overflowed", "tail",)

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.overflowed = False
        self.tail = b""

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if not self.overflowed:
            if self.size <= self.limit:
                self.parts.append(data)
                return
            self.overflowed = True
            whole = b"".join(self.parts)
            self.parts = [whole[:EXCERPT]]
            self.tail = whole[-TAIL:]
        self.tail = (self.tail + data)[-TAIL:]

    def whole(self) -> Optional[bytes]:
        return None if self.overflowed else b"".join(self.parts)

    def head(self) -> bytes:
        return b"".join(self.parts)[:EXCERPT]


def usage_in_tail(tail: bytes) -> Any:
    """The last ``"usage": {...}`` object in the tail of a large JSON body."""
    text = tail.decode("utf-8", "replace")
    decoder = json.JSONDecoder(parse_constant=str)
    for match in reversed(list(re.finditer(r'"usage"\s*:\s*', text))):
        try:
            value, _ = decoder.raw_decode(text, match.end())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _media_type(headers: Headers) -> str:
    value = (headers.getRawHeaders(b"content-type") or [b""])[0]
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


class AnswerReader:
    """Follows one answer's body as it is relayed and says what it held.

    :meth:`head` takes the status and headers, :meth:`feed` each chunk (the
    relayed bytes, still compressed if they were), :meth:`result` gives the
    answer's record fields.  It never raises: a body it cannot make sense
    of is recorded as such (``problems`` and an ``excerpt``).
    """

    __slots__ = (
        "kind", "conversation", "status", "size", "problems", "format", "content_type",
        "_inflate", "_encoding", "_sink", "_sse", "_body", "_sniffed", "_assembler",
        "_bad_events", "_bad_excerpt", "_usage", "_shared",
    )

    def __init__(self, kind: str, shared: Optional[SharedParse] = None) -> None:
        self.kind = kind
        #: The policies' parse of a JSON answer, if they made one.
        self._shared = shared
        self.conversation = kind in CONVERSATION_KINDS
        self.status: Optional[int] = None
        self.size = 0
        self.problems: list[str] = []
        self.format = "empty"
        self.content_type = ""
        self._inflate: Optional[Inflater] = None
        self._encoding = b""
        self._sink: Optional[Callable[[bytes], None]] = self._sniff
        self._sse: Optional[SSEDecoder] = None
        self._body: Optional[_Tail] = None
        self._sniffed = b""
        self._assembler = ChoiceAssembler(kind)
        self._bad_events = 0
        self._bad_excerpt: Optional[str] = None
        self._usage: Any = None

    def head(self, status: int, headers: Headers) -> None:
        """The answer's status line and headers (as relayed)."""
        self.status = status
        self.content_type = _media_type(headers)
        encoding = (headers.getRawHeaders(b"content-encoding") or [b""])[-1].strip().lower()
        self._encoding = encoding
        if encoding in INFLATABLE:
            self._inflate = Inflater(encoding, BODY_LIMIT)
        elif encoding and encoding != b"identity":
            self.format = "encoded"
            self.problems.append(
                f"answer encoded as {encoding.decode('latin-1')}: not decoded"
            )
            self._sink = None
            return
        ctype = self.content_type
        if ctype == "text/event-stream":
            self._start_sse()
        elif ctype == "application/json" or ctype.endswith("+json"):
            self._start_json()
        elif ctype.startswith(("audio/", "image/", "video/")) or ctype == "application/octet-stream":
            self.format = "binary"
            self._sink = None
        else:
            self._sink = self._sniff  # no or vague content type: look at the bytes

    def _start_sse(self) -> None:
        self.format = "sse"
        self._sse = SSEDecoder()
        self._sink = self._feed_sse

    def _start_json(self) -> None:
        self.format = "json"
        limit = BODY_LIMIT if self.conversation or (self.status or 0) >= 400 else METADATA_LIMIT
        self._body = _Tail(limit)
        self._sink = self._body.add

    def feed(self, chunk: bytes) -> None:
        """One relayed body chunk."""
        self.size += len(chunk)
        if self._sink is None or not chunk:
            return
        if self._inflate is not None:
            chunk = self._decompress(chunk)
            if not chunk or self._sink is None:
                return
        self._sink(chunk)

    def _decompress(self, chunk: bytes) -> bytes:
        assert self._inflate is not None
        try:
            out = self._inflate.feed(chunk)
        except zlib.error:
            self.problems.append(
                f"answer is not valid {self._encoding.decode('latin-1')} data"
            )
            self._sink = None
            return b""
        if self._inflate.overflowed:
            self.problems.append("decompressed answer too large to record")
            self._sink = None
        return out

    def _sniff(self, chunk: bytes) -> None:
        """No telling content type: decide from the first non-blank bytes."""
        self._sniffed += chunk
        start = self._sniffed.lstrip()
        if not start and len(self._sniffed) < 4096:
            return
        held, self._sniffed = self._sniffed, b""
        if start[:1] in (b"{", b"["):
            self._start_json()
        elif start.startswith((b"data:", b":", b"event:", b"id:", b"retry:")):
            self._start_sse()
        else:
            self.format = "other"
            self._body = _Tail(EXCERPT)
            self._sink = self._body.add
        sink = self._sink
        if sink is not None:  # set by every branch above
            sink(held)

    def _feed_sse(self, chunk: bytes) -> None:
        assert self._sse is not None
        for event in self._sse.feed(chunk):
            self._event(event.data)

    def _event(self, data: str) -> None:
        if not self.conversation and '"usage"' not in data and '"error"' not in data:
            return  # metadata kinds only look for usage; no need to parse
        try:
            obj = loads(data)
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            self._bad_events += 1
            if self._bad_excerpt is None:
                self._bad_excerpt = excerpt(data.encode("utf-8"))
            return
        if self.conversation:
            self._assembler.add(obj)
        else:
            usage = obj.get("usage")
            if usage is None and isinstance(obj.get("response"), dict):
                usage = obj["response"].get("usage")
            if usage is not None:
                self._usage = usage
            if obj.get("error") is not None:
                self._assembler.error = obj["error"]

    def result(self) -> dict[str, Any]:
        """The answer's record fields; call once, at the end."""
        out: dict[str, Any] = {"format": self.format, "content_type": self.content_type or None}
        problems = self.problems
        excerpt_text: Optional[str] = None
        if self._sniffed:  # the body ended before the sniffer decided
            self._sink, held, self._sniffed = None, self._sniffed, b""
            if held.strip():
                self.format = out["format"] = "other"
                excerpt_text = excerpt(held)
        if self._sse is not None:
            out["done"] = self._sse.done
            if self._sse.close():
                problems.append("stream ended in the middle of an event")
            if self._sse.overflow:
                problems.append("an event was too large to decode")
            if not self._sse.done and self.conversation and (self.status or 0) < 400:
                problems.append("stream ended without [DONE]")
            if self._bad_events:
                problems.append(f"{self._bad_events} event(s) not a JSON object")
                excerpt_text = self._bad_excerpt
        elif self._body is not None:
            excerpt_text = self._read_body(out, problems)
        assembler = self._assembler
        if self.conversation:
            out["response_id"] = assembler.response_id
            out["response_model"] = assembler.response_model
            out["choices"] = assembler.result()
            out["usage"] = assembler.usage
        else:
            out["usage"] = self._usage
        error = assembler.error
        out["error"] = _scrub_value(error) if error is not None else None
        out["problems"] = problems
        if excerpt_text is not None:
            out["excerpt"] = _scrub_value(excerpt_text)
        return out

    def _read_body(self, out: dict[str, Any], problems: list[str]) -> Optional[str]:
        body = self._body
        assert body is not None
        if self.format == "other":
            if (self.status or 0) >= 400 or self.conversation:
                return excerpt(body.head()) if body.size else None
            return None
        whole = body.whole()
        if whole is None:
            if self.conversation or (self.status or 0) >= 400:
                problems.append(f"answer of {body.size} bytes too large to record")
            if not self.conversation:
                self._usage = usage_in_tail(body.tail)
            else:
                self._assembler.usage = usage_in_tail(body.tail)
            return None
        if not whole.strip():
            return None
        try:
            obj = self._shared.loads(whole, str) if self._shared is not None else loads(whole)
        except (ValueError, RecursionError):
            problems.append("answer is not valid JSON")
            return excerpt(whole)
        if not isinstance(obj, dict):
            problems.append("answer is not a JSON object")
            return excerpt(whole)
        if self.conversation:
            self._assembler.add(obj)
        else:
            self._usage = obj.get("usage")
            if isinstance(obj.get("data"), list):
                out["data_count"] = len(obj["data"])
            if obj.get("error") is not None:
                self._assembler.error = obj["error"]
        return None


def _scrub_value(value: Any) -> Any:
    """Mask key-like strings in what the upstream said (error messages can
    echo part of a client's key)."""
    if isinstance(value, str):
        if "k-" not in value and "K-" not in value:
            return value  # nothing key-shaped (see keys.scrub): no encoding round trip
        return scrub(value.encode("utf-8", "surrogatepass")).decode("utf-8", "surrogatepass")
    if isinstance(value, list):
        return [_scrub_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _scrub_value(v) for k, v in value.items()}
    return value
