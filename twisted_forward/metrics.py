"""
Prometheus metrics: what the proxy did, for dashboards and alerts.

Everything lives in one :class:`Metrics` object with its own registry (so
tests and several proxies in one process do not share counters).  Labels
hold route prefixes, statuses, outcome names and key *labels* only: never a
key, never a client address.  Exchanges are counted once, when they end, not
per chunk.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from .admin.auth import AdminAuth
from .errors import write_error

if TYPE_CHECKING:
    from .config import Config
    from .keys import DefaultKeys

#: Set by the supervisor for its workers (``--workers``): the folder where
#: prometheus_client's multiprocess mode keeps every worker's series, so a
#: scrape of any worker answers for all of them.  prometheus_client reads
#: it when first imported.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> Optional[str]:
    """The multiprocess folder this process writes its series to, or None."""
    return os.environ.get(MULTIPROC_ENV) or None


_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)


class Metrics:
    """The proxy's counters, histograms and gauges."""

    def for_route(self, route: str) -> RouteMetrics:
        """The series of one route."""
        return RouteMetrics(self, route)

    def watch_keys(self, keys: "DefaultKeys") -> None:
        """Report the default keys' states (never the keys) at each scrape;
        a new watch (after a reload) replaces the previous one."""
        self.watch("keys", _KeyStates(keys))

    def watch_chat_records(self, counts: Callable[[], dict[str, int]]) -> None:
        """Report the chat record writer's waiting, failed and dropped
        records at each scrape (``counts`` as :meth:`ChatRecorder.counts`);
        a new watch (after a reload) replaces the previous one."""
        self.watch("chat_records", _ChatRecordCounts(counts))

    def watch(self, name: str, collector: Any) -> None:
        """Register ``collector`` under ``name``, replacing the previous one
        of that name (a reload builds its collectors again)."""
        watches: dict[str, Any] = self.__dict__.setdefault("_watches", {})
        previous = watches.pop(name, None)
        if previous is not None:
            self.registry.unregister(previous)
        self.registry.register(collector)
        watches[name] = collector

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "openai_forward_requests",
            "Forwarded exchanges by route, upstream (or proxy) status, key label and outcome.",
            ["route", "status", "key", "outcome"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "openai_forward_upstream_seconds",
            "Time from sending a request upstream to the end of its answer.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_byte_seconds = Histogram(
            "openai_forward_upstream_first_byte_seconds",
            "Time from sending a request upstream to its response head.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.open_exchanges = Gauge(
            "openai_forward_open_exchanges",
            "Exchanges in flight (open streams included).",
            ["route"],
            registry=r,
            # With --workers: the sum over the workers alive.
            multiprocess_mode="livesum",
        )
        self.relayed_bytes = Counter(
            "openai_forward_relayed_bytes",
            "Answer body bytes relayed to clients.",
            ["route"],
            registry=r,
        )
        self.failovers = Counter(
            "openai_forward_key_failovers",
            "Requests retried with another default key, by the status that caused it.",
            ["route", "status"],
            registry=r,
        )
        self.refusals = Counter(
            "openai_forward_refusals",
            "Requests the proxy answered itself with an error, by reason (error code).",
            ["reason"],
            registry=r,
        )
        self.policy_refusals = Counter(
            "openai_forward_policy_refusals",
            "Requests refused by a key policy, by key label and reason "
            "(model_not_allowed, rate_limit_exceeded, insufficient_quota, limits_unavailable).",
            ["key", "reason"],
            registry=r,
        )
        self.policy_store_failures = Counter(
            "openai_forward_policy_store_failures",
            "Requests for which the policy store did not answer (served or refused "
            "as LIMITS_ON_STORE_FAILURE says).",
            registry=r,
        )


class RouteMetrics:
    """One route's view of the metrics, with its labelled series looked up
    once: an exchange touches several series, and prometheus_client's
    ``labels()`` validates and locks on every call."""

    def __init__(self, metrics: "Metrics", route: str) -> None:
        self._metrics = metrics
        self._route = route
        self._open = metrics.open_exchanges.labels(route)
        self._first_byte = metrics.first_byte_seconds.labels(route)
        self._upstream = metrics.upstream_seconds.labels(route)
        self._bytes = metrics.relayed_bytes.labels(route)
        self._requests: dict[tuple[str, str, str], Any] = {}

    def started(self) -> None:
        """An exchange began."""
        self._open.inc()

    def first_byte(self, seconds: float) -> None:
        """The upstream's response head arrived ``seconds`` after sending."""
        self._first_byte.observe(seconds)

    def failover(self, status: int) -> None:
        """A default key got ``status``; the next one is tried."""
        self._metrics.failovers.labels(self._route, str(status)).inc()

    def ended(
        self, status: int, key: str, outcome: str, seconds: float, sent: int,
        upstream: bool = True,
    ) -> None:
        """An exchange ended; ``status`` 0 when no answer head was given;
        ``upstream`` False when no upstream was asked (a cache hit)."""
        self._open.dec()
        labels = (str(status or "none"), key, outcome)
        counter = self._requests.get(labels)
        if counter is None:
            counter = self._requests[labels] = self._metrics.requests.labels(
                self._route, *labels
            )
        counter.inc()
        if status and upstream:
            self._upstream.observe(seconds)
        if sent:
            self._bytes.inc(sent)


class _KeyStates:
    """Collects the default keys' states when scraped."""

    def __init__(self, keys: "DefaultKeys") -> None:
        self._keys = keys

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "openai_forward_default_keys",
            "Default keys by state: active, resting (after a 429), revoked (after a 401).",
            labels=["state"],
        )
        for state, count in self._keys.states().items():
            family.add_metric([state], count)
        yield family


class _ChatRecordCounts:
    """Collects the chat record writer's counts when scraped."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Any]:
        counts = self._counts()
        yield GaugeMetricFamily(
            "openai_forward_chat_records_pending",
            "Chat records waiting to be written (a full or failing disk holds them).",
            value=counts.get("pending", 0),
        )
        yield CounterMetricFamily(
            "openai_forward_chat_record_write_failures",
            "Failed writes of chat records (each retry of a full disk counts).",
            value=counts.get("write_failures", 0),
        )
        yield CounterMetricFamily(
            "openai_forward_chat_records_dropped",
            "Chat records never written: more waited than the writer holds, or the "
            "disk was still failing at shutdown.",
            value=counts.get("dropped", 0),
        )


class AllWorkers:
    """What a scrape of one worker reports under ``--workers``: every
    worker's counters, histograms and gauges, summed from the multiprocess
    folder, and this worker's scrape-time collectors (default keys' states,
    chat record writer, ledger), which do not live in that folder."""

    def __init__(self, metrics: Metrics, path: str) -> None:
        self._metrics = metrics
        self._files = MultiProcessCollector(None, path)

    def collect(self) -> Iterator[Any]:
        yield from self._files.collect()
        watches: dict[str, Any] = self._metrics.__dict__.get("_watches", {})
        for collector in list(watches.values()):
            yield from collector.collect()


class WorkersFolder:
    """What the supervisor serves on METRICS_PORT under ``--workers``: the
    sums over its workers' multiprocess folder, read at each scrape.

    :param folder: gives the folder (made when the supervisor starts), or
        None while there is none.
    """

    def __init__(self, folder: Callable[[], Optional[str]]) -> None:
        self._folder = folder

    def collect(self) -> Iterator[Any]:
        path = self._folder()
        if path is not None and os.path.isdir(path):
            yield from MultiProcessCollector(None, path).collect()


class MetricsResource(Resource):
    """Serves the registry in Prometheus' text format.

    :param admin_key: when set, a scrape must carry it as its Bearer
        credential (the metrics on the proxy's public port); None for an
        open scrape (METRICS_PORT, or METRICS=public).
    :param multiproc: the multiprocess folder of ``--workers`` (default: the
        one this process was started with), or None for this process alone.
    :param source: what to serve instead of ``metrics`` (the supervisor's
        :class:`WorkersFolder`).
    """

    isLeaf = True

    def __init__(
        self, metrics: Optional[Metrics], admin_key: Optional[str] = None,
        multiproc: Optional[str] = None, source: Any = None,
    ) -> None:
        super().__init__()
        self.metrics = metrics
        self._auth = AdminAuth(admin_key) if admin_key else None
        if source is None:
            assert metrics is not None
            path = multiproc if multiproc is not None else multiprocess_dir()
            source = AllWorkers(metrics, path) if path else metrics.registry
        self._source: Any = source

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        if self._auth is not None and not self._auth.allows(request):
            request.setHeader(b"www-authenticate", b'Bearer realm="twisted-forward metrics"')
            return write_error(
                request, 401, "invalid_admin_key",
                "The metrics on this port need the admin key as a Bearer token "
                "(or serve them on METRICS_PORT).",
            )
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._source)


class MetricsNotServed(Resource):
    """METRICS_PATH on the proxy's public port when the metrics are not
    served there: a 404 of the proxy's own, never forwarded upstream."""

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        return write_error(
            request, 404, "metrics_not_served",
            "The metrics are not served on this port (the operator can serve them on "
            "METRICS_PORT, here for the admin key with ADMIN_KEY, or here to all with "
            "METRICS=public).",
        )


def public_metrics(config: "Config", metrics: Metrics) -> Optional[IResource]:
    """What METRICS_PATH on the proxy's public port serves: the metrics
    (open with METRICS=public; for the admin key when ADMIN_KEY is set and
    METRICS_PORT is not), a 404 when they are served elsewhere or nowhere,
    or None (the path is forwarded like any other) with METRICS=false."""
    from .config import METRICS_OFF, METRICS_PUBLIC

    if config.metrics == METRICS_OFF:
        return None
    if config.metrics == METRICS_PUBLIC:
        return MetricsResource(metrics)
    if config.metrics_port is None and config.admin_key is not None:
        return MetricsResource(metrics, config.admin_key)
    return MetricsNotServed()
