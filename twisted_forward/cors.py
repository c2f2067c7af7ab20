"""
Cross-origin access for browser clients (CORS).

A chat page served from another origin calls the API with ``fetch()``.  The
browser first sends a *preflight* (``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``, and no credentials); the proxy answers it
itself (204, never forwarded, never asking for a key: the IP gate still
applies), and puts the CORS headers on every answer to a request that has an
``Origin`` -- relayed JSON, streams and its own errors alike -- replacing any
``Access-Control-*`` header the upstream sent.

``CORS_ORIGINS`` says which origins: ``*`` (the default, as openai-forward),
a list of origins, or ``none`` (no CORS headers, preflights not answered
specially).  The admin API is same-origin and gets none of this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

from twisted.web.http_headers import Headers

#: The answer headers the OpenAI SDKs and chat pages read.
EXPOSED_HEADERS = b", ".join([
    b"x-request-id",
    b"openai-organization",
    b"openai-processing-ms",
    b"openai-version",
    b"openai-model",
    b"x-ratelimit-limit-requests",
    b"x-ratelimit-limit-tokens",
    b"x-ratelimit-remaining-requests",
    b"x-ratelimit-remaining-tokens",
    b"x-ratelimit-reset-requests",
    b"x-ratelimit-reset-tokens",
    b"retry-after",
    b"x-cache",
])
#: The methods a preflight is told the proxy accepts.
ALLOWED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
#: Seconds a browser may keep a preflight's answer (Chromium caps it at 7200).
MAX_AGE = b"600"
#: A list of header names, as ``Access-Control-Request-Headers`` holds.
_PREFLIGHT_HEADERS = frozenset({
    b"access-control-allow-methods", b"access-control-allow-headers", b"access-control-max-age",
})
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_HEADER_LIST = re.compile(_TOKEN + rb"(?:[ \t]*,[ \t]*" + _TOKEN + rb")*")


def parse_cors_origins(value: str) -> tuple[str, ...]:
    """``*``, ``none`` or a space/comma list of ``scheme://host[:port]``
    origins; ``()`` means CORS is off."""
    items = tuple(item for item in re.split(r"[\s,]+", value.strip()) if item)
    if not items:
        raise ValueError("give '*', 'none' or a list of origins")
    if len(items) == 1 and items[0].lower() == "none":
        return ()
    if "*" in items:
        if len(items) > 1:
            raise ValueError("'*' cannot be combined with other origins")
        return ("*",)
    origins = []
    for item in items:
        try:
            parts = urlsplit(item)
            _ = parts.port  # raises ValueError on a bad port
        except ValueError:
            parts = None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
            or parts.query or parts.fragment or parts.username is not None
        ):
            raise ValueError(f"{item!r} is not an origin such as https://chat.example.com")
        origins.append(f"{parts.scheme}://{parts.netloc.lower()}")
    return tuple(origins)


def is_preflight(method: bytes, headers: Headers) -> bool:
    """Whether a request is a CORS preflight."""
    return (
        method == b"OPTIONS"
        and headers.hasHeader(b"origin")
        and headers.hasHeader(b"access-control-request-method")
    )


@dataclass(frozen=True)
class Cors:
    """The CORS answer headers for the configured origins.

    :ivar origins: ``("*",)`` for any origin, else the allowed origins
        (``scheme://host[:port]``, lower case); empty: off.
    """

    origins: tuple[str, ...] = ("*",)

    @property
    def enabled(self) -> bool:
        """Whether the proxy does CORS at all (``CORS_ORIGINS`` not ``none``)."""
        return bool(self.origins)

    def allowed(self, origin: bytes) -> Optional[bytes]:
        """The ``Access-Control-Allow-Origin`` value for ``origin``, or None
        when that origin is not allowed."""
        if self.origins == ("*",):
            return b"*"
        try:
            text = origin.decode("ascii").strip().lower()
        except UnicodeDecodeError:
            return None
        return text.encode("ascii") if text in self.origins else None

    def apply(
        self, method: bytes, request_headers: Headers, response_headers: Headers
    ) -> None:
        """Set the CORS headers of an answer to a request with an Origin,
        replacing the upstream's own ``Access-Control-*`` headers (a
        preflight's answer is the proxy's own: :meth:`preflight` 's headers
        stay)."""
        if not self.enabled:
            return
        origins = request_headers.getRawHeaders(b"origin")
        if not origins:
            return
        keep = _PREFLIGHT_HEADERS if is_preflight(method, request_headers) else frozenset()
        for name, _ in list(response_headers.getAllRawHeaders()):
            lowered = name.lower()
            if lowered.startswith(b"access-control-") and lowered not in keep:
                response_headers.removeHeader(name)
        if self.origins != ("*",):
            vary = response_headers.getRawHeaders(b"vary", [])
            if not any(b"origin" in v.lower() for v in vary):
                response_headers.setRawHeaders(b"vary", [*vary, b"Origin"])
        allow = self.allowed(origins[0])
        if allow is None:
            return
        response_headers.setRawHeaders(b"access-control-allow-origin", [allow])
        response_headers.setRawHeaders(b"access-control-expose-headers", [EXPOSED_HEADERS])

    def preflight(self, request_headers: Headers, response_headers: Headers) -> int:
        """Fill in a preflight's own answer headers (the common ones are
        added by :meth:`apply` as its head is written); its status (204)."""
        origin = request_headers.getRawHeaders(b"origin", [b""])[0]
        if self.allowed(origin) is not None:
            response_headers.setRawHeaders(b"access-control-allow-methods", [ALLOWED_METHODS])
            asked = b",".join(request_headers.getRawHeaders(b"access-control-request-headers", []))
            asked = asked.strip(b" \t,")
            if asked and _HEADER_LIST.fullmatch(asked):
                response_headers.setRawHeaders(b"access-control-allow-headers", [asked])
            response_headers.setRawHeaders(b"access-control-max-age", [MAX_AGE])
        response_headers.setRawHeaders(b"content-length", [b"0"])
        return 204
