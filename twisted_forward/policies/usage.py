"""
Token usage from upstream answers, and the stream filter that hides the
usage the proxy asked for on the client's behalf.

A streamed chat carries ``usage`` only when asked
(``stream_options.include_usage``).  When a key's tokens are counted and
its client did not ask, the proxy asks, and :class:`UsageStripper` gives
the client exactly the stream it would have had: the extra last chunk
(``"choices":[]`` with the usage) is dropped and the ``"usage":null`` member
every other chunk then carries is cut out, byte for byte.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from ..sharedjson import SharedParse, parse

#: An SSE event ends with a blank line.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,')
#: The most a partial SSE event or line is held before it is passed on as is.
_HOLD_LIMIT = 1 << 20
_JSON_LIMIT = 2 << 20
_TAIL = 64 * 1024


@dataclass(frozen=True)
class Usage:
    """Tokens an answer spent.

    :ivar prompt: input tokens; ``cached`` of them from the prompt cache.
    :ivar completion: output tokens (reasoning tokens included).
    """

    prompt: int
    completion: int
    cached: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_of(obj: Any) -> Optional[Usage]:
    """The usage in an OpenAI ``usage`` object (chat, completions,
    embeddings or the Responses API), or None."""
    if not isinstance(obj, dict):
        return None
    if "input_tokens" in obj or "output_tokens" in obj:
        details = obj.get("input_tokens_details") or {}
        prompt, completion = _int(obj.get("input_tokens")), _int(obj.get("output_tokens"))
    elif "prompt_tokens" in obj or "total_tokens" in obj:
        details = obj.get("prompt_tokens_details") or {}
        prompt = _int(obj.get("prompt_tokens"))
        completion = _int(obj.get("completion_tokens"))
        if not completion and _int(obj.get("total_tokens")) > prompt:
            completion = _int(obj.get("total_tokens")) - prompt
    else:
        return None
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return Usage(prompt, completion, cached)


def _usage_in_event(payload: bytes) -> Optional[Usage]:
    if b'"usage"' not in payload:
        return None
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    found = usage_of(obj.get("usage"))
    if found is None and isinstance(obj.get("response"), dict):  # Responses API events
        found = usage_of(obj["response"].get("usage"))
    return found


class UsageTap:
    """Reads the usage out of an answer body fed to it chunk by chunk.

    :param streamed: the answer is an SSE stream (else one JSON document).
    :param shared: where the parse of a JSON answer is handed on to its
        other reader (the chat record), if anywhere.
    """

    def __init__(self, streamed: bool, shared: Optional[SharedParse] = None) -> None:
        self.streamed = streamed
        self._shared = shared
        self.usage: Optional[Usage] = None
        self._held = b""
        self._body: list[bytes] = []
        self._size = 0
        self._tail = b""

    def feed(self, data: bytes) -> None:
        """Another piece of the body, as the upstream sent it."""
        if self.streamed:
            buf = self._held + data
            lines = buf.split(b"\n")
            self._held = lines.pop()
            if len(self._held) > _HOLD_LIMIT:
                self._held = b""
            for line in lines:
                if line.startswith(b"data:"):
                    found = _usage_in_event(line[5:].strip())
                    if found is not None:
                        self.usage = found
            return
        self._size += len(data)
        if self._size <= _JSON_LIMIT:
            self._body.append(data)
        else:
            self._body = []
            self._tail = (self._tail + data)[-_TAIL:]

    def end(self) -> Optional[Usage]:
        """The body is over: the usage found, or None."""
        if self.streamed:
            if self._held.startswith(b"data:"):
                found = _usage_in_event(self._held[5:].strip())
                if found is not None:
                    self.usage = found
            return self.usage
        if self._body:
            body = b"".join(self._body)
            self._body = []
            try:
                obj = parse(body)
            except (ValueError, RecursionError):
                return None
            if self._shared is not None:
                self._shared.keep(body, obj)
            self.usage = usage_of(obj.get("usage")) if isinstance(obj, dict) else None
            if self.usage is None and isinstance(obj, dict) and isinstance(obj.get("response"), dict):
                self.usage = usage_of(obj["response"].get("usage"))
            return self.usage
        # Too large to parse whole (embeddings of many inputs): the usage
        # member comes last, in the tail.
        at = self._tail.rfind(b'"usage"')
        if at >= 0:
            colon = self._tail.find(b":", at)
            try:
                obj, _ = json.JSONDecoder().raw_decode(self._tail[colon + 1:].decode().lstrip())
            except (ValueError, UnicodeDecodeError):
                return None
            self.usage = usage_of(obj)
        return self.usage


class UsageStripper:
    """Turns a chat stream with usage asked for into the one without.

    Events pass on as soon as they are whole; a partial event is held until
    its end arrives (SSE events are small; one beyond 1 MiB passes as is).
    """

    def __init__(self) -> None:
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        """Filter the next piece of the stream; returns what may be sent."""
        buf = self._held + data
        out = []
        pos = 0
        for m in _EVENT_END.finditer(buf):
            out.append(self._event(buf[pos:m.end()], m.end() - m.start()))
            pos = m.end()
        self._held = buf[pos:]
        if len(self._held) > _HOLD_LIMIT:
            out.append(self._held)
            self._held = b""
        return b"".join(out)

    def flush(self) -> bytes:
        """The end of the stream: whatever was held."""
        held, self._held = self._held, b""
        return self._event(held, 0) if held else b""

    @staticmethod
    def _event(event: bytes, _end: int) -> bytes:
        if b'"usage"' not in event:
            return event
        payload = b"".join(
            line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")
        )
        if b'"choices"' in payload:
            try:
                obj = json.loads(payload)
            except ValueError:
                obj = None
            if (
                isinstance(obj, dict)
                and obj.get("choices") == []
                and isinstance(obj.get("usage"), dict)
            ):
                return b""  # the chunk the proxy asked for
        return _NULL_USAGE.sub(b"", event, count=1)
