"""
The stored form of an answer, and the tap that collects one as it is relayed.

An entry is a small binary record::

    b"TFE1" | stored_at (float64) | expires_at (float64) | flags (uint8)
    | content-type length (uint16) | content type | crc32 of body (uint32) | body

Every backend stores these bytes as they are; the expiry inside lets a
backend without its own expiry (LMDB) check it on read, and the checksum
turns a damaged entry into a miss instead of a wrong answer.  Bodies are
stored decoded (no content coding): any client can take them.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Optional

from twisted.web.http_headers import Headers

from ..chat.sse import SSEDecoder
from ..decoding import INFLATABLE, Inflater, content_codings

MAGIC = b"TFE1"
_HEAD = struct.Struct(">4sddBH")
_CRC = struct.Struct(">I")
#: Flag: the body is an event stream.
STREAM = 1


class CorruptEntry(ValueError):
    """Stored bytes that are not an entry (damaged, or from something else)."""


@dataclass(frozen=True)
class Entry:
    """One cached answer (always a 200).

    :ivar stored_at: when it was stored (seconds since the epoch).
    :ivar expires_at: when it stops being served.
    :ivar content_type: the answer's content type.
    :ivar stream: the body is an SSE stream.
    :ivar body: the answer body, without content coding.
    """

    stored_at: float
    expires_at: float
    content_type: bytes
    stream: bool
    body: bytes

    def encode(self) -> bytes:
        """The bytes a store keeps."""
        ctype = self.content_type[:1024]
        return b"".join((
            _HEAD.pack(MAGIC, self.stored_at, self.expires_at,
                       STREAM if self.stream else 0, len(ctype)),
            ctype,
            _CRC.pack(zlib.crc32(self.body)),
            self.body,
        ))

    @classmethod
    def decode(cls, data: bytes) -> "Entry":
        """Read stored bytes back.

        :raises CorruptEntry: when they are not an intact entry.
        """
        try:
            magic, stored, expires, flags, clen = _HEAD.unpack_from(data)
            if magic != MAGIC:
                raise CorruptEntry("not a cache entry")
            start = _HEAD.size + clen
            ctype = data[_HEAD.size:start]
            (crc,) = _CRC.unpack_from(data, start)
        except struct.error:
            raise CorruptEntry("truncated cache entry") from None
        body = data[start + _CRC.size:]
        if len(ctype) != clen or zlib.crc32(body) != crc:
            raise CorruptEntry("damaged cache entry")
        return cls(stored, expires, ctype, bool(flags & STREAM), bytes(body))

    def fresh(self, now: float) -> bool:
        """Whether the entry may still be served at ``now``."""
        return self.stored_at <= now + 60 and now < self.expires_at


def expires_at(data: bytes) -> float:
    """The expiry time in stored bytes, without checking the rest.

    :raises CorruptEntry: when the head is not an entry's.
    """
    try:
        magic, _stored, expires, _flags, _clen = _HEAD.unpack_from(data)
    except struct.error:
        raise CorruptEntry("truncated cache entry") from None
    if magic != MAGIC:
        raise CorruptEntry("not a cache entry")
    return expires


def stored_at(data: bytes) -> float:
    """The storing time in stored bytes (for oldest-first eviction)."""
    try:
        magic, stored, _expires, _flags, _clen = _HEAD.unpack_from(data)
    except struct.error:
        raise CorruptEntry("truncated cache entry") from None
    if magic != MAGIC:
        raise CorruptEntry("not a cache entry")
    return stored


class AnswerCollector:
    """Collects a relayed answer; :meth:`entry` says whether it can be stored.

    It sees the answer as the client gets it (content coding included) and
    keeps the decoded bytes, up to ``limit``.  Storable: status 200, an
    ``identity``, ``gzip`` or ``deflate`` coding that decodes cleanly, the
    exchange ended ``complete`` and, for an event stream, ``data: [DONE]``
    arrived (a stream cut short is not stored).

    :ivar refused: why the answer cannot be stored (``""`` while it can).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.status = 0
        self.content_type = b""
        self.stream = False
        self.chunks: list[bytes] = []
        self.size = 0
        self.refused = ""
        self._inflater: Optional[Inflater] = None
        self._sse: Optional[SSEDecoder] = None

    def response(self, status: int, headers: Headers) -> None:
        """The answer's head."""
        self.chunks, self.size = [], 0
        self.status = status
        if status != 200:
            self.refused = "status"
            return
        self.refused = ""
        self.content_type = (headers.getRawHeaders(b"content-type") or [b""])[-1]
        self.stream = self.content_type.split(b";")[0].strip().lower() == b"text/event-stream"
        self._sse = SSEDecoder() if self.stream else None
        codings = content_codings(headers)
        self._inflater = None
        if len(codings) > 1 or (codings and codings[0] not in INFLATABLE):
            self.refused = "encoding"
        elif codings:
            self._inflater = Inflater(codings[0], self.limit)

    def data(self, chunk: bytes) -> None:
        """A body chunk, as relayed."""
        if self.refused:
            return
        if self._inflater is not None:
            try:
                chunk = self._inflater.feed(chunk)
            except zlib.error:
                self._refuse("encoding")
                return
        self.size += len(chunk)
        if self.size > self.limit:
            self._refuse("too_large")
            return
        self.chunks.append(chunk)
        if self._sse is not None:
            self._sse.feed(chunk)

    def _refuse(self, why: str) -> None:
        self.refused = why
        self.chunks = []

    def entry(self, outcome: str, now: float, ttl: float) -> Optional[Entry]:
        """The entry to store, or None (and :attr:`refused` says why)."""
        if self.refused:
            return None
        if outcome != "complete" or self.status != 200:
            self.refused = "incomplete"
            return None
        if self._inflater is not None and not self._inflater.eof:
            self.refused = "encoding"
            return None
        if self._sse is not None and not self._sse.done:
            self.refused = "incomplete"
            return None
        body = b"".join(self.chunks)
        self.chunks = []
        return Entry(now, now + ttl, self.content_type, self.stream, body)
