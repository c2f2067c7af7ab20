"""
The forwarding resource and the exchange.

One :class:`ProxyResource` per route.  For each request an :class:`Exchange`
chooses the key, sends the request upstream through treq and, once the
answer's head arrives, hands the body to a relay protocol
(:mod:`twisted_forward.relay`) that writes each chunk to the client as it
comes.
"""

from __future__ import annotations

import itertools
import os
from typing import IO, Optional

from twisted.internet import error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IRequest, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from ._compat import set_header_values
from .cache.hook import Lookup
from .cache.interfaces import IExchangeCache
from .cache.key import without_caching
from .cache.replay import Replay
from .chat.recorder import ExchangeInfo, IExchangeTap, IRecorder, NullRecorder, RequestBody
from .config import Route
from .errors import error_body, send_error, write_error
from .framing import Refusal, client_transport
from .headcheck import IHeadCheck, key_refusal
from .headers import relay_response_headers, release_upstream_headers, upstream_request_headers
from .keys import KeyDecision, KeyRules, SecretMask, key_refused, looks_keyed, scrub
from .limits import UpstreamSlots
from .loops import mark
from .metrics import Metrics
from .policies.gate import UNLIMITED, Admission, IExchangePolicy, RequestFacts, client_digest
from .relay import Relay, ScrubbingRelay, discard
from .sharedjson import SharedParse
from .state import RequestState, state_of
from .upstream import (
    BytesProducer,
    IUpstream,
    host_header,
    join_url,
    response_length,
)
from .upstream_http import head_refusal

#: Statuses for which another default key is tried, if nothing was sent yet.
_FAILOVER = frozenset({401, 429, 500, 502, 503, 504})
#: Cool-down for a rate-limited key when the upstream gives no Retry-After.
_DEFAULT_REST = 20.0
_ids = itertools.count(1)
_ID_PREFIX = os.urandom(4).hex()


def client_address(request: IRequest) -> str:
    """The client's address as the access gate resolved it, else the peer."""
    resolved = state_of(request).client
    if resolved is not None:
        return resolved
    peer = request.getClientAddress()
    return str(getattr(peer, "host", "unix"))


@implementer(IHeadCheck)
class ProxyResource(Resource):
    """Forwards every request it renders to one upstream.

    It is a leaf: the router has already split the raw target, taken off
    the route prefix and put the rest in the request's state (``path``
    and ``query``, :mod:`.state`).
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        route: Route,
        upstream: IUpstream,
        keys: KeyRules,
        reactor: IReactorTime,
        read_timeout: float,
        idle_timeout: float,
        recorder: Optional[IRecorder] = None,
        metrics: Optional[Metrics] = None,
        cache: Optional[IExchangeCache] = None,
        policy: Optional[IExchangePolicy] = None,
        upstream_slots: Optional[UpstreamSlots] = None,
    ) -> None:
        super().__init__()
        self.route = route
        #: The policy hook (levels, limits, quotas), or None when none is set.
        self.policy = policy
        #: Upstream requests in flight, shared by every route (one cap).
        self.upstream_slots = upstream_slots if upstream_slots is not None else UpstreamSlots(None)
        self.route_label = route.prefix or "/"
        #: The Host every upstream request of this route carries.
        self.upstream_host = host_header(route.base)
        self.metrics = metrics.for_route(self.route_label) if metrics is not None else None
        #: Where requests go (:class:`~twisted_forward.upstream.IUpstream`).
        self.upstream = upstream
        self.keys = keys
        self.reactor = reactor
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.recorder: IRecorder = recorder or NullRecorder()
        #: The policies hand their parses of the bodies on to the chat
        #: record (one parse each), when there is a record.
        self.share_parses = route.kind == "openai" and not isinstance(self.recorder, NullRecorder)
        #: The response cache, when it is on for this route.
        self.cache = cache if cache is not None and cache.on(route) else None
        #: Exchanges in flight, for draining at shutdown.
        self.open: set[Exchange] = set()
        self._drain_waiters: list[Deferred[None]] = []

    def drained(self) -> "Deferred[None]":
        """Fires when no exchange is in flight any more."""
        if not self.open:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d

    def _closed(self, exchange: "Exchange") -> None:
        self.open.discard(exchange)
        if not self.open and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)

    def check_head(self, request: IRequest) -> Optional[Refusal]:
        """The key check on the request head alone (an
        :class:`~twisted_forward.headcheck.IHeadCheck` step, asked by the
        router for this route): 401 before any body is read."""
        state = state_of(request)
        decision = self._decide(request, state)
        if decision.refusal is None:
            # Rendered next, with the same head: decided once.
            state.key_decision = (self.keys, decision)
            return None
        return key_refusal(decision.refusal)

    def _decide(self, request: IRequest, state: RequestState) -> KeyDecision:
        """The key rules' decision on ``request``'s head: the one the head
        check left for this render, or a new one.  The one place the
        request's key label is set, by whichever stage decides: the head
        check (whose refusal is answered without a render) or the render
        (the only stage when there was no head check, or the rules changed
        at a reload in between)."""
        decided = state.key_decision
        state.key_decision = None  # not held for the rest of a stream
        if decided is not None and decided[0] is self.keys:
            decision = decided[1]  # by the head check, with these rules
        else:
            decision = self.keys.decide(request.requestHeaders)
        state.key_label = decision.label
        return decision

    def render(self, request: Request) -> bytes | int:
        state = state_of(request)
        path = state.path
        query = state.query
        decision = self._decide(request, state)
        if decision.refusal is not None:
            self.log.info(
                "refused {method} {path}: key ({label})",
                method=request.method.decode("latin-1"), path=path.decode("latin-1"),
                label=decision.label,
            )
            return write_error(request, 401, "invalid_api_key", decision.refusal)
        # Past the key rules: the policies' refusal or the exchange.
        state.route = self.route_label
        if self.policy is None:
            Exchange(self, request, path, query, decision).start()
            return NOT_DONE_YET
        return self._admit(request, path, query, decision)

    def _admit(
        self, request: Request, path: bytes, query: bytes, decision: KeyDecision
    ) -> bytes | int:
        """Ask the policies, then refuse or start the exchange.  A store
        that answers at once (memory) answers within this call."""
        assert self.policy is not None
        client_key = ""
        if not decision.substituted:
            # Only a client's own key is counted by its digest.
            credential = decision.authorization or (decision.send[0][1] if decision.send else b"")
            if credential:
                client_key = client_digest(credential)
        facts = RequestFacts(
            label=decision.label,
            level=decision.level,
            substituted=decision.substituted,
            method=request.method,
            path=(self.route.prefix + path.decode("latin-1")),
            content=request.content,
            content_type=request.getHeader(b"content-type") or b"",
            reservation=f"{_ID_PREFIX}-{next(_ids):x}",
            client_key=client_key,
            shared=SharedParse() if self.share_parses else None,
        )
        decided = self.policy.decide(facts)
        if isinstance(decided, Admission):
            return self._admitted(decided, request, path, query, decision)
        d = decided
        now: list[Admission] = []

        def at_once(admission: Admission) -> Admission:
            now.append(admission)
            return admission

        d.addCallback(at_once)
        if now:
            return self._admitted(now[0], request, path, query, decision)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def later(admission: Admission) -> None:
            if gone:
                admission.finish(False)
                return
            body = self._admitted(admission, request, path, query, decision)
            if isinstance(body, bytes):  # else NOT_DONE_YET: the exchange answers
                request.write(body)
                request.finish()

        d.addCallback(later)
        d.addErrback(lambda f: self.log.failure("policy check failed", f))
        return NOT_DONE_YET

    def _admitted(
        self,
        admission: Admission,
        request: Request,
        path: bytes,
        query: bytes,
        decision: KeyDecision,
    ) -> bytes | int:
        refusal = admission.refusal
        if refusal is not None:
            self.log.info(
                "refused {method} {path}: {code} ({label})",
                method=request.method.decode("latin-1"), path=path.decode("latin-1"),
                code=refusal.code, label=decision.label,
            )
            for name, value in admission.headers:
                request.responseHeaders.setRawHeaders(name, [value])
            return write_error(request, refusal.status, refusal.code, refusal.message)
        Exchange(self, request, path, query, decision, admission).start()
        return NOT_DONE_YET


class Exchange:
    """One client request and its upstream attempt(s)."""

    __slots__ = (
        "resource", "request", "decision", "admission", "url", "path", "query", "started",
        "client_gone", "done", "upstream_elapsed", "holds_slot", "relay", "pending", "head_timer",
        "timed_out", "key_order", "mask", "key_index", "tap", "request_id", "status", "sent",
        "sent_upstream", "info", "cache_lookup", "cache_hit", "body_override",
    )

    log = Logger()

    def __init__(
        self,
        resource: ProxyResource,
        request: Request,
        path: bytes,
        query: bytes,
        decision: KeyDecision,
        admission: Admission = UNLIMITED,
    ) -> None:
        self.resource = resource
        self.request = request
        self.decision = decision
        #: The policies' part: answer headers, body rewrite, usage, settling.
        self.admission = admission
        self.url = join_url(resource.route.base, path, query)
        self.path = path
        self.query = query
        self.started = resource.reactor.seconds()
        self.client_gone = False
        self.done = False
        #: Seconds from the request to the upstream to the end of its
        #: answer, once taken (:meth:`stop_clock`).
        self.upstream_elapsed: Optional[float] = None
        #: Whether this exchange counts in the upstream cap (until it ends).
        self.holds_slot = False
        #: What reads the answer's body now, if anything.
        self.relay: Optional[Relay | ScrubbingRelay] = None
        #: The Deferred for the head of the current attempt.
        self.pending: Optional[Deferred[IResponse]] = None
        self.head_timer: Optional[IDelayedCall] = None
        self.timed_out = False
        #: Default keys left to try; chosen when forwarding starts (a cache
        #: hit takes none).
        self.key_order: list[int] = []
        #: Masks our default keys in answers to requests we put one in.
        self.mask: Optional[SecretMask] = (
            resource.keys.default.mask() if decision.substituted else None
        )
        self.key_index: Optional[int] = None
        self.tap: Optional[IExchangeTap] = None
        self.request_id = f"{_ID_PREFIX}-{next(_ids):x}"
        #: The status given to the client (0 until there is one).
        self.status = 0
        self.sent = 0
        self.sent_upstream = self.started
        self.info: Optional[ExchangeInfo] = None
        #: What the response cache made of the request, once it looked.
        self.cache_lookup: Optional[Lookup] = None
        #: The answer came from the cache: no upstream request, no default
        #: key, zero upstream tokens (for the policies and the ledger).
        self.cache_hit = False
        #: The body to forward instead of the client's (the cache took its
        #: ``caching`` field out).
        self.body_override: Optional[bytes] = None

    # ------------------------------------------------------------ start

    def start(self) -> None:
        request = self.request
        res = self.resource
        res.open.add(self)
        if res.metrics is not None:
            res.metrics.started()
        if res.route.kind == "openai":
            self.info = ExchangeInfo(
                request_id=self.request_id,
                route=res.route.prefix or "/",
                method=request.method.decode("latin-1"),
                path=self.path.decode("latin-1"),
                client=client_address(request),
                key_label=self.decision.label,
                started=self.started,
                body=RequestBody(request.content),
                shared=self.admission.shared,
            )
            self.tap = res.recorder.begin(self.info)
        request.notifyFinish().addBoth(self._finished)
        if res.cache is not None:
            d = res.cache.lookup(request, res.route, self.path + self.query, self.decision)
            d.addCallback(self._looked_up).addErrback(self._lookup_failed)
            return
        self._forward()

    def _looked_up(self, lookup: Lookup) -> None:
        """The cache's answer: replay a hit, else forward."""
        if self.done or self.client_gone:
            return
        self.cache_lookup = lookup
        if self.info is not None:
            self.info.cache = lookup.result
        cache = self.resource.cache
        if lookup.hit and cache is not None:
            self.cache_hit = True
            self.status = 200
            replay = cache.replay(self.request, lookup, self.tap, self.admission.headers)
            replay.done.addCallback(self._replayed, replay)
            return
        body = lookup.body
        if body is not None and self.admission.body is not None:
            # The policies rewrote the client's body too (asking for usage):
            # send theirs, without the caching field.
            body = without_caching(self.admission.body)
        self.body_override = body
        if lookup.tap is not None:
            self.tap = lookup.tap if self.tap is None else _BothTaps(self.tap, lookup.tap)
        self._forward()

    def _lookup_failed(self, failure: Failure) -> None:
        """A bug in the cache must not hang the request: forward it."""
        self.log.failure("cache lookup failed", failure)
        if not (self.done or self.client_gone or self.pending or self.relay or self.cache_hit):
            self._forward()

    def _replayed(self, outcome: str, replay: Replay) -> None:
        self.sent = replay.sent
        self.end(outcome)

    def _forward(self) -> None:
        """Send the request upstream, with the first default key in turn."""
        if self.decision.substituted:
            self.key_order = self.resource.keys.default.order(self.decision.level)
        res = self.resource
        if not res.upstream_slots.acquire():
            self.log.warn(
                "refused {path}: {used} upstream requests in flight (MAX_UPSTREAM_CONNECTIONS)",
                path=self.path.decode("latin-1"), used=res.upstream_slots.used,
            )
            self.request.responseHeaders.setRawHeaders(b"retry-after", [b"1"])
            self._fail(
                503, "upstream_busy",
                "The proxy has as many upstream requests in flight as it allows; retry shortly.",
            )
            return
        self.holds_slot = True
        self._attempt()

    def _body(self) -> Optional[IBodyProducer]:
        """A fresh producer of the request body, or None if there is none."""
        req = self.request
        if self.body_override is not None:
            return BytesProducer(self.body_override)
        headers = req.requestHeaders
        if self.admission.body is not None:
            return BytesProducer(self.admission.body)
        if not (headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding")):
            return None
        content = req.content
        assert content is not None  # set when the request's head was read
        content.seek(0)
        getvalue = getattr(content, "getvalue", None)
        if getvalue is not None:
            return BytesProducer(getvalue())
        # A body spooled to disk: streamed from the file, which must outlive
        # this attempt (a failover sends it again).
        return FileBodyProducer(_KeptOpen(content))

    def _attempt(self) -> None:
        credentials = self.decision.send
        if self.decision.substituted:
            # Never a keyless request in place of a default key.
            if not self.key_order:
                self.log.warn(
                    "no usable default key for {path}; answering 503",
                    path=self.path.decode("latin-1"),
                )
                self._fail(
                    503, "no_default_key",
                    "The proxy has no usable API key at the moment.",
                )
                return
            self.key_index = self.key_order.pop(0)
            credentials = (
                self.resource.keys.default.credential(self.key_index, self.decision.carrier),
            )
        headers = upstream_request_headers(
            self.request.requestHeaders, credentials, default_key=self.decision.substituted
        )
        headers.setRawHeaders(b"host", [self.resource.upstream_host])
        mark(headers)
        try:
            d = self.resource.upstream.request(
                self.request.method, self.url, headers, self._body()
            )
        except ValueError:
            self._fail(400, "invalid_request", "The request cannot be forwarded as sent.")
            return
        self.pending = d
        self.sent_upstream = self.resource.reactor.seconds()
        self.timed_out = False
        self.head_timer = self.resource.reactor.callLater(
            self.resource.read_timeout, self._head_timeout
        )
        d.addCallbacks(self._got_head, self._no_head)

    def _head_timeout(self) -> None:
        self.head_timer = None
        self.timed_out = True
        if self.pending is not None:
            self.pending.cancel()

    def _stop_head_timer(self) -> None:
        if self.head_timer is not None and self.head_timer.active():
            self.head_timer.cancel()
        self.head_timer = None

    # ------------------------------------------------------------ head

    def _got_head(self, response: IResponse) -> None:
        self.pending = None
        self._stop_head_timer()
        if self.client_gone:
            discard(response)
            return
        code = response.code
        if self.key_index is not None:
            if code == 401:
                # Read (bounded, timed) before deciding: only the body says
                # whether the key is dead or the request was refused.
                self.relay = ScrubbingRelay(
                    self, response.headers,
                    lambda body, outcome: self._judged_401(response, body, outcome),
                )
                response.deliverBody(self.relay)
                return
            if code in _FAILOVER:
                if code == 429:
                    self.resource.keys.default.rest(
                        self.key_index, _retry_after(response.headers)
                    )
                if self._fail_over(code):
                    discard(response)
                    return
        self._answer_head(response)
        request = self.request
        if self.mask is not None and code >= 400:
            self.relay = ScrubbingRelay(self, response.headers, self._send_whole)
            response.deliverBody(self.relay)
            return
        content_type = request.responseHeaders.getRawHeaders(b"content-type") or [b""]
        reframed = self.admission.answer_started(
            code, content_type[0][:17].lower() == b"text/event-stream"
        )
        length = response_length(response)
        if reframed:
            request.responseHeaders.removeHeader(b"content-length")
        elif length is not None and request.method != b"HEAD":
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % length])
        if self.tap is not None:
            self.tap.response(code, request.responseHeaders)
        self.relay = Relay(self)
        response.deliverBody(self.relay)
        # Copied to the client's answer, and the request sent: nothing reads
        # either again, though Twisted keeps both as long as the answer.
        release_upstream_headers(response)

    def _fail_over(self, code: int) -> bool:
        """Try the next default key, if there is one; True if it is tried."""
        if not self.key_order:
            return False
        assert self.key_index is not None
        if self.resource.metrics is not None:
            self.resource.metrics.failover(code)
        self.log.info(
            "upstream {code} with {key}; trying the next default key",
            code=code, key=self.resource.keys.default.label(self.key_index),
        )
        self._attempt()
        return True

    def _judged_401(self, response: IResponse, body: Optional[bytes], outcome: str) -> None:
        """A default key's 401, read whole: revoke the key only if the body
        says the key itself is dead; otherwise the 401 is this request's."""
        self.relay = None
        if self.client_gone or self.done:
            return
        assert self.key_index is not None
        if body is not None and key_refused(body):
            keys = self.resource.keys.default
            keys.revoke(self.key_index)
            self.log.warn(
                "the upstream refused default key {key}; it leaves the rotation",
                key=keys.label(self.key_index),
            )
            if self._fail_over(401):
                return
        self._answer_head(response)
        self._send_whole(body, outcome)

    def _answer_head(self, response: IResponse) -> None:
        """Give the client the upstream's status and headers (not sent yet)."""
        code = response.code
        metrics = self.resource.metrics
        if metrics is not None:
            metrics.first_byte(self.resource.reactor.seconds() - self.sent_upstream)
        self.status = code
        request = self.request
        # The standard reason phrase, never the upstream's (it could carry
        # anything, a key included).
        request.setResponseCode(code)
        # Drop what twisted.web.server.Request.process set (Server, Date):
        # the answer's headers are the upstream's.
        date = request.responseHeaders.getRawHeaders(b"date")
        request.responseHeaders = Headers()
        relay_response_headers(response.headers, request.responseHeaders)
        if date and not request.responseHeaders.hasHeader(b"date"):
            request.responseHeaders.setRawHeaders(b"date", date)  # RFC 9110 §6.6.1
        self._hook_headers()
        if self.mask is not None:
            _mask_headers(request.responseHeaders, self.mask)

    def _send_whole(self, body: Optional[bytes], outcome: str) -> None:
        """Send an error answer read whole, masked; an unreadable one
        (None) is replaced by the proxy's own error, with the same status."""
        self.relay = None
        if self.client_gone or self.done:
            return
        request = self.request
        headers = request.responseHeaders
        if body is None:
            if outcome == "idle_timeout":
                message = "The upstream went silent in the middle of its error answer."
            else:
                message = "The upstream's error answer was unreadable."
            body = error_body(502, "upstream_error", message)
            headers.setRawHeaders(b"content-type", [b"application/json"])
        headers.removeHeader(b"content-encoding")
        assert self.mask is not None
        body = scrub(self.mask.feed(body) + self.mask.flush())
        headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
        if self.tap is not None:
            self.tap.response(request.code, headers)
            self.tap.data(body)
        if request.method != b"HEAD":
            request.write(body)
            self.sent += len(body)
        self.end(outcome)
        request.finish()

    def _no_head(self, failure: Failure) -> None:
        self.pending = None
        self._stop_head_timer()
        if self.client_gone:
            return
        if self.timed_out:
            self._fail(504, "upstream_timeout", "The upstream did not answer in time.")
            return
        if failure.check(error.TimeoutError, error.TCPTimedOutError):
            self._fail(504, "upstream_timeout", "Connecting to the upstream timed out.")
            return
        refusal = head_refusal(failure)
        if refusal is not None:
            self.log.warn(
                "refused the upstream's answer for {path}: {why}",
                path=self.path.decode("latin-1"), why=str(refusal),
            )
            self._fail(502, refusal.code, "The upstream's answer head was refused.")
            return
        self.log.warn(
            "upstream unreachable for {path}: {why}",
            path=self.path.decode("latin-1"), why=failure.getErrorMessage(),
        )
        self._fail(502, "upstream_unreachable", "The upstream could not be reached.")

    def _fail(self, status: int, code: str, message: str) -> None:
        """Answer with the proxy's own error, the upstream having given none."""
        if self.done or self.client_gone:
            return
        self.status = status
        if self.tap is not None:
            self.tap.response(status, Headers())
        self.end("proxy_error")  # first: the access line needs its timings
        self._hook_headers()
        send_error(self.request, status, code, message)

    def _hook_headers(self) -> None:
        """The answer headers the policies (``x-ratelimit-*``) and the cache
        (``x-cache``) add, upstream's answer or the proxy's own error."""
        headers = self.request.responseHeaders
        if self.cache_lookup is not None:
            headers.setRawHeaders(b"x-cache", [self.cache_lookup.result.encode("ascii")])
        # Numbers and durations (no line break): set without Twisted's
        # per-header canonicalising and sanitising, the same fields.
        set_header_values(headers, self.admission.headers)

    # ------------------------------------------------------------ end

    def stop_clock(self) -> float:
        """The upstream's time for this exchange, taken once (the first
        call), and set on the request for its access line."""
        if self.upstream_elapsed is None:
            self.upstream_elapsed = self.resource.reactor.seconds() - self.sent_upstream
            if not self.cache_hit:
                state_of(self.request).upstream_seconds = self.upstream_elapsed
        return self.upstream_elapsed

    def end(self, outcome: str) -> None:
        if self.done:
            return
        self.done = True
        res = self.resource
        if self.holds_slot:
            self.holds_slot = False
            res.upstream_slots.release()
        elapsed = self.stop_clock()
        if res.metrics is not None:
            res.metrics.ended(
                self.status, self.decision.label, outcome, elapsed, self.sent,
                upstream=not self.cache_hit,
            )
        # A hit spent no upstream tokens: its reservation is released.
        self.admission.finish(
            outcome == "complete" and 200 <= self.status < 400 and not self.cache_hit
        )
        if self.tap is not None:
            tap, self.tap = self.tap, None
            try:
                tap.end(outcome)
            except Exception:
                self.log.failure("chat recorder failed")
        # Last: a drain waiting on this exchange may go on to close the
        # recorders and the ledger, which must have its record by then.
        res._closed(self)

    def _stop_upstream(self) -> None:
        """Cancel the upstream request, or stop its body if it is relaying."""
        if self.pending is not None:
            self._stop_head_timer()
            self.pending.cancel()
        if self.relay is not None:
            self.relay.stop()

    def abort(self) -> None:
        """Cut the exchange now (shutdown grace period over): recorded with
        the outcome ``shutdown``, before the cut connection can say
        ``client_left``."""
        if self.done:
            return
        self._stop_upstream()
        self.end("shutdown")
        transport = client_transport(self.request.channel)
        if transport is not None:
            transport.abortConnection()

    def _finished(self, result: object) -> None:
        """The client connection finished or was lost."""
        if not isinstance(result, Failure):
            return
        self.client_gone = True
        self._stop_upstream()
        self.end("client_left")


@implementer(IExchangeTap)
class _BothTaps:
    """Feeds one answer to two taps (the chat record, the cache)."""

    __slots__ = ("first", "second",)

    def __init__(self, first: IExchangeTap, second: IExchangeTap) -> None:
        self.first = first
        self.second = second

    def response(self, status: int, headers: Headers) -> None:
        self.first.response(status, headers)
        self.second.response(status, headers)

    def data(self, chunk: bytes) -> None:
        self.first.data(chunk)
        self.second.data(chunk)

    def end(self, outcome: str) -> None:
        try:
            self.first.end(outcome)
        finally:
            self.second.end(outcome)


class _KeptOpen:
    """A file whose ``close`` is left to its owner (the Request).

    ``FileBodyProducer`` closes the file it has read to the end.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        pass


def _mask_headers(headers: Headers, mask: SecretMask) -> None:
    """Mask our keys, and anything shaped like a key, in answer headers:
    values and names (a masked name keeps its length and stays a token)."""
    pairs = list(headers.getAllRawHeaders())
    everything = b"\n".join(b"\n".join((name, *values)) for name, values in pairs)
    if not (mask.touches(everything) or looks_keyed(everything)):
        return  # the usual case: one search instead of one per header
    for name, values in pairs:
        masked_name = scrub(mask.feed(name) + mask.flush())
        masked = [scrub(mask.feed(v) + mask.flush()) for v in values]
        if masked_name != name:
            headers.removeHeader(name)
            headers.setRawHeaders(masked_name, masked)
        elif masked != list(values):
            headers.setRawHeaders(name, masked)


def _retry_after(headers: Headers) -> float:
    for value in headers.getRawHeaders(b"retry-after") or ():
        try:
            return max(1.0, min(float(value), 3600.0))
        except ValueError:
            pass
    return _DEFAULT_REST
