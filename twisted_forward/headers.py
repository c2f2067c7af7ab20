"""
Which headers cross the proxy, in each direction.

One place for the lists: hop-by-hop headers (RFC 9110 §7.6.1) never cross;
headers that say who or where the client is never reach the upstream, since
hiding the client's origin is the point of the proxy.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from twisted.web.http_headers import Headers

from ._compat import clear_headers
from .keys import CREDENTIAL_HEADERS

#: Connection-specific headers: meaningful for one hop only (RFC 9110 §7.6.1,
#: plus the non-standard Proxy-Connection and the proxy's own credentials).
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Headers that carry the client's address (or where it is, or the path it
#: took to us), as proxies, load balancers and CDNs write them.
CLIENT_IDENTIFYING: frozenset[bytes] = frozenset(
    {
        b"forwarded",
        b"via",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-proto",
        b"x-forwarded-server",
        b"x-forwarded-scheme",
        b"x-forwarded-ssl",
        b"x-forwarded-by",
        b"x-forwarded-prefix",
        b"x-forwarded-uri",
        b"x-original-forwarded-for",
        b"x-real-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"x-remote-ip",
        b"x-remote-addr",
        b"x-originating-ip",
        b"client-ip",
        b"true-client-ip",
        b"proxy-client-ip",
        b"wl-proxy-client-ip",
        b"cf-connecting-ip",
        b"cf-connecting-ipv6",
        b"cf-pseudo-ipv4",
        b"cf-ipcountry",
        b"fastly-client-ip",
        b"cloudfront-viewer-address",
        b"cloudfront-viewer-country",
        b"x-appengine-user-ip",
        b"x-azure-clientip",
        b"x-azure-socketip",
        b"x-envoy-external-address",
        b"x-vercel-forwarded-for",
        b"x-nf-client-connection-ip",
        b"fly-client-ip",
        b"x-proxyuser-ip",
    }
)

#: Never sent upstream.  Host and Content-Length are the Agent's to write for
#: the upstream; cookies are the client's with us, not with the upstream;
#: Expect was answered by our server already; the credential headers are
#: rebuilt by the key rules; Origin is the client's page, and CORS is the
#: proxy's to answer (:mod:`twisted_forward.cors`).
_NOT_UPSTREAM: frozenset[bytes] = (
    HOP_BY_HOP
    | CLIENT_IDENTIFYING
    | frozenset(CREDENTIAL_HEADERS)
    | frozenset({b"host", b"content-length", b"cookie", b"cookie2", b"expect", b"origin"})
)

#: Headers that choose which of the key holder's organizations and projects
#: a request is billed to.  With the client's own key they are the client's;
#: with one of the proxy's default keys the operator's account is not the
#: client's to choose, and they are dropped (the key's own defaults apply).
ACCOUNT_HEADERS: frozenset[bytes] = frozenset({b"openai-organization", b"openai-project"})

_NOT_UPSTREAM_WITH_DEFAULT_KEY: frozenset[bytes] = _NOT_UPSTREAM | ACCOUNT_HEADERS

#: Never relayed back to the client.  Content-Length is set from the
#: upstream's framing by the relay.
_NOT_DOWNSTREAM: frozenset[bytes] = HOP_BY_HOP | frozenset({b"content-length"})


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Header names listed in Connection: hop-by-hop by declaration."""
    values = headers.getRawHeaders(b"connection")
    if not values:
        return frozenset()
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",")
    )


def _copy(
    source: Headers, dest: Headers, skip: frozenset[bytes]
) -> None:
    extra = _connection_tokens(source)
    for name, values in source.getAllRawHeaders():
        lowered = name.lower()
        if lowered in skip or lowered in extra:
            continue
        dest.setRawHeaders(name, list(values))


def upstream_request_headers(
    client: Headers,
    credentials: Iterable[tuple[bytes, bytes]] = (),
    default_key: bool = False,
) -> Headers:
    """The headers to send upstream for a client's request.

    :param credentials: the ``(header, value)`` pairs the key rules chose
        (Authorization, api-key, x-api-key); no other credential header of
        the client's is sent.
    :param default_key: True when ``credentials`` hold one of the proxy's
        default keys: the client's :data:`ACCOUNT_HEADERS` are then dropped.
    """
    out = Headers()
    _copy(client, out, _NOT_UPSTREAM_WITH_DEFAULT_KEY if default_key else _NOT_UPSTREAM)
    for name, value in credentials:
        out.setRawHeaders(name, [value])
    return out


def relay_response_headers(upstream: Headers, dest: Headers) -> None:
    """Copy the upstream's answer headers, minus hop-by-hop ones, to ``dest``."""
    _copy(upstream, dest, _NOT_DOWNSTREAM)


def release(headers: Optional[Headers]) -> None:
    """Empty ``headers`` once nothing will read them again: their names,
    values and lists are freed while whoever holds the object keeps it.

    For an open stream, Twisted keeps the upstream request's headers and the
    upstream answer's (the request object, the parser and the answer refer
    to them) until the answer ends, long after they were sent or copied; and
    the client's answer headers, long after they were written.
    """
    if headers is not None:
        clear_headers(headers)


def release_upstream_headers(response: Any) -> None:
    """Empty an upstream answer's headers (once copied to the client's) and
    those of the request it answers (sent before the answer came).

    ``response`` is an ``IResponse``; its ``request`` (an
    ``IClientRequest``, public since Twisted 13.1) may be missing in test
    doubles.
    """
    headers = getattr(response, "headers", None)
    if isinstance(headers, Headers):
        release(headers)
    request_headers = getattr(getattr(response, "request", None), "headers", None)
    if isinstance(request_headers, Headers):
        release(request_headers)
