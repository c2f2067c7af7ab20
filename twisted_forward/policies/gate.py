"""
The exchange's policy hook: admit a request or refuse it, then settle.

The exchange calls :meth:`IExchangePolicy.admit` once, after the key
decision and before anything goes upstream.  The answer is an
:class:`Admission`: a refusal to send instead (403 ``model_not_allowed``,
429 ``rate_limit_exceeded`` or ``insufficient_quota`` with Retry-After, 503
when the store is down and ``LIMITS_ON_STORE_FAILURE=closed``), or leave to
go on, with the ``x-ratelimit-*`` headers for the answer, maybe a body
asking for streamed usage, and the means to read the usage and settle.

A request of a key with no policy gets :data:`UNLIMITED` at once: no body
read, no store touched.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import IO, Callable, NamedTuple, Optional, Sequence
from urllib.parse import unquote

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from ..sharedjson import SharedParse
from .body import REWRITE_LIMIT, BodyFacts, read_facts, with_usage_requested
from .memory import MemoryStore
from .prices import MICRO, PriceTable
from .rules import KeyPolicy, Policies, Rate
from .store import (
    CONCURRENT,
    FIXED,
    MOVING,
    Bucket,
    BucketState,
    IImmediateStore,
    IPolicyStore,
    Settlement,
    StoreUnavailable,
    Verdict,
)
from .usage import Usage, UsageStripper, UsageTap
from .windows import day_window, fixed_window, month_window

#: Seconds a store gets to answer before the request is treated as if the
#: store were down (the stores bound their own waits; this is the backstop).
STORE_TIMEOUT = 5.0
#: At most one warning about a failing store in this many seconds (the
#: metric counts every request).
WARN_EVERY = 10.0
#: A parallel slot nobody settles frees itself after this long.
SLOT_LEASE = 3600.0

#: Makes a named tuple from a tuple of its fields without the Python-level
#: ``__new__`` a call of the class runs.
_new = tuple.__new__

#: Kinds of bucket, for refusals and headers.
_REQUESTS, _TOKENS, _QUOTA, _SLOTS = "requests", "tokens", "quota", "slots"


# A named tuple (immutable, made in a third of a frozen dataclass's time):
# one is made for every request of a gated route.
class RequestFacts(NamedTuple):
    """What the exchange knows of a request when it asks the policies.

    :ivar label: the key's non-secret label.
    :ivar level: the forward key's level (0 when none).
    :ivar substituted: a default key will be spent (forward key or keyless).
    :ivar method: the HTTP method.
    :ivar path: the path as the client sent it, route prefix included.
    :ivar content: the request body as Twisted keeps it (in memory or
        spooled to a file), or None.
    :ivar content_type: the request's Content-Type.
    :ivar reservation: a name for this request unique in every process.
    :ivar client_key: for a client's own key, a digest to count it by.
    :ivar shared: where the gate hands its parses of the request and the
        answer on to the exchange's other reader (the chat record); None
        when nothing else reads them.
    """

    label: str
    level: int
    substituted: bool
    method: bytes
    path: str
    content: Optional[IO[bytes]]
    content_type: bytes
    reservation: str
    client_key: str = ""
    shared: Optional[SharedParse] = None


@dataclass(frozen=True)
class Refusal:
    """An answer the proxy gives instead of forwarding."""

    status: int
    code: str
    message: str
    retry_after: Optional[int] = None


class IExchangePolicy(Interface):
    """The policy hook of the forwarding exchange."""

    def admit(facts: RequestFacts) -> "Deferred[Admission]":
        """Decide on one request; never errs (a broken store is a refusal
        or an open admission, as configured)."""

    def decide(facts: RequestFacts) -> "Admission | Deferred[Admission]":
        """:meth:`admit`, with the admission itself when it is known within
        the call (no policy applies, a refusal, a store that answers at
        once): no Deferred to make and fire for most requests."""


class Admission:
    """One admitted (or refused) request's policy state.

    The exchange reads :attr:`refusal`, :attr:`headers` and :attr:`body`;
    passes the answer's body through :meth:`answer_started`, :meth:`relay`
    and :meth:`relay_end`; and calls :meth:`finish` once, at its end.
    """

    log = Logger()

    def __init__(
        self,
        refusal: Optional[Refusal] = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: Optional[bytes] = None,
        strip_usage: bool = False,
        settle: Optional[Callable[[Optional[Usage], bool], None]] = None,
        count_usage: bool = False,
        shared: Optional[SharedParse] = None,
    ) -> None:
        self.refusal = refusal
        #: ``x-ratelimit-*`` (and Retry-After) headers for the answer.
        self.headers = tuple(headers)
        #: The body to send upstream instead of the client's, or None.
        self.body = body
        self._strip_usage = strip_usage
        self._settle = settle
        self._count_usage = count_usage
        #: The parses handed on to the chat record (None: none are).
        self.shared = shared
        self._tap: Optional[UsageTap] = None
        self._stripper: Optional[UsageStripper] = None
        self._finished = False

    def answer_started(self, status: int, streamed: bool) -> bool:
        """The answer's head arrived.  Returns True when its body will be
        changed (the caller then drops a Content-Length)."""
        if self._count_usage and 200 <= status < 300:
            self._tap = UsageTap(streamed, self.shared)
        if self._strip_usage and streamed and 200 <= status < 300:
            self._stripper = UsageStripper()
            return True
        return False

    def relay(self, data: bytes) -> bytes:
        """Read a piece of the answer; returns what the client gets of it."""
        if self._tap is not None:
            self._tap.feed(data)
        if self._stripper is not None:
            return self._stripper.feed(data)
        return data

    def relay_end(self) -> bytes:
        """The answer's body is over; returns what was held back."""
        return self._stripper.flush() if self._stripper is not None else b""

    def finish(self, complete: bool) -> None:
        """Settle (``complete``: the answer was whole) or release."""
        if self._finished:
            return
        self._finished = True
        if self._settle is None:
            return
        usage = self._tap.end() if (complete and self._tap is not None) else None
        try:
            self._settle(usage, complete)
        except Exception:
            self.log.failure("settling a policy reservation failed")


#: The admission of requests no policy applies to.
UNLIMITED = Admission()


def format_reset(seconds: float) -> str:
    """A duration as OpenAI writes it in ``x-ratelimit-reset-*``: ``"20ms"``,
    ``"17s"``, ``"6m0s"``, ``"1h2m3s"``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    whole = int(math.ceil(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


#: ``format_reset`` of whole seconds, as header bytes, by the seconds.
_RESETS: dict[int, bytes] = {}


def _reset_bytes(seconds: float) -> bytes:
    """:func:`format_reset` as bytes; from 1 s on it depends only on the
    whole seconds rounded up, so each is formatted once."""
    if seconds < 1:
        return format_reset(seconds).encode()
    whole = int(math.ceil(seconds))
    found = _RESETS.get(whole)
    if found is None:
        if len(_RESETS) >= 4096:
            _RESETS.clear()
        found = _RESETS[whole] = format_reset(seconds).encode()
    return found


@dataclass(eq=False)
class _Plan:
    """The buckets of one request and what each is for.

    A plan is the same for every request of one key and route with the
    same estimate while its fixed windows last (from :attr:`valid_from` to
    :attr:`valid_until`): the gate makes it once and reuses it; nothing
    changes it once made.
    """

    buckets: list[Bucket] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    #: Per bucket: how the real usage turns into its amount (None: fixed).
    measure: list[Optional[Callable[[Usage], int]]] = field(default_factory=list)
    #: The latest start and the earliest end of its fixed windows.
    valid_from: float = -math.inf
    valid_until: float = math.inf
    #: Which buckets the ``x-ratelimit-*`` headers are read from, in order:
    #: requests, tokens, token quotas (:func:`_rate_headers`).
    request_states: tuple[int, ...] = ()
    token_states: tuple[int, ...] = ()
    quota_states: tuple[int, ...] = ()
    #: The buckets a settlement touches, in order, each with how its real
    #: amount is measured (None: a parallel slot, given back whole).
    settles: tuple[tuple[Bucket, Optional[Callable[[Usage], int]]], ...] = ()
    #: The settlement of a request that ended before its answer was whole
    #: (everything given back), and of one whole but without a usage (its
    #: slots given back, its reservation standing), made once.
    release_all: tuple[Settlement, ...] = ()
    release_slots: tuple[Settlement, ...] = ()

    def add(self, bucket: Bucket, kind: str, measure: Optional[Callable[[Usage], int]] = None) -> None:
        self.buckets.append(bucket)
        self.kinds.append(kind)
        self.measure.append(measure)
        if bucket.kind == FIXED:
            self.valid_from = max(self.valid_from, bucket.start)
            self.valid_until = min(self.valid_until, bucket.end)

    def seal(self) -> "_Plan":
        """Work out what every request of this plan reads the same way."""
        kinds, buckets = self.kinds, self.buckets
        self.request_states = tuple(i for i, k in enumerate(kinds) if k == _REQUESTS)
        self.token_states = tuple(i for i, k in enumerate(kinds) if k == _TOKENS)
        self.quota_states = tuple(
            i for i, k in enumerate(kinds)
            if k == _QUOTA and buckets[i].id.rsplit("/", 1)[-1].startswith("tokens")
        )
        self.settles = tuple(
            (bucket, None if bucket.kind == CONCURRENT else measure)
            for bucket, measure in zip(buckets, self.measure)
            if bucket.kind == CONCURRENT or measure is not None
        )
        self.release_all = tuple(Settlement(bucket, 0) for bucket, _ in self.settles)
        self.release_slots = tuple(
            Settlement(bucket, 0) for bucket, measure in self.settles if measure is None
        )
        return self


#: Routes remembered per gate (label, level, path): beyond this many the
#: memory starts again (paths come from clients).
ROUTE_CACHE = 4096
#: Buckets remembered per gate; beyond this many the memory starts again.
BUCKET_CACHE = 4096
#: Plans remembered per gate; beyond this many the memory starts again (a
#: plan is keyed by its token estimate too, so keys whose requests differ in
#: size reuse few: kept small).
PLAN_CACHE = 256


# Compared and hashed by identity: a plan is remembered per route object.
@dataclass(frozen=True, eq=False)
class _Route:
    """What the rules say about one (label, substituted, level, path),
    worked out once: the key's policy, the route's rates, what the body
    must be read for, and the counters' owner."""

    policy: Optional[KeyPolicy]
    path: str
    rates: tuple[tuple[str, tuple[Rate, ...]], ...]
    unlimited: bool
    restricted: bool
    counts_tokens: bool
    rewrite_usage: bool


@implementer(IExchangePolicy)
class PolicyGate:
    """Applies :class:`~twisted_forward.policies.rules.Policies` to requests.

    :param store: where the counters live.
    :param prices: for the dollar quotas.
    :param on_store_failure: ``open`` (count in this process's memory, warn,
        count in a metric) or ``closed`` (503).
    :param refused: called with ``(label, reason)`` for each refusal, for
        the metrics.
    :param store_failed: called once per request served or refused because
        the store failed.
    """

    log = Logger()

    def __init__(
        self,
        policies: Policies,
        store: IPolicyStore,
        prices: PriceTable,
        reactor: IReactorTime,
        clock: Optional[Callable[[], float]] = None,
        on_store_failure: str = "closed",
        refused: Optional[Callable[[str, str], None]] = None,
        store_failed: Optional[Callable[[], None]] = None,
    ) -> None:
        self.policies = policies
        self.store = store  # (and whether it answers at once)
        self.prices = prices
        self.reactor = reactor
        self.clock = clock or reactor.seconds
        self.on_store_failure = on_store_failure
        self._refused = refused or (lambda label, reason: None)
        self._store_failed = store_failed or (lambda: None)
        #: Counts when the shared store fails and LIMITS_ON_STORE_FAILURE is open.
        self.local = MemoryStore()
        self._warned = -WARN_EVERY
        self._routes: dict[tuple[str, bool, int, str], _Route] = {}
        #: Buckets that are the same for every request of a window (a
        #: request count, a slot), made once per window.
        self._buckets: dict[tuple[str, str, int, int, float, float], Bucket] = {}
        #: Plans, per (route, owner, estimate, model), while their windows last.
        self._plans: dict[tuple[_Route, str, int, int, str], _Plan] = {}
        #: The calendar month holding the time last asked, and its span.
        self._month: tuple[float, float] = (0.0, 0.0)

    @property
    def store(self) -> IPolicyStore:
        """Where the counters live."""
        return self._store

    @store.setter
    def store(self, store: IPolicyStore) -> None:
        self._store = store
        #: The store answers within the call: no Deferred in between.
        self._immediate: Optional[IImmediateStore] = IImmediateStore(store, None)

    def _route(self, facts: RequestFacts) -> _Route:
        """The rules for this request's key and path, looked up once."""
        key = (facts.label, facts.substituted, facts.level, facts.path)
        route = self._routes.get(key)
        if route is not None:
            return route
        policies = self.policies
        policy = policies.policy_for(facts.label) if facts.substituted else None
        path = _normal_path(facts.path)
        rates = policies.request_rates(facts.level, path)
        level_models = policies.level_models.get(facts.level) if facts.level else None
        route = _Route(
            policy=policy,
            path=path,
            rates=rates,
            unlimited=policy is None and not rates and level_models is None,
            restricted=level_models is not None or (policy is not None and policy.models is not None),
            counts_tokens=policy is not None and policy.limits_tokens,
            # Chat and legacy completions take stream_options; the Responses
            # API reports usage in its last event anyway (and refuses it).
            rewrite_usage=path.endswith("/completions"),
        )
        if len(self._routes) >= ROUTE_CACHE:
            self._routes.clear()
        self._routes[key] = route
        return route

    def _bucket(self, id: str, kind: str, limit: int, amount: int, seconds: float,
                start: float = 0.0) -> Bucket:
        """A bucket, the same object for the same fields (most requests of
        a window draw the same request count and slot)."""
        key = (id, kind, limit, amount, seconds, start)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= BUCKET_CACHE:
                self._buckets.clear()
            bucket = self._buckets[key] = Bucket(id, kind, limit, amount, seconds, start)
        return bucket

    def _month_window(self, now: float) -> tuple[float, float]:
        start, length = self._month
        if not start <= now < start + length:
            start, length = self._month = month_window(now)
        return start, length

    # ------------------------------------------------------------ admit

    def admit(self, facts: RequestFacts) -> "Deferred[Admission]":
        decided = self.decide(facts)
        return decided if isinstance(decided, Deferred) else succeed(decided)

    def decide(self, facts: RequestFacts) -> "Admission | Deferred[Admission]":
        route = self._route(facts)
        if route.unlimited:
            return UNLIMITED
        policy = route.policy
        counts_tokens = route.counts_tokens
        body = (
            read_facts(facts.content, facts.content_type, route.path, facts.shared)
            if (route.restricted or counts_tokens)
            else _NO_BODY
        )
        if route.restricted:
            refusal = self._check_model(facts, policy, body)
            if refusal is not None:
                self._refused(facts.label, refusal.code)
                return Admission(refusal)
        now = self.clock()
        owner = facts.label if facts.substituted else f"client:{facts.client_key}"
        prompt, output = body.estimate()
        model = body.model or ""
        key = (route, owner, prompt, output, model)
        plan = self._plans.get(key)
        if plan is None or not plan.valid_from <= now < plan.valid_until:
            plan = self._plan(owner, policy, route.rates, body, now).seal()
            if len(self._plans) >= PLAN_CACHE:
                self._plans.clear()
            self._plans[key] = plan
        if not plan.buckets:
            return UNLIMITED
        store = self.store
        immediate = self._immediate
        if immediate is not None:
            verdict = immediate.reserve_now(facts.reservation, plan.buckets, now)
            return self._verdict(verdict, facts, plan, body, route, store)
        d = store.reserve(facts.reservation, plan.buckets, now)
        if not d.called:
            d.addTimeout(STORE_TIMEOUT, self.reactor)
        admitted: Deferred[Admission] = d.addCallback(
            self._verdict, facts, plan, body, route, store
        )
        return admitted.addErrback(self._store_down, facts, plan, body, route)

    def _check_model(
        self, facts: RequestFacts, policy: Optional[KeyPolicy], body: BodyFacts
    ) -> Optional[Refusal]:
        if body.unreadable:
            return Refusal(
                400, "invalid_json",
                "The request body could not be read as one JSON object with one 'model'.",
            )
        model = body.model
        if model is None:
            return None  # a request naming no model (a list, a file upload) spends none
        if not self.policies.level_allows(facts.level, model) or (
            policy is not None and not policy.allows(model)
        ):
            shown = model if len(model) <= 100 else model[:100] + "…"
            return Refusal(
                403, "model_not_allowed",
                f"The model '{shown}' is not allowed for this key.",
            )
        return None

    def _plan(
        self,
        owner: str,
        policy: Optional[KeyPolicy],
        rates: Sequence[tuple[str, Sequence[Rate]]],
        body: BodyFacts,
        now: float,
    ) -> _Plan:
        moving = self.policies.moving
        plan = _Plan()
        bucket = self._bucket

        def window(id: str, limit: int, amount: int, seconds: float) -> Bucket:
            amount = min(amount, limit)
            if moving:
                return bucket(id, MOVING, limit, amount, seconds)
            start, length = fixed_window(now, seconds)
            return bucket(id, FIXED, limit, amount, length, start)

        for route, route_rates in rates:
            for rate in route_rates:
                plan.add(
                    window(f"{owner}/req{route}/{rate.amount}/{rate.seconds:g}",
                           rate.amount, 1, rate.seconds),
                    _REQUESTS,
                )
        if policy is None:
            return plan
        prompt, output = body.estimate()
        tokens = prompt + output
        if policy.rpm is not None:
            plan.add(window(f"{owner}/rpm", policy.rpm, 1, 60.0), _REQUESTS)
        if policy.tpm is not None:
            plan.add(window(f"{owner}/tpm", policy.tpm, tokens, 60.0), _TOKENS, _tokens)
        if policy.max_parallel is not None:
            plan.add(bucket(f"{owner}/parallel", CONCURRENT, policy.max_parallel, 1, SLOT_LEASE),
                     _SLOTS)
        for name, limit, period in (
            ("tokens_per_day", policy.tokens_per_day, day_window),
            ("tokens_per_month", policy.tokens_per_month, self._month_window),
        ):
            if limit is not None:
                start, length = period(now)
                plan.add(Bucket(f"{owner}/{name}", FIXED, limit, min(tokens, limit), length, start),
                         _QUOTA, _tokens)
        model = body.model or ""
        for name, dollars, period in (
            ("usd_per_day", policy.usd_per_day, day_window),
            ("usd_per_month", policy.usd_per_month, self._month_window),
        ):
            if dollars is not None:
                limit = int(round(dollars * MICRO))
                estimate = int(math.ceil(self.prices.cost_usd(model, prompt, output) * MICRO))
                start, length = period(now)
                plan.add(
                    Bucket(f"{owner}/{name}", FIXED, limit, min(estimate, limit), length, start),
                    _QUOTA, self._dollars(model),
                )
        return plan

    def _dollars(self, model: str) -> Callable[[Usage], int]:
        def measure(usage: Usage) -> int:
            cost = self.prices.cost_usd(model, usage.prompt, usage.completion, usage.cached)
            return int(math.ceil(cost * MICRO))

        return measure

    # ------------------------------------------------------------ verdicts

    def _verdict(
        self,
        verdict: Verdict,
        facts: RequestFacts,
        plan: _Plan,
        body: BodyFacts,
        route: _Route,
        store: IPolicyStore,
    ) -> Admission:
        headers = _rate_headers(plan, verdict.states)
        if not verdict.granted:
            assert verdict.refused is not None
            kind = plan.kinds[verdict.refused]
            retry = max(1, int(math.ceil(verdict.retry_after)))
            headers.append((b"retry-after", b"%d" % retry))
            if kind == _QUOTA:
                # The official SDKs honour this before their own retry
                # rules: retrying a spent quota only adds load.
                headers.append((b"x-should-retry", b"false"))
                refusal = Refusal(
                    429, "insufficient_quota",
                    "This key's quota for the period is spent; it resets in "
                    f"{format_reset(verdict.retry_after)}.",
                    retry,
                )
            else:
                what = {
                    _REQUESTS: "requests", _TOKENS: "tokens", _SLOTS: "requests in flight",
                }[kind]
                refusal = Refusal(
                    429, "rate_limit_exceeded",
                    f"Rate limit reached for this key ({what}); retry in "
                    f"{format_reset(verdict.retry_after)}.",
                    retry,
                )
            self._refused(facts.label, refusal.code)
            return Admission(refusal, headers)
        return self._admitted(facts, plan, body, route, store, headers)

    def _admitted(
        self,
        facts: RequestFacts,
        plan: _Plan,
        body: BodyFacts,
        route: _Route,
        store: IPolicyStore,
        headers: list[tuple[bytes, bytes]],
    ) -> Admission:
        rewritten = None
        strip = False
        counts_tokens = route.counts_tokens
        if (
            counts_tokens
            and body.stream
            and not body.include_usage
            and facts.content is not None
            and route.rewrite_usage
        ):
            if body.size <= REWRITE_LIMIT:
                facts.content.seek(0)
                rewritten = with_usage_requested(facts.content.read(), body)
                facts.content.seek(0)
                strip = rewritten is not None

        # The gate's own store was adapted once, when it was set.
        immediate: Optional[IImmediateStore] = (
            self._immediate if store is self._store else IImmediateStore(store, None)
        )

        def settle(usage: Optional[Usage], complete: bool) -> None:
            settlements: Sequence[Settlement]
            if usage is not None:
                tokens = usage.prompt + usage.completion
                settlements = [
                    # A parallel slot is given back whole; tokens (most
                    # measures) are worked out once.
                    _new(Settlement, (
                        bucket,
                        0 if measure is None else tokens if measure is _tokens else measure(usage),
                    ))
                    for bucket, measure in plan.settles
                ]
            elif not complete:
                settlements = plan.release_all
            else:
                # Complete without usage: the reservation stands.
                settlements = plan.release_slots
            if not settlements:
                return
            if immediate is not None:
                immediate.settle_now(facts.reservation, settlements, self.clock())
                return
            d = store.settle(facts.reservation, settlements, self.clock())
            if not d.called:
                d.addTimeout(STORE_TIMEOUT, self.reactor)
            d.addErrback(self._settle_failed)

        return Admission(
            None, headers, rewritten, strip, settle, count_usage=counts_tokens,
            shared=facts.shared,
        )

    def _settle_failed(self, failure: Failure) -> None:
        self.log.warn("settling with the policy store failed: {why}", why=failure.getErrorMessage())

    def _store_down(
        self,
        failure: Failure,
        facts: RequestFacts,
        plan: _Plan,
        body: BodyFacts,
        route: _Route,
    ) -> Admission:
        self._store_failed()
        why = failure.type.__name__
        now = self.clock()
        loud = now - self._warned >= WARN_EVERY
        if loud:
            self._warned = now
        if self.on_store_failure == "closed":
            if loud:
                self.log.warn("policy store unavailable ({why}); refusing (closed)", why=why)
            self._refused(facts.label, "limits_unavailable")
            return Admission(Refusal(
                503, "limits_unavailable",
                "The proxy cannot check this key's limits right now; retry later.", 5,
            ), [(b"retry-after", b"5")])
        if loud:
            self.log.warn(
                "policy store unavailable ({why}); counting in this process only (open)", why=why
            )
        verdict = self.local.reserve_now(facts.reservation, plan.buckets, self.clock())
        return self._verdict(verdict, facts, plan, body, route, self.local)


#: The body facts of a request whose body no rule reads.
_NO_BODY = BodyFacts()


def _tokens(usage: Usage) -> int:
    return usage.total


def _tightest(best: BucketState, state: BucketState) -> BucketState:
    """The state with the least remaining (then the latest reset); the
    first one on a tie."""
    if (state.remaining, -state.reset) < (best.remaining, -best.reset):
        return state
    return best


def _rate_headers(plan: _Plan, states: Sequence[BucketState]) -> list[tuple[bytes, bytes]]:
    """OpenAI's ``x-ratelimit-*`` headers from the tightest request and
    token buckets (token quotas stand in for tokens when no per-minute
    token bucket applies)."""
    headers: list[tuple[bytes, bytes]] = []
    for names, indices in ((_REQUEST_HEADERS, plan.request_states),
                           (_TOKEN_HEADERS, plan.token_states or plan.quota_states)):
        if not indices:
            continue
        tightest = states[indices[0]]
        if len(indices) > 1:
            for i in indices[1:]:
                tightest = _tightest(tightest, states[i])
        limit, remaining, reset = tightest
        headers += (
            (names[0], b"%d" % limit), (names[1], b"%d" % remaining), (names[2], _reset_bytes(reset))
        )
    return headers


_REQUEST_HEADERS = (
    b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests",
)
_TOKEN_HEADERS = (
    b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens",
)


def _normal_path(path: str) -> str:
    """One spelling of a path: percent-decoded, no repeated or trailing slashes."""
    path = unquote(path)
    while "//" in path:
        path = path.replace("//", "/")
    return path.rstrip("/") or "/"


def client_digest(credential: bytes) -> str:
    """A client's own key, as a counter's name: a digest, never the key."""
    return hashlib.sha256(credential).hexdigest()[:16]


__all__ = [
    "Admission", "IExchangePolicy", "PolicyGate", "Refusal", "RequestFacts", "UNLIMITED",
    "StoreUnavailable", "client_digest", "format_reset",
]
