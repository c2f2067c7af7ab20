"""
openai-forward 0.8.1's settings that have no twin here, honoured with their
0.8.1 meaning or refused in one line; and a warning for unknown variables
that look like ours (a typo such as ``FORWARD_KYE``).

The key, limit and cache names of 0.8.1 (``OPENAI_API_KEY_CONFIG``,
``LEVEL_MODELS``, ``REQ_RATE_LIMIT``, ``CACHE_*``...) are settings of their
own, read by :mod:`twisted_forward.policies.settings` and
:mod:`twisted_forward.cache.settings`.

================  =====================================================
0.8.1 name        here
================  =====================================================
LOG_OPENAI        chat records on ``openai`` routes: LOG_CHAT, when
                  LOG_CHAT is not given
LOG_GENERAL       ``false``: as here (``general`` routes are a byte pipe,
                  never recorded); ``true`` with a ``general`` route:
                  refused (not recorded here)
TIMEOUT           seconds to connect to the upstream (0.8.1's aiohttp
                  ``ClientTimeout(connect=TIMEOUT)``): CONNECT_TIMEOUT,
                  when CONNECT_TIMEOUT is not given
PRINT_CHAT        each chat record also as a log line (keys masked)
BENCHMARK_MODE    ``false``: as here; ``true`` (answer without the
                  upstream): refused
DEFAULT_STREAM_RESPONSE, LOG_CACHE_DB_INFO
                  ``false``: as here; ``true``: refused (:data:`ONLY_FALSE`)
OPENAI_ROUTE_PREFIX, EXTRA_BASE_URL, EXTRA_ROUTE_PREFIX,
CHAT_COMPLETION_ROUTE, COMPLETION_ROUTE, EMBEDDING_ROUTE, CUSTOM_MODEL_CONFIG,
CUSTOM_GENERAL_ROUTE, ITER_CHUNK_TYPE, the WebUI's WEBUI_RESTART_PORT,
WEBUI_LOG_PORT, OPENAI_FORWARD_WEBUI and OPENAI_FORWARD_HOST, ``aifd run``'s
ssl_keyfile and ssl_certfile, and TZ in the .env file: refused, naming the
replacement (:data:`REPLACED`)
================  =====================================================
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from .config import Route

#: First words of our setting names: an unknown variable starting with one
#: of these is probably a typo of ours.  ``OPENAI_`` is checked in the .env
#: file only: the environment holds the SDK's own (OPENAI_ORG_ID, ...).
#: Every setting's name but the one-word ones starts with one of these or
#: of :data:`FILE_ONLY_PREFIXES` (tests/test_migration.py checks).
PREFIXES = (
    "FORWARD_", "LOG_", "CACHE_", "IP_", "TRUSTED_", "METRICS_", "ADMIN_", "LEDGER_",
    "REQ_", "TOKEN_", "GLOBAL_", "RATE_", "SHUTDOWN_", "HEALTHZ_", "ROUTE_", "LEVEL_",
    "CONNECT_", "READ_", "IDLE_", "MAX_", "REQUEST_", "PRINT_", "BENCHMARK_", "DEFAULT_",
    "CORS_", "KEY_", "PRICES_", "UNKNOWN_MODEL_", "LIMITS_",
)
#: Checked in the .env file only: in the environment other programs use
#: them too (OpenSSL's SSL_CERT_DIR, a container's REDIS_HOST, ...).
FILE_ONLY_PREFIXES = ("OPENAI_", "REDIS_", "DATA_", "DATABASE_", "SSL_")


def migrate(
    parsed: Mapping[str, object], kwargs: dict[str, object], routes: Sequence["Route"]
) -> None:
    """Apply the 0.8.1 names in ``parsed`` to the Config keyword arguments
    (``routes``: the configured routes).

    :raises ValueError: ``(setting, message)`` for a value refused.
    """
    if "LOG_OPENAI" in parsed and "LOG_CHAT" not in parsed:
        kwargs["log_chat"] = parsed["LOG_OPENAI"]
    if "TIMEOUT" in parsed and "CONNECT_TIMEOUT" not in parsed:
        kwargs["connect_timeout"] = parsed["TIMEOUT"]
    if parsed.get("LOG_GENERAL") and any(r.kind == "general" for r in routes):
        raise ValueError(
            "LOG_GENERAL",
            "general routes are relayed as they are and never recorded here; "
            "set LOG_GENERAL=false (chat records of openai routes: LOG_CHAT)",
        )
    if parsed.get("BENCHMARK_MODE"):
        raise ValueError(
            "BENCHMARK_MODE",
            "answering without the upstream is not supported; set BENCHMARK_MODE=false "
            "and benchmark against a fake upstream (see bench/)",
        )


_RECORDED_PATHS = (
    "chat records cover chat completions, completions and embeddings by their OpenAI paths "
    "under every route; remove it"
)
_NO_WEBUI = "the WebUI is replaced by the admin page: set ADMIN_KEY (see docs/admin.md); remove it"
_TLS = (
    "TLS is set on the listening endpoint: --port ssl:PORT:privateKey=KEY.pem:certKey=CERT.pem "
    "(see docs/listening.md); remove it"
)

#: openai-forward 0.8.1 names with no meaning here, and what replaces them:
#: each stops start-up with one line (never silently ignored).
REPLACED: dict[str, str] = {
    "OPENAI_ROUTE_PREFIX": "use ROUTE_PREFIX (or the route of a FORWARD_CONFIG row)",
    "EXTRA_BASE_URL": 'use FORWARD_CONFIG, one {"base_url", "route", "type": "general"} row per upstream',
    "EXTRA_ROUTE_PREFIX": 'use FORWARD_CONFIG, one {"base_url", "route", "type": "general"} row per upstream',
    "CHAT_COMPLETION_ROUTE": "chat records cover /v1/chat/completions under every route; remove it",
    "COMPLETION_ROUTE": _RECORDED_PATHS,
    "EMBEDDING_ROUTE": _RECORDED_PATHS,
    "CUSTOM_MODEL_CONFIG": "custom model back-ends are not supported; route them with FORWARD_CONFIG",
    "CUSTOM_GENERAL_ROUTE": "custom model back-ends are not supported; route them with FORWARD_CONFIG",
    "ITER_CHUNK_TYPE": "answers are relayed chunk by chunk as they arrive; remove it",
    # The WebUI's (0.8.1's WebUI writes the first two into every .env it saves).
    "WEBUI_RESTART_PORT": _NO_WEBUI,
    "WEBUI_LOG_PORT": _NO_WEBUI,
    "OPENAI_FORWARD_WEBUI": _NO_WEBUI,
    "OPENAI_FORWARD_HOST": _NO_WEBUI,
    # 0.8.1's `aifd run` served TLS with these (lower case) variables.
    "ssl_keyfile": _TLS,
    "ssl_certfile": _TLS,
}
#: openai-forward 0.8.1 names accepted when false (what this proxy does
#: anyway), refused otherwise.
ONLY_FALSE: dict[str, str] = {
    "DEFAULT_STREAM_RESPONSE": (
        'a request without "stream" is answered as OpenAI answers it, not streamed '
        "(0.8.1 applied this to cached and benchmark answers); set it to false or remove it"
    ),
    "LOG_CACHE_DB_INFO": (
        "the cache store's state is in the metrics (see docs/cache.md); "
        "set it to false or remove it"
    ),
}
#: Names refused only in the .env file: in the environment they are the
#: system's own (TZ sets every program's time zone).
REPLACED_IN_FILE: dict[str, str] = {
    "TZ": "chat records, the ledger and the access log are in UTC; remove TZ from the .env file",
}


def replaced_name(
    environ: Mapping[str, str], env_file: Mapping[str, str]
) -> "tuple[str, str] | None":
    """The first 0.8.1 name given that has no meaning here, with its
    replacement, or None."""
    for name, why in REPLACED.items():
        if name in environ or name in env_file:
            return name, why
    for name, why in REPLACED_IN_FILE.items():
        if name in env_file:
            return name, why
    for name, why in ONLY_FALSE.items():
        value = environ.get(name, env_file.get(name))
        if value is not None and value.strip().lower() not in _FALSE:
            return name, why
    return None


_FALSE = ("0", "false", "no", "off", "")


def unknown_names(
    known: Iterable[str], environ: Mapping[str, str], env_file: Mapping[str, str]
) -> list[tuple[str, str, str]]:
    """``(name, where, closest known name or "")`` for each unknown variable
    that starts with one of our prefixes."""
    known = sorted(set(known) | set(ONLY_FALSE))
    found = []
    for where, names, prefixes in (
        ("the environment", environ, PREFIXES),
        ("the .env file", env_file, PREFIXES + FILE_ONLY_PREFIXES),
    ):
        for name in sorted(names):
            if name in known or not name.startswith(prefixes):
                continue
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            found.append((name, where, close[0] if close else ""))
    return found
