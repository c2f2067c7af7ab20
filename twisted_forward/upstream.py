"""
Reaching the upstream: URL joining, the treq client, request bodies.

The upstream URL is always the configured origin followed by the client's
path, so nothing a client sends (``//evil.com/x``, ``@evil.com``, an
absolute-form target) can change the host the proxy talks to.

treq is used for the request, but a proxy must relay bytes verbatim, and
``treq.HTTPClient.request`` always stacks a ``CookieAgent`` (a jar shared by
every user of the client) and a ``ContentDecoderAgent`` (which adds
``Accept-Encoding: gzip`` and gunzips answers).  So the client gets a jar
that never stores nor sends a cookie, and the agent beneath it undoes the
decoder: it drops the Accept-Encoding value the decoder appended and hides
the answer's Content-Encoding from it, for the relay to restore.
"""

from __future__ import annotations

import re
from http.cookiejar import CookieJar
from typing import Any, Optional

from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from .config import ProxyURL, UpstreamURL
from .outbound import upstream_agent

#: Where the agent beneath treq parks the upstream's Content-Encoding.
HIDDEN_CONTENT_ENCODING = b"x-twisted-forward-content-encoding"

_UNSAFE = re.compile(rb"[^\x21-\x7e]|#")
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


def _escape(match: "re.Match[bytes]") -> bytes:
    return b"%%%02X" % match.group(0)[0]


def join_url(base: UpstreamURL, path: bytes, query: bytes) -> bytes:
    """The upstream URL for a client path under ``base``.

    :param path: the raw path after any route prefix, starting with ``/``
        (or empty, for the base itself).
    :param query: ``b""`` or the raw query with its leading ``?``.
    """
    tail = _UNSAFE.sub(_escape, path + query)
    return base.origin.encode("ascii") + base.path.encode("ascii") + tail


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one go."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> "Deferred[None]":
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class ReadyURL(EncodedURL):
    """A URL that is already a valid URI, handed to treq as it is.

    treq parses every URL with hyperlink and IDNA-encodes its host again
    (about a tenth of the proxy's time per request); :func:`join_url` built
    this one from a validated base and an escaped path, so that work is
    skipped.  treq only calls ``to_uri().to_text()`` on it.
    """

    def __init__(self, url: bytes) -> None:  # no EncodedURL.__init__: no parsing
        self._ready = url.decode("ascii")

    def to_uri(self, *args: Any, **kwargs: Any) -> "ReadyURL":
        return self

    def to_text(self, *args: Any, **kwargs: Any) -> str:
        return self._ready


class NoCookies(CookieJar):
    """A cookie jar that never keeps nor sends a cookie.

    treq's client would otherwise share one jar between every user of the
    proxy: one user's ``Set-Cookie`` must not reach another's request.
    """

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def set_cookie(self, cookie: Any) -> None:
        pass


@implementer(IAgent)
class VerbatimAgent:
    """The agent beneath treq's wrappers that keeps bodies byte for byte."""

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> "Deferred[IResponse]":
        if headers is not None:
            accepted = headers.getRawHeaders(b"accept-encoding")
            if accepted:
                # ContentDecoderAgent appended exactly one value: its own.
                if len(accepted) > 1:
                    headers.setRawHeaders(b"accept-encoding", accepted[:-1])
                else:
                    headers.removeHeader(b"accept-encoding")
        d = self._agent.request(method, uri, headers, bodyProducer)
        d.addCallback(self._hide_encoding)
        return d

    @staticmethod
    def _hide_encoding(response: IResponse) -> IResponse:
        headers = response.headers
        encoding = headers.getRawHeaders(b"content-encoding")
        if encoding:
            headers.removeHeader(b"content-encoding")
            headers.setRawHeaders(HIDDEN_CONTENT_ENCODING, encoding)
        return response


def restore_encoding(headers: Headers) -> None:
    """Undo :class:`VerbatimAgent`'s hiding on the headers being relayed."""
    headers.removeHeader(b"content-encoding")  # the decoder may leave b""
    hidden = headers.getRawHeaders(HIDDEN_CONTENT_ENCODING)
    if hidden:
        headers.removeHeader(HIDDEN_CONTENT_ENCODING)
        headers.setRawHeaders(b"content-encoding", hidden)


class _QuietFactory(_HTTP11ClientFactory):
    """Connection factory that does not log every new upstream connection."""

    noisy = False


class _QuietPool(HTTPConnectionPool):
    _factory = _QuietFactory


class Upstream:
    """A treq client for one proxy: one connection pool, no cookies.

    :param proxy: the outbound proxy (PROXY) to reach upstreams through.
    :param ssl_cert_file: a PEM file of the CAs trusted for upstream TLS
        instead of the system's (SSL_CERT_FILE).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        connect_timeout: float,
        agent: Optional[IAgent] = None,
        max_persistent_per_host: int = 64,
        proxy: Optional[ProxyURL] = None,
        ssl_cert_file: Optional[str] = None,
    ) -> None:
        if agent is None:
            pool = _QuietPool(reactor, persistent=True)
            pool.maxPersistentPerHost = max_persistent_per_host
            pool.cachedConnectionTimeout = 60
            self.pool: Optional[HTTPConnectionPool] = pool
            agent = upstream_agent(reactor, pool, connect_timeout, proxy, ssl_cert_file)
        else:
            self.pool = None
        self._reactor = reactor
        self._client = HTTPClient(VerbatimAgent(agent), cookiejar=NoCookies())

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: Optional[IBodyProducer],
    ) -> "Deferred[IResponse]":
        """Send a request; the Deferred fires with the response head."""
        return self._client.request(
            method.decode("ascii"),
            ReadyURL(url),
            headers=headers,
            data=body,
            allow_redirects=False,
            unbuffered=True,
            reactor=self._reactor,
        )

    def close(self) -> "Deferred[None]":
        """Close idle pooled connections (at shutdown)."""
        if self.pool is None:
            return succeed(None)
        return self.pool.closeCachedConnections()


def response_length(response: IResponse) -> Optional[int]:
    """The upstream body's length when its framing says, else None."""
    length = response.length
    return None if length is UNKNOWN_LENGTH else int(length)
