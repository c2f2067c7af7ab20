"""
Undoing an answer's content coding (gzip, deflate), incrementally and with a
size bound: the one decompression helper that the relay (masking keys in
error answers) and the chat records (reading compressed answers) share.
"""

from __future__ import annotations

import zlib
from typing import Optional

from twisted.web.http_headers import Headers

#: The codings :class:`Inflater` undoes.
INFLATABLE = frozenset({b"gzip", b"x-gzip", b"deflate"})


def content_codings(headers: Headers) -> list[bytes]:
    """The answer's content codings, in the order applied, without identity."""
    codings = [
        token.strip().lower()
        for value in headers.getRawHeaders(b"content-encoding") or ()
        for token in value.split(b",")
    ]
    return [c for c in codings if c and c != b"identity"]


def _zlib_header(chunk: bytes) -> bool:
    """Whether ``chunk`` starts with a zlib (RFC 1950) header."""
    return len(chunk) >= 2 and chunk[0] & 0x0F == 8 and ((chunk[0] << 8) | chunk[1]) % 31 == 0


class Inflater:
    """Decompresses one body, chunk by chunk, up to ``limit`` bytes out.

    ``deflate`` is zlib-wrapped by RFC 9110 §8.4.1.2, but some servers send
    raw deflate: the first bytes decide.  ``gzip`` also takes a zlib stream.
    """

    def __init__(self, coding: bytes, limit: int) -> None:
        if coding not in INFLATABLE:
            raise ValueError(f"cannot inflate {coding!r}")
        self.limit = limit
        self.produced = 0
        #: Set when more than ``limit`` bytes would come out.
        self.overflowed = False
        self._deflate = coding == b"deflate"
        self._decoder: Optional["zlib._Decompress"] = (
            None if self._deflate else zlib.decompressobj(32 + zlib.MAX_WBITS)
        )

    @property
    def eof(self) -> bool:
        """Whether the compressed stream ended."""
        return self._decoder is not None and self._decoder.eof

    def feed(self, chunk: bytes) -> bytes:
        """The plain bytes ``chunk`` gives, within the limit.

        :raises zlib.error: on bytes that are not of the coding.
        """
        if self._decoder is None:
            if not chunk:
                return b""
            wbits = zlib.MAX_WBITS if _zlib_header(chunk) else -zlib.MAX_WBITS
            self._decoder = zlib.decompressobj(wbits)
        room = self.limit - self.produced
        out = self._decoder.decompress(chunk, max(room, 1))
        self.produced += len(out)
        if self._decoder.unconsumed_tail or self.produced > self.limit:
            self.overflowed = True
        return out


def decode_whole(body: bytes, headers: Headers, limit: int) -> Optional[bytes]:
    """``body`` without its content coding, or None if it cannot be undone
    (an unknown or stacked coding, a broken, unfinished or oversized stream)."""
    codings = content_codings(headers)
    if not codings:
        return body
    if len(codings) > 1 or codings[0] not in INFLATABLE:
        return None
    inflater = Inflater(codings[0], limit)
    try:
        plain = inflater.feed(body)
    except zlib.error:
        return None
    if inflater.overflowed or not inflater.eof:
        return None
    return plain
