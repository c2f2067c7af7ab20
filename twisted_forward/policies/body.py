"""
What a policy needs from a request body, read without loading it whole.

A JSON body is scanned for its top-level members with regular expressions
(C speed), over a memory map when Twisted spooled the body to a file: a
20 MB chat with images costs a scan, not a copy, and the members may come
in any order (the openai SDK sends ``messages`` before ``model``).  Only
small members are decoded: ``model``, ``stream``, ``stream_options``,
``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``, ``n``.

A multipart body (audio transcriptions) gives its ``model`` form field; an
Azure-style path (``/openai/deployments/<name>/…``) gives the deployment
name as the model.
"""

from __future__ import annotations

import json
import mmap
import re
from typing import IO, Any, NamedTuple, Optional, Union

from ..sharedjson import SharedParse, parse

Buffer = Union[bytes, mmap.mmap]

#: Members worth decoding; larger values are skipped.
_WANTED = frozenset(
    {b"model", b"stream", b"stream_options", b"max_tokens", b"max_completion_tokens",
     b"max_output_tokens", b"n"}
)
#: Each wanted member's name, and its name as it is spelled plainly in a body.
_QUOTED = tuple((k.decode(), b'"%s"' % k) for k in sorted(_WANTED))
_SMALL = 4096
_STRUCT = re.compile(rb'["{}\[\],:]')
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_SPACE = re.compile(rb"\s*")
_MULTIPART_MODEL = re.compile(
    rb'content-disposition:\s*form-data;\s*name="model"[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]{1,200})\r\n',
    re.IGNORECASE,
)
_DEPLOYMENT = re.compile(r"/deployments/([^/]+)/")

#: The largest body scanned for its model (the scan runs on the reactor
#: thread, at memory speed); a larger JSON body is "unreadable".
SCAN_LIMIT = 128 * 1024 * 1024
#: Tokens reserved for the answer when the request sets no maximum.
DEFAULT_OUTPUT_RESERVE = 1024
#: Bytes of request JSON per prompt token, for the estimate before usage
#: is known (about 4 characters a token in English text).
BYTES_PER_TOKEN = 4


# A named tuple (immutable, made in a third of a frozen dataclass's time):
# one is made for every request the policies read.
class BodyFacts(NamedTuple):
    """What the policies read from one request.

    :ivar model: the model asked for, or None.
    :ivar size: the body's length in bytes.
    :ivar json: the body is a JSON object (so :attr:`members` are known).
    :ivar stream: ``"stream": true``.
    :ivar include_usage: the client asked for ``stream_options.include_usage``.
    :ivar max_output: the request's cap on output tokens, if any.
    :ivar choices: ``n``, the number of answers asked for.
    :ivar stream_options_span: where the ``stream_options`` value is in the
        body, for rewriting it; None when absent.
    :ivar unreadable: the body looks like JSON but could not be scanned
        (broken, or a member that matters given twice): a policy that must
        know the model refuses it.
    """

    model: Optional[str] = None
    size: int = 0
    json: bool = False
    stream: bool = False
    include_usage: bool = False
    max_output: Optional[int] = None
    choices: int = 1
    stream_options_span: Optional[tuple[int, int]] = None
    stream_options: Any = None
    unreadable: bool = False

    def estimate(self) -> tuple[int, int]:
        """``(prompt, output)`` tokens to reserve before the answer."""
        prompt = -(-self.size // BYTES_PER_TOKEN)
        output = self.max_output if self.max_output is not None else DEFAULT_OUTPUT_RESERVE
        return prompt, output * max(1, self.choices) if self.json else 0


def top_level(buf: Buffer) -> Optional[dict[bytes, tuple[int, int]]]:
    """Spans ``(start, end)`` of the values of a JSON object's top-level
    members, or None when ``buf`` is not (well-formed enough to be) one."""
    m = _SPACE.match(buf, 0)
    pos = m.end() if m else 0
    if pos >= len(buf) or buf[pos:pos + 1] != b"{":
        return None
    depth = 0
    key: Optional[bytes] = None
    start = -1
    spans: dict[bytes, tuple[int, int]] = {}
    search, string = _STRUCT.search, _STRING.match
    while True:
        m = search(buf, pos)
        if m is None:
            return None
        c = m.group()
        p = m.start()
        if c == b'"':
            s = string(buf, p)
            if s is None:
                return None
            if depth == 1 and start < 0:
                key = bytes(buf[p + 1:s.end() - 1])
            pos = s.end()
            continue
        if c == b"{" or c == b"[":
            depth += 1
        elif c == b"}" or c == b"]":
            if depth == 1 and key is not None and start >= 0:
                if key in spans and key in _WANTED:
                    return None  # parsers disagree on which one counts
                spans[key] = (start, p)
            depth -= 1
            if depth == 0:
                return spans
        elif depth == 1:
            if c == b":":
                start = p + 1
            elif c == b",":
                if key is not None and start >= 0:
                    if key in spans and key in _WANTED:
                        return None
                    spans[key] = (start, p)
                key, start = None, -1
        pos = p + 1


def _value(buf: Buffer, span: tuple[int, int]) -> Any:
    start, end = span
    if end - start > _SMALL:
        return None
    try:
        return json.loads(bytes(buf[start:end]))
    except ValueError:
        return None


#: Bodies up to this size try :func:`_facts_fast` first.
_FAST_LIMIT = 256 * 1024
#: The parse of a request body up to this size is handed on to the chat
#: record (:class:`~twisted_forward.sharedjson.SharedParse`) when the
#: request is not a stream: it is then held until the answer ends, so only
#: for a small body and a short exchange.
SHARE_LIMIT = 16 * 1024


def _facts_fast(
    buf: bytes, size: int, model: Optional[str], shared: Optional[SharedParse] = None
) -> Optional[BodyFacts]:
    """:func:`facts_of` through the C JSON parser, for the common body; None
    when the body needs the scanner's care (then :func:`top_level` decides).

    The scanner's answer is kept wherever they could differ: a member that
    matters must be spelled plainly exactly once in the whole body (so no
    duplicate, and no escaped spelling of its name), there is no ``\\u``
    escape at all, ``stream_options`` (whose span a rewrite needs) is absent,
    and a model name is no longer than the scanner reads.
    """
    if b"\\u" in buf:
        return None
    try:
        values = parse(buf)
    except (ValueError, RecursionError):
        return None
    if (
        shared is not None
        and size <= SHARE_LIMIT
        and not (isinstance(values, dict) and values.get("stream") is True)
    ):
        shared.keep(buf, values)
    if not isinstance(values, dict) or "stream_options" in values:
        return None
    for key, quoted in _QUOTED:
        if key in values and buf.count(quoted) != 1:
            return None
    found = values.get("model")
    if isinstance(found, str):
        if len(found) > _SMALL - 2:
            return None
        model = found
    max_output = None
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        v = values.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            max_output = v
            break
    n = values.get("n")
    return BodyFacts(
        model=model,
        size=size,
        json=True,
        stream=values.get("stream") is True,
        max_output=max_output,
        choices=n if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 128 else 1,
    )


def facts_of(
    buf: Buffer, content_type: bytes = b"", path: str = "", shared: Optional[SharedParse] = None
) -> BodyFacts:
    """Read :class:`BodyFacts` from a whole body.

    :param shared: where the body's parse is handed on to its other
        readers (the chat record), if anywhere.
    """
    size = len(buf)
    deployment = _DEPLOYMENT.search(path) if "/deployments/" in path else None
    model = deployment.group(1) if deployment else None
    if content_type[:19].lower() == b"multipart/form-data":
        m = _MULTIPART_MODEL.search(buf)
        if m:
            model = bytes(m.group(1)).decode("utf-8", "replace").strip()
        return BodyFacts(model=model, size=size)
    if isinstance(buf, bytes) and size <= _FAST_LIMIT:
        fast = _facts_fast(buf, size, model, shared)
        if fast is not None:
            return fast
    spans = top_level(buf) if size else None
    if spans is None:
        m = _SPACE.match(buf, 0)
        first = m.end() if m else 0
        return BodyFacts(model=model, size=size, unreadable=buf[first:first + 1] == b"{")
    values = {k: _value(buf, spans[k]) for k in _WANTED if k in spans}
    if isinstance(values.get(b"model"), str):
        model = values[b"model"]
    options = values.get(b"stream_options")
    max_output = None
    for name in (b"max_completion_tokens", b"max_tokens", b"max_output_tokens"):
        v = values.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            max_output = v
            break
    n = values.get(b"n")
    return BodyFacts(
        model=model,
        size=size,
        json=True,
        stream=values.get(b"stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        max_output=max_output,
        choices=n if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 128 else 1,
        stream_options_span=spans.get(b"stream_options"),
        stream_options=options,
    )


def read_facts(
    content: Optional[IO[bytes]], content_type: bytes = b"", path: str = "",
    shared: Optional[SharedParse] = None,
) -> BodyFacts:
    """:func:`facts_of` a request's ``content``: in memory as it is, a
    spooled file through a read-only memory map."""
    if content is None:
        return facts_of(b"", content_type, path)
    getvalue = getattr(content, "getvalue", None)
    if getvalue is not None:
        return facts_of(getvalue(), content_type, path, shared)
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    if not size:
        return facts_of(b"", content_type, path)
    if size > SCAN_LIMIT:
        first = content.read(1)
        content.seek(0)
        deployment = _DEPLOYMENT.search(path)
        return BodyFacts(
            model=deployment.group(1) if deployment else None, size=size, unreadable=first == b"{"
        )
    with mmap.mmap(content.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return facts_of(buf, content_type, path)


#: The largest body rewritten to ask for usage (it is then held in memory).
REWRITE_LIMIT = 16 * 1024 * 1024


def with_usage_requested(body: bytes, facts: BodyFacts) -> Optional[bytes]:
    """``body`` asking for ``stream_options.include_usage``, or None when it
    cannot be rewritten.  Only the one member changes; every other byte is
    sent as the client wrote it."""
    span = facts.stream_options_span
    if span is None:
        m = _SPACE.match(body, 0)
        brace = m.end() if m else 0
        rest = _SPACE.match(body, brace + 1)
        empty = rest is not None and body[rest.end():rest.end() + 1] == b"}"
        member = b'"stream_options":{"include_usage":true}' + (b"" if empty else b",")
        return body[:brace + 1] + member + body[brace + 1:]
    options = facts.stream_options
    if options is None:
        options = {}
    if not isinstance(options, dict):
        return None
    options = dict(options, include_usage=True)
    value = json.dumps(options, separators=(",", ":")).encode()
    start, end = span
    old = body[start:end]
    start += len(old) - len(old.lstrip())  # keep the spaces around the value
    end -= len(old) - len(old.rstrip())
    return body[:start] + value + body[end:]
