"""
The incoming request target: what a client may ask the proxy for.

:func:`split_target` takes the raw target of the request line apart into
the path and query that are forwarded, and refuses the shapes that could
climb out of an upstream's base path or change the host.
"""

from __future__ import annotations

import re

_DOT_SEGMENT = re.compile(rb"(?:^|/)(?:\.|%2e){1,2}(?:/|$)", re.IGNORECASE)


class BadTarget(ValueError):
    """A request target the proxy will not forward; the text says why."""


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """Split a request target into its raw path and query (with its ``?``).

    Origin-form (``/v1/x?y``) is the norm; absolute-form
    (``http://host/v1/x``) is accepted as RFC 9112 §3.2.2 asks, and its
    authority is ignored.

    :raises BadTarget: for anything else, or a path with dot segments
        (which could climb out of an upstream base path).
    """
    if not target.startswith(b"/"):
        lowered = target[:8].lower()
        if lowered.startswith(b"http://") or lowered.startswith(b"https://"):
            rest = target[target.index(b"//") + 2 :]
            cut = min(
                (i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0),
                default=len(rest),
            )
            target = rest[cut:]
            if not target.startswith(b"/"):
                target = b"/" + target
        else:
            raise BadTarget("The request target must be a path starting with '/'.")
    path, sep, query = target.partition(b"?")
    if _DOT_SEGMENT.search(path):
        raise BadTarget("The request path must not hold '.' or '..' segments.")
    return path, sep + query
