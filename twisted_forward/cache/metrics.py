"""
The cache's Prometheus series, on the proxy's registry.

Labels are route prefixes, results and operation names: never a key, a
partition or a client.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class CacheMetrics:
    """Hits, misses, bypasses, bytes, evictions and store failures."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.lookups = Counter(
            "openai_forward_cache_lookups",
            "Requests by what the cache did: hit, miss or bypass.",
            ["route", "result"],
            registry=registry,
        )
        self.bytes = Counter(
            "openai_forward_cache_bytes",
            "Answer bytes stored in the cache (stored) and served from it (served).",
            ["direction"],
            registry=registry,
        )
        self.evictions = Counter(
            "openai_forward_cache_evictions",
            "Entries dropped to keep the cache within its size bound.",
            registry=registry,
        )
        self.errors = Counter(
            "openai_forward_cache_errors",
            "Cache store operations that failed or timed out (each one a miss "
            "or an answer not stored), and entries found damaged.",
            ["op"],
            registry=registry,
        )
        self.not_stored = Counter(
            "openai_forward_cache_not_stored",
            "Missed answers not stored, by reason (status, too_large, incomplete, encoding).",
            ["reason"],
            registry=registry,
        )
        self.size = Gauge(
            "openai_forward_cache_size_bytes",
            "Bytes held by the in-memory cache store.",
            registry=registry,
            multiprocess_mode="livesum",
        )

    def evicted(self, count: int = 1) -> None:
        """A store dropped ``count`` entries for room."""
        if count:
            self.evictions.inc(count)
