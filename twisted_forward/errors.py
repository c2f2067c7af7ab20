"""
Errors the proxy makes itself, shaped like OpenAI's so the official SDKs
raise the matching exception (``AuthenticationError`` for 401,
``PermissionDeniedError`` for 403, ...).

The message is written by us: it never holds a key, a stack trace or an
internal address.
"""

from __future__ import annotations

import json

from twisted.web.iweb import IRequest

from .keys import scrub
from .state import state_of

#: status -> the OpenAI ``type`` field for errors we raise at that status.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    501: "invalid_request_error",
    502: "upstream_error",
    503: "server_error",
    504: "upstream_error",
    508: "server_error",
}


def error_body(status: int, code: str, message: str) -> bytes:
    """The JSON body of an OpenAI-style error (anything key-shaped masked)."""
    return scrub(json.dumps(
        {
            "error": {
                "message": message,
                "type": _TYPES.get(status, "server_error"),
                "param": None,
                "code": code,
            }
        }
    ).encode("utf-8"))


def write_error(request: IRequest, status: int, code: str, message: str) -> bytes:
    """Set the status and headers of an error answer and return its body.

    Meant as ``return write_error(...)`` from ``render``, or followed by
    ``request.write(body); request.finish()`` when answering later.
    """
    body = error_body(status, code, message)
    # For the access log line and the refusal counter.
    state_of(request).error = code
    request.setResponseCode(status)
    headers = request.responseHeaders
    headers.removeHeader(b"server")
    headers.setRawHeaders(b"content-type", [b"application/json"])
    headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
    return body


def send_error(request: IRequest, status: int, code: str, message: str) -> None:
    """Answer a request that is waiting (``NOT_DONE_YET``) with an error."""
    body = write_error(request, status, code, message)
    request.write(body)
    request.finish()
