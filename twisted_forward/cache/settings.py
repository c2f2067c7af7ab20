"""
The cache's settings: openai-forward 0.8.1's names with their meaning, and
the few this cache adds (TTL, size bounds, partitioning, replay pace).

openai-forward 0.8.1 reads ``CACHE_OPENAI`` / ``CACHE_GENERAL`` (off by
default), ``CACHE_BACKEND`` (``MEMORY`` by default, any case),
``CACHE_ROOT_PATH_OR_URL`` (``.``), ``CACHE_ROUTES`` (a JSON list of paths
under the route prefix) and ``DEFAULT_REQUEST_CACHING_VALUE`` (false: a
request without a ``caching`` field is not cached).  Its LevelDB backend is
refused here with one line naming the alternatives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

#: The backends this cache has.
BACKENDS = ("memory", "lmdb", "redis")

#: Routes cached when CACHE_ROUTES is not set.
DEFAULT_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@dataclass(frozen=True)
class CacheSettings:
    """The cache's validated settings.

    :ivar openai: cache on ``openai`` routes (CACHE_OPENAI).
    :ivar general: cache on ``general`` routes (CACHE_GENERAL).
    :ivar routes: paths under a route prefix whose answers may be cached.
    :ivar backend: ``memory``, ``lmdb`` or ``redis``.
    :ivar root: the LMDB directory's parent, or a Redis URL.
    :ivar default_caching: whether a request with no ``caching`` field is
        cached (DEFAULT_REQUEST_CACHING_VALUE).
    :ivar ttl: seconds an answer is served from the cache.
    :ivar max_bytes: the store's size bound in bytes.
    :ivar max_entry_bytes: the largest answer stored.
    :ivar max_request_body: larger request bodies are not examined (bypass).
    :ivar shared: one partition for every credential (opt-in).
    :ivar nondeterministic: also cache ``n > 1``, ``temperature > 0``
        without ``seed``, and requests with tools.
    :ivar replay_interval: seconds between replayed SSE events (0: at once).
    :ivar timeout: seconds a store operation may take before it is a miss.
    :ivar redis_url: the Redis URL for the ``redis`` backend.
    """

    openai: bool = False
    general: bool = False
    routes: tuple[str, ...] = DEFAULT_ROUTES
    backend: str = "memory"
    root: str = "."
    default_caching: bool = False
    ttl: float = 7 * 24 * 3600.0
    max_bytes: int = 128 * 1024 * 1024
    max_entry_bytes: int = 8 * 1024 * 1024
    max_request_body: int = 1024 * 1024
    shared: bool = False
    nondeterministic: bool = False
    replay_interval: float = 0.0
    timeout: float = 2.0
    redis_url: Optional[str] = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        """Whether any route is cached."""
        return self.openai or self.general

    def on(self, kind: str) -> bool:
        """Whether routes of ``kind`` (``openai``/``general``) are cached."""
        return self.openai if kind == "openai" else self.general


def parse_backend(value: str) -> str:
    """CACHE_BACKEND: ``MEMORY``, ``LMDB`` or ``REDIS``, any case."""
    name = value.strip().lower()
    if name == "leveldb":
        raise ValueError(
            "LevelDB is not supported; use MEMORY, LMDB (one machine, survives "
            "restarts) or REDIS (shared by several instances)"
        )
    if name not in BACKENDS:
        raise ValueError(f"{value!r} is not one of MEMORY, LMDB, REDIS")
    return name


def parse_routes(value: str) -> tuple[str, ...]:
    """CACHE_ROUTES: a JSON list of paths (openai-forward's form), or the
    paths space- or comma-separated."""
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError("must be a JSON list of path strings")
    else:
        items = [i for i in text.replace(",", " ").split() if i]
    routes = []
    for item in items:
        path = "/" + item.strip().strip("/")
        if path == "/" or any(c in path for c in " ?#"):
            raise ValueError(f"{item!r} is not a path like /v1/chat/completions")
        routes.append(path)
    return tuple(dict.fromkeys(routes))


def parse_interval(value: str) -> float:
    """A number of seconds, zero allowed."""
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number of seconds") from None
    if not 0 <= seconds <= 60:
        raise ValueError(f"{value!r} must be between 0 and 60 seconds")
    return seconds


def parse_redis_url(value: str) -> str:
    """A ``redis://``, ``rediss://`` or ``unix://`` URL."""
    from ..redis_link import check_redis_url

    return check_redis_url(value)


def cache_settings(parsed: Mapping[str, object]) -> CacheSettings:
    """Build the settings from parsed values keyed by environment name.

    :raises ValueError: for a combination that cannot work; the text starts
        with the setting's name.
    """
    fields = {
        "CACHE_OPENAI": "openai",
        "CACHE_GENERAL": "general",
        "CACHE_ROUTES": "routes",
        "CACHE_BACKEND": "backend",
        "CACHE_ROOT_PATH_OR_URL": "root",
        "DEFAULT_REQUEST_CACHING_VALUE": "default_caching",
        "CACHE_TTL": "ttl",
        "CACHE_MAX_BYTES": "max_bytes",
        "CACHE_MAX_ENTRY_BYTES": "max_entry_bytes",
        "CACHE_MAX_REQUEST_BODY": "max_request_body",
        "CACHE_SHARED": "shared",
        "CACHE_NONDETERMINISTIC": "nondeterministic",
        "CACHE_REPLAY_INTERVAL": "replay_interval",
        "CACHE_TIMEOUT": "timeout",
    }
    # Each value as its setting's parser made it (typed in its SETTINGS row).
    kwargs: dict[str, Any] = {attr: parsed[env] for env, attr in fields.items() if env in parsed}
    settings = CacheSettings(**kwargs)
    if settings.max_entry_bytes > settings.max_bytes:
        raise ValueError(
            "CACHE_MAX_ENTRY_BYTES (--cache-max-entry-bytes): must not exceed CACHE_MAX_BYTES"
        )
    if settings.backend == "redis" and settings.enabled:
        # openai-forward kept a remote store's URL in CACHE_ROOT_PATH_OR_URL;
        # REDIS_URL is the one the policies share.
        url: Optional[str] = None
        root = settings.root.strip()
        if root.lower().startswith(("redis://", "rediss://", "unix://")):
            try:
                url = parse_redis_url(root)
            except ValueError as e:
                raise ValueError(f"CACHE_ROOT_PATH_OR_URL (--cache-root-path-or-url): {e}") from None
        elif parsed.get("REDIS_URL"):
            try:
                url = parse_redis_url(str(parsed["REDIS_URL"]))
            except ValueError as e:
                raise ValueError(f"REDIS_URL (--redis-url): {e}") from None
        if url is None:
            raise ValueError(
                "CACHE_BACKEND (--cache-backend): REDIS needs REDIS_URL (or a "
                "redis:// URL in CACHE_ROOT_PATH_OR_URL)"
            )
        settings = CacheSettings(**{**settings.__dict__, "redis_url": url})
    return settings
