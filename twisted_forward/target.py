"""
The incoming request target: what a client may ask the proxy for.

:func:`split_target` takes the raw target of the request line apart into
the path and query that are forwarded, and refuses the shapes that could
climb out of an upstream's base path or change the host.
"""

from __future__ import annotations

import re

#: A ``.`` or ``..`` segment in any spelling some server decodes before it
#: routes: dots as ``.`` or ``%2e``; separators ``/``, ``\`` (IIS, some
#: frameworks), ``%2f`` and ``%5c`` (servers that decode before splitting);
#: a ``;params`` suffix (Tomcat, Jetty and Spring drop it: ``..;/`` is
#: ``..``), ``;`` also as ``%3b``.
_SEPARATOR = rb"(?:/|\\|%2f|%5c)"
_DOT_SEGMENT = re.compile(
    rb"(?:^|" + _SEPARATOR + rb")(?:\.|%2e){1,2}(?:(?:;|%3b)[^/\\]*)?(?=" + _SEPARATOR + rb"|$)",
    re.IGNORECASE,
)


class BadTarget(ValueError):
    """A request target the proxy will not forward; the text says why."""


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """Split a request target into its raw path and query (with its ``?``).

    Origin-form (``/v1/x?y``) is the norm; absolute-form
    (``http://host/v1/x``) is accepted as RFC 9112 §3.2.2 asks, and its
    authority is ignored.

    :raises BadTarget: for anything else, or a path with dot segments
        (which could climb out of an upstream base path), however spelled
        (see :data:`_DOT_SEGMENT`).
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
