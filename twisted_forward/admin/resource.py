"""
The ``/_admin/`` resource: the page's files, and the API behind the admin key.

- ``/_admin/`` and its files are served to whoever passes the IP gate: they
  hold no figure and no secret, and the page asks for the admin key before
  it asks the API for anything.
- ``/_admin/api/…`` needs ``Authorization: Bearer <ADMIN_KEY>``.  A missing
  or wrong key gets a 401 (OpenAI's error shape), counted in
  ``openai_forward_admin_refusals_total``; what was sent is never logged.

Every answer carries a strict Content-Security-Policy (``'self'`` only), no
framing, no sniffing, no referrer; API answers are ``no-store``.  Every API
body is masked of the configured secrets before it leaves.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Optional
from urllib.parse import parse_qs

from prometheus_client import Counter
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..errors import error_body
from ..keys import SecretMask, scrub
from ..target import BadTarget, split_target
from .api import AdminAPI, Answer, BadParam
from .assets import Asset
from .auth import AdminAuth
from .live import LiveFigures, Sample

#: Where the admin lives on any port that serves it.
PREFIX = b"/_admin"

CONTENT_SECURITY_POLICY = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    b"connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    b"form-action 'self'; frame-ancestors 'none'"
)

_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)

#: Event streams open at once, at most (each is one connection).
MAX_STREAMS = 32


def is_admin_path(path: bytes) -> bool:
    """Whether a raw request path is the admin's."""
    return path == PREFIX or path.startswith(PREFIX + b"/")


def sse_event(name: str, data: Any) -> bytes:
    """One server-sent event (JSON data holds no newline)."""
    return b"event: %s\ndata: %s\n\n" % (
        name.encode("ascii"), json.dumps(data, separators=(",", ":")).encode("utf-8")
    )


class AdminResource(Resource):
    """Serves ``/_admin/``: the page's files and the API.

    A leaf: it reads the raw target itself, so it answers the same whether
    the proxy's router hands it a request or it is the root of its own port.

    :param secrets: every configured secret (default keys, forward keys, the
        admin key), masked in every API body should one ever be in it.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        api: AdminAPI,
        auth: AdminAuth,
        assets: dict[str, Asset],
        live: LiveFigures,
        refusals: Counter,
        secrets: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.api = api
        self.auth = auth
        self.assets = assets
        self.live = live
        self.refusals = refusals
        self._secrets = tuple(s.encode("utf-8") for s in secrets if s)
        #: Open event streams, ended by :meth:`close`.
        self.streams: set[Request] = set()
        #: Why the API's figures cannot be read (one line), while they
        #: cannot: logged once when that starts, once when it ends.
        self.unavailable: Optional[str] = None
        self._handlers: dict[bytes, Callable[[dict[str, list[str]]], "Deferred[Answer]"]] = {
            b"usage": api.usage,
            b"keys": api.keys,
            b"exchanges": api.exchanges,
        }

    # ------------------------------------------------------------ helpers

    def _headers(self, request: IRequest) -> None:
        headers = request.responseHeaders
        headers.removeHeader(b"server")
        for name, value in _HEADERS:
            headers.setRawHeaders(name, [value])

    def _error(self, request: IRequest, status: int, code: str, message: str,
               param: Optional[str] = None) -> bytes:
        body = error_body(status, code, message)
        if param is not None:
            obj = json.loads(body)
            obj["error"]["param"] = param
            body = json.dumps(obj).encode("utf-8")
        request.setResponseCode(status)
        headers = request.responseHeaders
        headers.setRawHeaders(b"content-type", [b"application/json"])
        headers.setRawHeaders(b"cache-control", [b"no-store"])
        headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
        return body

    def mask(self, body: bytes) -> bytes:
        """``body`` with every configured secret and key-shaped word masked."""
        if self._secrets:
            mask = SecretMask(self._secrets)
            body = mask.feed(body) + mask.flush()
        return scrub(body)

    # ------------------------------------------------------------ render

    def render(self, request: Request) -> bytes | int:
        self._headers(request)
        try:
            path, query = split_target(request.uri)
        except BadTarget as e:
            return self._error(request, 400, "invalid_request_target", str(e))
        if not is_admin_path(path):
            return self._error(request, 404, "unknown_route", "Nothing is served here.")
        method = request.method
        if method not in (b"GET", b"HEAD"):
            request.responseHeaders.setRawHeaders(b"allow", [b"GET, HEAD"])
            return self._error(request, 405, "method_not_allowed", "Only GET is served here.")
        rest = path[len(PREFIX):]
        if rest == b"":
            request.setResponseCode(302)
            request.responseHeaders.setRawHeaders(b"location", [PREFIX + b"/"])
            request.responseHeaders.setRawHeaders(b"content-length", [b"0"])
            return b""
        if rest.startswith(b"/api/"):
            return self._api(request, rest[len(b"/api/"):], query)
        name = "index.html" if rest == b"/" else rest[1:].decode("latin-1")
        asset = self.assets.get(name)
        if asset is None:
            return self._error(request, 404, "not_found", "No such page.")
        headers = request.responseHeaders
        headers.setRawHeaders(b"content-type", [asset.content_type])
        headers.setRawHeaders(b"cache-control", [b"no-cache"])
        headers.setRawHeaders(b"content-length", [b"%d" % len(asset.body)])
        return asset.body

    def _api(self, request: Request, name: bytes, query: bytes) -> bytes | int:
        if not self.auth.allows(request):
            self.refusals.labels("invalid_admin_key").inc()
            request.responseHeaders.setRawHeaders(
                b"www-authenticate", [b'Bearer realm="twisted-forward admin"']
            )
            return self._error(
                request, 401, "invalid_admin_key",
                "This needs the admin key: Authorization: Bearer <ADMIN_KEY>.",
            )
        try:
            params = parse_qs(
                query[1:].decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                errors="strict", max_num_fields=20,
            )
        except (UnicodeDecodeError, ValueError):
            return self._error(request, 400, "invalid_query", "The query string is not valid.")
        if name == b"events":
            return self._events(request, params)
        handler = self._handlers.get(name)
        if handler is None:
            return self._error(request, 404, "not_found", "No such API endpoint.")
        # A BadParam raised by the handler becomes a failed Deferred: a 400.
        d = maybeDeferred(handler, params)
        gone: list[bool] = []

        def client_left(_: Failure) -> None:
            gone.append(True)
            d.cancel()

        request.notifyFinish().addErrback(client_left)
        d.addCallbacks(
            lambda answer: self._answer(request, answer, gone),
            lambda failure: self._failed(request, failure, gone),
        )
        return NOT_DONE_YET

    def _answer(self, request: Request, answer: Answer, gone: list[bool]) -> None:
        if self.unavailable is not None:
            self.unavailable = None
            self.log.info("admin API: the figures can be read again")
        if gone:
            return
        body = self.mask(answer.body)
        request.setResponseCode(answer.status)
        headers = request.responseHeaders
        headers.setRawHeaders(b"content-type", [answer.content_type])
        headers.setRawHeaders(b"cache-control", [b"no-store"])
        headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
        if answer.filename is not None:
            headers.setRawHeaders(
                b"content-disposition",
                [b'attachment; filename="%s"' % answer.filename.encode("ascii", "replace")],
            )
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _failed(self, request: Request, failure: Failure, gone: list[bool]) -> None:
        if not failure.check(BadParam):
            self._unavailable(failure)
        if gone:
            return
        if failure.check(BadParam):
            e = failure.value
            body = self._error(request, 400, "invalid_parameter", str(e), e.param)
        else:
            body = self._error(
                request, 503, "admin_unavailable",
                "The figures could not be read just now; try again.",
            )
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _unavailable(self, failure: Failure) -> None:
        """Count a request the figures could not be read for; log one line
        when that starts (not a traceback a request: a database that is
        down would flood the log)."""
        self.refusals.labels("admin_unavailable").inc()
        message = failure.getErrorMessage().strip().splitlines()
        why = f"{failure.type.__name__}: {message[0][:200] if message else ''}".rstrip(": ")
        starts = self.unavailable is None
        self.unavailable = why
        if not starts:
            return
        self.log.error(
            "admin API: cannot read the figures ({why}); answering 503 admin_unavailable "
            "until they can be read (counted in openai_forward_admin_refusals_total)",
            why=why,
        )

    # ------------------------------------------------------------ events

    def _events(self, request: Request, params: dict[str, list[str]]) -> bytes | int:
        if params:
            name = next(iter(params))
            return self._error(request, 400, "invalid_parameter",
                               f"unknown parameter {name!r}; this endpoint takes none", name)
        if len(self.streams) >= MAX_STREAMS:
            return self._error(request, 503, "too_many_streams",
                               "Too many live event streams are open; close one.")
        headers = request.responseHeaders
        headers.setRawHeaders(b"content-type", [b"text/event-stream; charset=utf-8"])
        headers.setRawHeaders(b"cache-control", [b"no-store"])
        headers.setRawHeaders(b"x-accel-buffering", [b"no"])
        if request.method == b"HEAD":
            return b""
        request.write(
            b"retry: 2000\n\n"
            + sse_event("history", [s.as_dict() for s in self.live.history])
        )

        def send(sample: Sample) -> None:
            request.write(sse_event("figures", sample.as_dict()))

        def ended(_: object) -> None:
            self.live.unsubscribe(send)
            self.streams.discard(request)

        self.live.subscribe(send)
        self.streams.add(request)
        request.notifyFinish().addBoth(ended)
        return NOT_DONE_YET

    def close(self) -> None:
        """End every open event stream (at shutdown)."""
        for request in list(self.streams):
            self.streams.discard(request)
            request.finish()
