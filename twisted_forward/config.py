"""
One frozen configuration object, built from the environment, a ``.env`` file
and the plugin's options, in that order of increasing precedence.

Every setting has an environment variable (the names openai-forward users
already have) and a command-line option.  A bad value raises
:class:`ConfigError` naming the setting, which the tap turns into one clear
line instead of a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union
from urllib.parse import unquote, urlsplit, urlunsplit

from .cache.settings import (
    CacheSettings,
    cache_settings,
    parse_backend,
    parse_interval,
    parse_routes,
)
from .cors import parse_cors_origins
from .migration import migrate, replaced_name
from .policies.settings import POLICY_SETTINGS, PolicyConfig, PolicyConfigError
from .policies.settings import build as build_policy_config
from .trust import read_ca_file

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: In TRUSTED_PROXIES, stands for peers on a unix socket (a local proxy).
UNIX_PEERS = "unix"
#: A TRUSTED_PROXIES entry: a network, or :data:`UNIX_PEERS`.
TrustedProxy = Union[IPNetwork, str]

_SPLIT = re.compile(r"[\s,]+")

#: METRICS values (see :func:`parse_metrics`).
METRICS_ON = "on"
METRICS_OFF = "off"
METRICS_PUBLIC = "public"


class ConfigError(ValueError):
    """A setting has a value the proxy cannot run with; the text names it."""


@dataclass(frozen=True)
class UpstreamURL:
    """An upstream base URL, split once at start-up.

    :ivar scheme: ``http`` or ``https``.
    :ivar netloc: ``host[:port]`` exactly as configured (no user info).
    :ivar path: the base path without a trailing slash (often empty).
    """

    scheme: str
    netloc: str
    path: str

    @property
    def origin(self) -> str:
        """``scheme://netloc``, the part no client input may change."""
        return f"{self.scheme}://{self.netloc}"

    def __str__(self) -> str:
        return self.origin + self.path


@dataclass(frozen=True)
class ProxyURL(UpstreamURL):
    """The outbound proxy (PROXY): ``http://[user:password@]host[:port]``.

    ``str()`` is :attr:`origin`, so the credentials never reach a log line.

    :ivar credentials: ``(user, password)``, percent-decoded, from the URL's
        user info, or None; left out of ``repr``.
    """

    credentials: Optional[tuple[str, str]] = field(default=None, repr=False)


@dataclass(frozen=True)
class Route:
    """One FORWARD_CONFIG row: requests under ``prefix`` go to ``base``.

    :ivar prefix: the route prefix, ``""`` for the root, else ``/x`` with no
        trailing slash.
    :ivar base: where the requests go.
    :ivar kind: ``openai`` (keys, chat records) or ``general`` (a byte pipe).
    """

    prefix: str
    base: UpstreamURL
    kind: str = "openai"


@dataclass(frozen=True)
class ForwardKey:
    """A forward key handed to clients, with the non-secret label logs use."""

    label: str
    key: str = field(repr=False)


@dataclass(frozen=True)
class Config:
    """Everything the proxy needs to run, validated."""

    default_keys: tuple[str, ...] = field(default=(), repr=False)
    forward_keys: tuple[ForwardKey, ...] = ()
    routes: tuple[Route, ...] = ()
    log_chat: bool = True
    #: PRINT_CHAT (openai-forward 0.8.1): each chat record as a log line too.
    print_chat: bool = False
    log_dir: str = "Log"
    ip_whitelist: tuple[IPNetwork, ...] = ()
    ip_blacklist: tuple[IPNetwork, ...] = ()
    trusted_proxies: tuple[TrustedProxy, ...] = ()
    #: CORS_ORIGINS: ``("*",)`` any origin, else these origins; ``()`` off
    #: (:mod:`twisted_forward.cors`).
    cors_origins: tuple[str, ...] = ("*",)
    connect_timeout: float = 10.0
    read_timeout: float = 600.0
    idle_timeout: float = 300.0
    max_request_body: int = 512 * 1024 * 1024
    #: The largest upstream answer head (bytes) and the most header lines in
    #: it; past either, the answer is refused with a 502.
    max_upstream_head: int = 64 * 1024
    max_upstream_headers: int = 100
    #: Seconds from a request head's first byte to its last; seconds of no
    #: body bytes while a request body arrives.  Past either: 408.
    request_head_timeout: float = 30.0
    request_body_timeout: float = 60.0
    #: Caps on client connections (in all, from one address) and upstream
    #: requests in flight: None for the default (from the file-descriptor
    #: limit, see :mod:`twisted_forward.limits`), 0 for no cap.
    max_connections: Optional[int] = None
    max_connections_per_client: Optional[int] = None
    max_upstream_connections: Optional[int] = None
    proxy: Optional[ProxyURL] = None
    ssl_cert_file: Optional[str] = None
    shutdown_grace: float = 30.0
    healthz_path: str = "/healthz"
    #: Where the metrics are served: :data:`METRICS_ON`, :data:`METRICS_OFF`
    #: or :data:`METRICS_PUBLIC` (see :func:`parse_metrics`).
    metrics: str = METRICS_ON
    metrics_path: str = "/metrics"
    metrics_port: Optional[str] = None
    ledger: bool = True
    #: Where the SQLite ledger lives; None: ``data`` beside LOG_DIR.
    data_dir: Optional[str] = None
    #: ``postgresql://…``: the ledger lives in PostgreSQL instead (may hold a password).
    database_url: Optional[str] = field(default=None, repr=False)
    ledger_retention_days: int = 0
    admin_key: Optional[str] = field(default=None, repr=False)
    admin_port: Optional[str] = None
    cache: CacheSettings = CacheSettings()
    #: Per-key policies, levels, limits, quotas (twisted_forward.policies).
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    @property
    def ledger_dir(self) -> str:
        """DATA_DIR, or ``data`` beside LOG_DIR (``./data`` for ``./Log``)."""
        if self.data_dir is not None:
            return self.data_dir
        return default_data_dir(self.log_dir)


# ---------------------------------------------------------------- parsers


def parse_list(value: str) -> tuple[str, ...]:
    """Split a space- or comma-separated setting, dropping empty items."""
    return tuple(item for item in _SPLIT.split(value.strip()) if item)


def parse_url(value: str) -> UpstreamURL:
    """Parse an ``http(s)://host[:port][/path]`` base URL."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port  # raises ValueError on a bad port
    except ValueError as e:
        raise ValueError(f"{value!r} is not a URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError(f"{value!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{value!r} must not carry user info")
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r} must not have a query or fragment")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"{value!r} has an out-of-range port")
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return UpstreamURL(parts.scheme, netloc, parts.path.rstrip("/"))


def parse_proxy_url(value: str) -> ProxyURL:
    """Parse PROXY: ``http://[user:password@]host[:port]`` (port 80 if none).

    The only URL whose user info is accepted: it becomes the proxy's
    ``Proxy-Authorization``.  Error texts never repeat the user info.
    """
    raw = value.strip()
    try:
        return _parse_proxy_url(raw)
    except ValueError:
        if "@" not in raw:
            raise
        # A password with a raw '/', '?' or '#' ends up in the "host", path
        # or fragment: no text made from the URL is safe to show.
        raise ValueError(
            "is not http://[user:password@]host[:port] (percent-encode any "
            "'@', ':', '/', '?', '#' or '%' in the user name or password)"
        ) from None


def _parse_proxy_url(raw: str) -> ProxyURL:
    try:
        parts = urlsplit(raw)
    except ValueError as e:
        raise ValueError(f"is not a URL ({e})") from None
    userinfo, at, hostport = parts.netloc.rpartition("@")
    base = parse_url(urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment)))
    if base.scheme != "http":
        raise ValueError(
            f"{str(base)!r} must be an http:// URL (TLS to the proxy itself is not supported)"
        )
    if base.path:
        raise ValueError(f"{str(base)!r} must not have a path")
    credentials = None
    if at:
        user, _, password = userinfo.partition(":")
        user, password = unquote(user), unquote(password)
        if not user or ":" in user:
            raise ValueError("the proxy user name must be non-empty and hold no ':'")
        credentials = (user, password)
    return ProxyURL(base.scheme, base.netloc, base.path, credentials)


def parse_ca_file(value: str) -> str:
    """A readable PEM file holding at least one CA certificate."""
    path = value.strip()
    read_ca_file(path)
    return path


def parse_prefix(value: str) -> str:
    """Normalise a route prefix: ``openai/`` and ``/openai`` give ``/openai``."""
    stripped = value.strip().strip("/")
    if not stripped:
        return ""
    if re.search(r"[\s?#%\\]", stripped) or any(
        seg in ("", ".", "..") for seg in stripped.split("/")
    ):
        raise ValueError(f"{value!r} is not a plain path prefix")
    return "/" + stripped


def parse_bool(value: str) -> bool:
    """``true/false``, ``1/0``, ``yes/no``, ``on/off``, any case."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not true or false")


def parse_metrics(value: str) -> str:
    """METRICS: ``true`` (:data:`METRICS_ON`: on METRICS_PORT, else on the
    public port for the admin key only), ``false`` (:data:`METRICS_OFF`) or
    ``public`` (:data:`METRICS_PUBLIC`: also on the public port, to anyone
    the IP gate lets in)."""
    if value.strip().lower() == METRICS_PUBLIC:
        return METRICS_PUBLIC
    try:
        return METRICS_ON if parse_bool(value) else METRICS_OFF
    except ValueError:
        raise ValueError(f"{value!r} is not true, false or public") from None


def parse_seconds(value: str) -> float:
    """A positive number of seconds."""
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number of seconds") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{value!r} must be a positive number of seconds")
    return seconds


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_size(value: str) -> int:
    """A byte count: ``1048576``, ``512MiB``, ``10MB``."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size in bytes (e.g. 1048576 or 512MiB)")
    size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if size <= 0:
        raise ValueError(f"{value!r} must be positive")
    return size


def parse_count(value: str) -> int:
    """A positive whole number: ``100``."""
    try:
        count = int(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None
    if count <= 0:
        raise ValueError(f"{value!r} must be positive")
    return count


def parse_cap(value: str) -> int:
    """A cap: a whole number, ``0`` for none."""
    try:
        count = int(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None
    if count < 0:
        raise ValueError(f"{value!r} must be 0 (no cap) or more")
    return count


def parse_networks(value: str) -> tuple[IPNetwork, ...]:
    """Addresses or CIDR ranges, IPv4 or IPv6, space- or comma-separated."""
    networks = []
    for item in parse_list(value):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR range") from None
    return tuple(networks)


def parse_trusted_proxies(value: str) -> tuple[TrustedProxy, ...]:
    """Like :func:`parse_networks`, plus ``unix`` for unix-socket peers."""
    items = parse_list(value)
    unix = [UNIX_PEERS for item in items if item.lower() in ("unix", "unix:")]
    networks = parse_networks(
        " ".join(item for item in items if item.lower() not in ("unix", "unix:"))
    )
    return tuple(unix[:1]) + networks


def parse_forward_keys(value: str) -> tuple[ForwardKey, ...]:
    """Forward keys, each ``fk-…`` or ``label:fk-…``."""
    keys: list[ForwardKey] = []
    for item in parse_list(value):
        label, sep, key = item.rpartition(":")
        if not sep:
            label = ""
        if not key.startswith("fk-") or len(key) < 8:
            raise ValueError(
                "every forward key must start with 'fk-' and be at least 8 characters"
            )
        if label and not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", label):
            raise ValueError(
                "a forward key label may hold letters, digits, '_', '.', '-' only"
            )
        keys.append(ForwardKey(label or _default_label(key, len(keys) + 1), key))
    if len({k.key for k in keys}) != len(keys):
        raise ValueError("the same forward key is listed twice")
    if len({k.label for k in keys}) != len(keys):
        raise ValueError("two forward keys share a label")
    return tuple(keys)


#: Shorter unlabelled forward keys are named by position: a hash prefix of a
#: short key lets whoever reads the logs find the key by brute force.
_HASH_LABEL_MIN = 24


def _default_label(key: str, position: int) -> str:
    """A non-secret name for an unlabelled forward key."""
    if len(key) < _HASH_LABEL_MIN:
        return f"fk#{position}"
    import hashlib

    return "fk#" + hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_default_keys(value: str) -> tuple[str, ...]:
    """OpenAI keys the proxy spends on the clients' behalf."""
    keys = parse_list(value)
    for key in keys:
        if key.startswith("fk-"):
            raise ValueError("a forward key (fk-…) belongs in FORWARD_KEY, not here")
        if not re.fullmatch(r"[\x21-\x7e]+", key):
            raise ValueError("a key may hold printable ASCII characters only")
    return keys


#: The shortest admin key accepted: it guards every figure and record.
ADMIN_KEY_MIN = 16


def parse_admin_key(value: str) -> str:
    """The key that opens ``/_admin/``: long, printable, not a forward key."""
    key = value.strip()
    if not re.fullmatch(r"[\x21-\x7e]+", key):
        raise ValueError("must be printable ASCII characters, with no space")
    if len(key) < ADMIN_KEY_MIN:
        raise ValueError(f"must be at least {ADMIN_KEY_MIN} characters")
    if key[:3].lower() == "fk-":
        raise ValueError("must not start with 'fk-' (that is a forward key's shape)")
    return key


def parse_forward_config(value: str) -> tuple[Route, ...]:
    """openai-forward's FORWARD_CONFIG: a JSON list of route rows."""
    try:
        rows = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list) or not rows:
        raise ValueError("must be a non-empty JSON list of route objects")
    routes = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"row {i} is not an object")
        unknown = set(row) - {"base_url", "route", "type"}
        if unknown:
            raise ValueError(f"row {i} has unknown field(s): {', '.join(sorted(unknown))}")
        if not isinstance(row.get("base_url"), str):
            raise ValueError(f"row {i} needs a 'base_url' string")
        kind = row.get("type", "openai")
        if kind not in ("openai", "general"):
            raise ValueError(f"row {i}: 'type' must be 'openai' or 'general'")
        route = row.get("route", "/")
        if not isinstance(route, str):
            raise ValueError(f"row {i}: 'route' must be a string")
        try:
            routes.append(Route(parse_prefix(route), parse_url(row["base_url"]), kind))
        except ValueError as e:
            raise ValueError(f"row {i}: {e}") from None
    prefixes = [r.prefix or "/" for r in routes]
    for p in prefixes:
        if prefixes.count(p) > 1:
            raise ValueError(f"route {p!r} is listed twice")
    return tuple(routes)


#: Listen backlog for TCP listeners that do not set one: Twisted's default
#: of 50 overflows under a burst of new connections, and each overflowed SYN
#: costs its client a 1, 3, 7 s retransmit.
DEFAULT_BACKLOG = 1024
_BACKLOG_KINDS = ("tcp:", "tcp6:", "ssl:")


def default_data_dir(log_dir: str) -> str:
    """DATA_DIR's default: a ``data`` folder beside the chat records'.

    Not LOG_DIR itself: tools that read every file there, and a LOG_DIR on
    a small disk, should not meet the ledger.
    """
    return os.path.join(os.path.dirname(os.path.abspath(log_dir)), "data")


def parse_database_url(value: str) -> str:
    """A ``postgresql://`` URL (or key=value conninfo) for the ledger.

    Error texts never repeat the URL: it may hold a password.
    """
    url = value.strip()
    if not url.startswith(("postgresql://", "postgres://")):
        raise ValueError("must be a postgresql://user:password@host:port/database URL")
    try:
        import psycopg  # noqa: F401
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ValueError(
            "needs psycopg 3 (pip install 'psycopg[binary]')"
        ) from None
    try:
        conninfo_to_dict(url)
    except Exception:
        raise ValueError(
            "is not a valid PostgreSQL URL (percent-encode special characters "
            "in the user name or password)"
        ) from None
    return url


def parse_days(value: str) -> int:
    """A whole number of days, 0 or more."""
    text = value.strip()
    if not text.isdigit():
        raise ValueError(f"{value!r} is not a whole number of days (0: keep forever)")
    return int(text)


def parse_endpoint(value: str) -> str:
    """A port number (TCP, all interfaces) or a Twisted endpoint string.

    TCP and TLS listeners get ``backlog=1024`` unless the string sets one.
    """
    value = value.strip()
    if value.isdigit():
        if not 0 <= int(value) < 65536:
            raise ValueError(f"{value} is out of range")
        value = f"tcp:{value}"
    elif ":" not in value:
        raise ValueError(f"{value!r} is neither a port number nor an endpoint string")
    if value.lower().startswith(_BACKLOG_KINDS) and "backlog=" not in value:
        value += f":backlog={DEFAULT_BACKLOG}"
    return value


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One configurable, declared once: its environment variable, its twistd
    option (``--option``), its parser, its help text, and the
    :class:`Config` field its parsed value fills.

    :ivar field: the Config field set to the parsed value, or None for a
        setting that feeds a derived value instead (the routes, the keys,
        the cache's and the policies' settings).
    """

    env: str
    option: str
    parse: Callable[[str], object]
    help: str
    field: Optional[str] = None


SETTINGS: tuple[Setting, ...] = (
    Setting("OPENAI_API_KEY", "api-key", parse_default_keys,
            "Default OpenAI key(s), space/comma-separated, used in turn."),
    Setting("FORWARD_KEY", "forward-key", parse_forward_keys,
            "Forward key(s) fk-… (optionally label:fk-…) clients send instead of a real key."),
    Setting("OPENAI_BASE_URL", "base-url", parse_url,
            "Upstream base URL [default: https://api.openai.com]."),
    Setting("ROUTE_PREFIX", "route-prefix", parse_prefix,
            "Serve under this path prefix, e.g. /openai."),
    Setting("FORWARD_CONFIG", "forward-config", parse_forward_config,
            'JSON list of {"base_url","route","type"} rows (overrides base-url/route-prefix).'),
    Setting("LOG_CHAT", "log-chat", parse_bool, "Write chat records [default: true].",
            field="log_chat"),
    Setting("LOG_DIR", "log-dir", str, "Directory for chat records [default: Log].",
            field="log_dir"),
    Setting("IP_WHITELIST", "ip-whitelist", parse_networks,
            "Only these addresses/CIDR ranges may connect.", field="ip_whitelist"),
    Setting("IP_BLACKLIST", "ip-blacklist", parse_networks,
            "These addresses/CIDR ranges are refused.", field="ip_blacklist"),
    Setting("TRUSTED_PROXIES", "trusted-proxies", parse_trusted_proxies,
            "Peers whose X-Forwarded-For/Forwarded is believed ('unix': unix-socket peers).",
            field="trusted_proxies"),
    Setting("CORS_ORIGINS", "cors-origins", parse_cors_origins,
            "Origins whose pages may call the proxy (CORS): '*', a list, or 'none' [default: *].",
            field="cors_origins"),
    # openai-forward 0.8.1's names without a twin here (twisted_forward.migration).
    Setting("LOG_OPENAI", "log-openai", parse_bool,
            "0.8.1: chat records on openai routes (LOG_CHAT, if that is not given)."),
    Setting("LOG_GENERAL", "log-general", parse_bool,
            "0.8.1: general routes are never recorded here; true with a general route is refused."),
    Setting("TIMEOUT", "timeout", parse_seconds,
            "0.8.1: seconds to connect to the upstream (CONNECT_TIMEOUT, if that is not given)."),
    Setting("PRINT_CHAT", "print-chat", parse_bool,
            "0.8.1: also log each chat record as a line [default: false].",
            field="print_chat"),
    Setting("BENCHMARK_MODE", "benchmark-mode", parse_bool,
            "0.8.1: answering without the upstream; only false is accepted."),
    Setting("CONNECT_TIMEOUT", "connect-timeout", parse_seconds,
            "Seconds to connect to the upstream [default: 10].", field="connect_timeout"),
    Setting("READ_TIMEOUT", "read-timeout", parse_seconds,
            "Seconds to the upstream's response head [default: 600].", field="read_timeout"),
    Setting("IDLE_TIMEOUT", "idle-timeout", parse_seconds,
            "Seconds of silence allowed between body chunks [default: 300].",
            field="idle_timeout"),
    Setting("MAX_REQUEST_BODY", "max-request-body", parse_size,
            "Largest request body in bytes, e.g. 512MiB [default: 512MiB].",
            field="max_request_body"),
    Setting("MAX_UPSTREAM_HEAD", "max-upstream-head", parse_size,
            "Largest upstream answer head in bytes; larger is a 502 [default: 64KiB].",
            field="max_upstream_head"),
    Setting("MAX_UPSTREAM_HEADERS", "max-upstream-headers", parse_count,
            "Most header lines in an upstream answer head; more is a 502 [default: 100].",
            field="max_upstream_headers"),
    Setting("REQUEST_HEAD_TIMEOUT", "request-head-timeout", parse_seconds,
            "Seconds a client may take to send a whole request head; then 408 [default: 30].",
            field="request_head_timeout"),
    Setting("REQUEST_BODY_TIMEOUT", "request-body-timeout", parse_seconds,
            "Seconds a request body may go without a byte; then 408 [default: 60].",
            field="request_body_timeout"),
    Setting("MAX_CONNECTIONS", "max-connections", parse_cap,
            "Most client connections at once; more get 503, 0: no cap "
            "[default: from the descriptor limit].", field="max_connections"),
    Setting("MAX_CONNECTIONS_PER_CLIENT", "max-connections-per-client", parse_cap,
            "Most connections from one client address; more get 429, 0: no cap "
            "[default: half of MAX_CONNECTIONS].", field="max_connections_per_client"),
    Setting("MAX_UPSTREAM_CONNECTIONS", "max-upstream-connections", parse_cap,
            "Most upstream requests in flight; more get 503, 0: no cap "
            "[default: from the descriptor limit].", field="max_upstream_connections"),
    Setting("PROXY", "proxy", parse_proxy_url,
            "Outbound HTTP proxy for reaching the upstream, http://[user:pass@]host:port.",
            field="proxy"),
    Setting("SSL_CERT_FILE", "ssl-cert-file", parse_ca_file,
            "PEM file of the CA certificates trusted for upstream TLS "
            "[default: the system's].", field="ssl_cert_file"),
    Setting("SHUTDOWN_GRACE", "shutdown-grace", parse_seconds,
            "Seconds open requests get to finish on SIGTERM [default: 30].",
            field="shutdown_grace"),
    Setting("HEALTHZ_PATH", "healthz-path", parse_prefix,
            "Path of the health check [default: /healthz].", field="healthz_path"),
    Setting("METRICS", "metrics", parse_metrics,
            "Prometheus metrics: true (on METRICS_PORT, else on this port with "
            "ADMIN_KEY as Bearer), public (also open on this port) or false "
            "[default: true].", field="metrics"),
    Setting("METRICS_PATH", "metrics-path", parse_prefix,
            "Path of the Prometheus metrics [default: /metrics].", field="metrics_path"),
    Setting("METRICS_PORT", "metrics-port", parse_endpoint,
            "Serve metrics, open, on this port/endpoint (e.g. tcp:9100:interface=127.0.0.1) "
            "instead of the proxy's own.",
            field="metrics_port"),
    Setting("LEDGER", "ledger", parse_bool,
            "Keep the usage ledger (requests, tokens, cost per key/model/day) "
            "[default: true].", field="ledger"),
    Setting("DATA_DIR", "data-dir", str,
            "Directory of the SQLite ledger (ledger.sqlite3) [default: data beside LOG_DIR].",
            field="data_dir"),
    Setting("DATABASE_URL", "database-url", parse_database_url,
            "postgresql://… : keep the ledger in PostgreSQL instead of SQLite.",
            field="database_url"),
    Setting("LEDGER_RETENTION_DAYS", "ledger-retention-days", parse_days,
            "Delete ledger day rows older than this many days (0: keep) [default: 0].",
            field="ledger_retention_days"),
    Setting("ADMIN_KEY", "admin-key", parse_admin_key,
            "Turns on the admin page and API at /_admin/; the key that opens them.",
            field="admin_key"),
    Setting("ADMIN_PORT", "admin-port", parse_endpoint,
            "Serve /_admin/ on this port/endpoint instead of the proxy's own.",
            field="admin_port"),
    # The response cache: openai-forward 0.8.1's names, then ours.
    Setting("CACHE_OPENAI", "cache-openai", parse_bool,
            "Cache answers on openai routes, for requests that ask [default: false]."),
    Setting("CACHE_GENERAL", "cache-general", parse_bool,
            "Cache answers on general routes, for requests that ask [default: false]."),
    Setting("CACHE_ROUTES", "cache-routes", parse_routes,
            "Paths whose answers may be cached, JSON list or comma-separated "
            "[default: chat completions, completions, embeddings]."),
    Setting("CACHE_BACKEND", "cache-backend", parse_backend,
            "MEMORY, LMDB or REDIS [default: MEMORY]."),
    Setting("CACHE_ROOT_PATH_OR_URL", "cache-root-path-or-url", str,
            "Directory holding the LMDB cache (CACHE_DB), or a redis:// URL [default: .]."),
    Setting("DEFAULT_REQUEST_CACHING_VALUE", "default-request-caching-value", parse_bool,
            "Cache requests that have no \"caching\" field [default: false]."),
    Setting("CACHE_TTL", "cache-ttl", parse_seconds,
            "Seconds a cached answer is served [default: 604800, a week]."),
    Setting("CACHE_MAX_BYTES", "cache-max-bytes", parse_size,
            "Size bound of the cache store, e.g. 128MiB [default: 128MiB]."),
    Setting("CACHE_MAX_ENTRY_BYTES", "cache-max-entry-bytes", parse_size,
            "Largest answer cached [default: 8MiB]."),
    Setting("CACHE_MAX_REQUEST_BODY", "cache-max-request-body", parse_size,
            "Larger request bodies are not cached (nor read for it) [default: 1MiB]."),
    Setting("CACHE_SHARED", "cache-shared", parse_bool,
            "One cache partition for every credential [default: false: one per key]."),
    Setting("CACHE_NONDETERMINISTIC", "cache-nondeterministic", parse_bool,
            "Also cache n>1, temperature>0 without seed, and tool requests [default: false]."),
    Setting("CACHE_REPLAY_INTERVAL", "cache-replay-interval", parse_interval,
            "Seconds between replayed SSE events of a cached stream [default: 0]."),
    Setting("CACHE_TIMEOUT", "cache-timeout", parse_seconds,
            "Seconds a cache store may take before the request is a miss [default: 2]."),
) + tuple(Setting(*row) for row in POLICY_SETTINGS)


def read_env_file(path: str) -> dict[str, str]:
    """Read a ``.env`` file if there is one; a missing file is no settings."""
    if not os.path.isfile(path):
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def load_config(
    options: Mapping[str, Optional[str]],
    environ: Mapping[str, str],
    env_file: Optional[Mapping[str, str]] = None,
) -> Config:
    """Merge the sources (options > environment > .env) and validate.

    :param options: option name (as in :data:`SETTINGS`) to raw value, None
        where the option was not given.
    :raises ConfigError: naming the first bad setting.
    """
    raw: dict[str, str] = {}
    for setting in SETTINGS:
        value = options.get(setting.option)
        if value is None:
            value = environ.get(setting.env)
        if value is None and env_file is not None:
            value = env_file.get(setting.env)
        if value is not None:
            raw[setting.env] = value

    gone = replaced_name(environ, env_file or {})
    if gone is not None:
        raise ConfigError(f"{gone[0]}: an openai-forward 0.8.1 setting not read here: {gone[1]}")

    # Each value is what its setting's parser returns (typed in its SETTINGS
    # row), so the mapping's values can only be Any here.
    parsed: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.env not in raw:
            continue
        try:
            parsed[setting.env] = setting.parse(raw[setting.env])
        except ValueError as e:
            raise ConfigError(f"{setting.env} (--{setting.option}): {e}") from None

    if "FORWARD_CONFIG" in parsed:
        routes = parsed["FORWARD_CONFIG"]
    else:
        base = parsed.get("OPENAI_BASE_URL") or parse_url("https://api.openai.com")
        routes = (Route(parsed.get("ROUTE_PREFIX", ""), base, "openai"),)

    forward_keys = parsed.get("FORWARD_KEY", ())
    default_keys = parsed.get("OPENAI_API_KEY", ())
    try:
        policy, forward_keys, default_keys = build_policy_config(
            parsed, forward_keys, default_keys, parse_forward_keys
        )
    except PolicyConfigError as e:
        option = next(s.option for s in SETTINGS if s.env == e.setting)
        raise ConfigError(f"{e.setting} (--{option}): {e}") from None
    if forward_keys and not default_keys:
        raise ConfigError(
            "FORWARD_KEY (--forward-key): forward keys need OPENAI_API_KEY to stand for"
        )
    kwargs: dict[str, Any] = dict(
        default_keys=default_keys,
        forward_keys=forward_keys,
        routes=routes,
        policy=policy,
    )
    for setting in SETTINGS:
        if setting.field is not None and setting.env in parsed:
            kwargs[setting.field] = parsed[setting.env]
    try:
        migrate(parsed, kwargs, routes)
    except ValueError as e:
        env, why = e.args
        option = next(s.option for s in SETTINGS if s.env == env)
        raise ConfigError(f"{env} (--{option}): {why}") from None
    try:
        kwargs["cache"] = cache_settings(parsed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if kwargs.get("log_dir") == "":
        raise ConfigError("LOG_DIR (--log-dir): must not be empty")
    if kwargs.get("data_dir") == "":
        raise ConfigError("DATA_DIR (--data-dir): must not be empty")
    if kwargs.get("healthz_path", "/healthz") == "":
        raise ConfigError("HEALTHZ_PATH (--healthz-path): must not be the root")
    if kwargs.get("metrics_path", "/metrics") == "":
        raise ConfigError("METRICS_PATH (--metrics-path): must not be the root")
    admin_key = kwargs.get("admin_key")
    if kwargs.get("admin_port") is not None and admin_key is None:
        raise ConfigError("ADMIN_PORT (--admin-port): needs ADMIN_KEY")
    if admin_key is not None and (
        admin_key in default_keys
        or any(k.key == admin_key for k in forward_keys)
    ):
        raise ConfigError("ADMIN_KEY (--admin-key): must differ from every other key")
    return Config(**kwargs)


def metrics_placement(config: Config) -> str:
    """The start-up line saying where the metrics are served, and to whom."""
    path = config.metrics_path
    if config.metrics == METRICS_OFF:
        return f"metrics: off (METRICS=false); {path} is forwarded like any path"
    where = []
    if config.metrics_port is not None:
        where.append(f"on METRICS_PORT {config.metrics_port} at {path}, without a key")
    if config.metrics == METRICS_PUBLIC:
        where.append(f"at {path} on the proxy's port, open to every client the IP "
                     "lists let in (METRICS=public)")
    elif config.metrics_port is None and config.admin_key is not None:
        where.append(f"at {path} on the proxy's port, for the admin key only "
                     "(Authorization: Bearer <ADMIN_KEY>)")
    if not where:
        return (f"metrics: not served ({path} answers 404): set METRICS_PORT (e.g. "
                "tcp:9100:interface=127.0.0.1), ADMIN_KEY, or METRICS=public")
    return "metrics: " + "; ".join(where)


def describe(config: Config) -> Sequence[str]:
    """Start-up lines that say what the proxy will do, with no secret in them."""
    lines = []
    for route in config.routes:
        lines.append(f"route {route.prefix or '/'} -> {route.base} ({route.kind})")
    if config.proxy is not None:
        lines.append(f"upstream requests go through the proxy {config.proxy}")
    lines.append(
        f"{len(config.default_keys)} default key(s), "
        f"{len(config.forward_keys)} forward key(s)"
        + (f": {', '.join(k.label for k in config.forward_keys)}" if config.forward_keys else "")
    )
    lines.extend(config.policy.describe())
    lines.append(metrics_placement(config))
    if config.admin_key is not None:
        lines.append(
            "admin page and API at /_admin/"
            + (f" on {config.admin_port}" if config.admin_port else "")
        )
    cache = config.cache
    if cache.enabled:
        kinds = " and ".join(k for k in ("openai", "general") if cache.on(k))
        lines.append(
            f"cache: {cache.backend} on {kinds} routes for {', '.join(cache.routes)}"
            f" ({'every request' if cache.default_caching else 'requests that ask'}, "
            f"{'one shared partition' if cache.shared else 'partitioned by key'})"
        )
    return lines
