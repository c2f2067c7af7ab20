"""
What the policies say, parsed and validated at start-up.

Two ways to write them, one schema:

- ``KEY_POLICY`` (JSON in the environment) or ``KEY_POLICY_FILE`` (a JSON or
  TOML file): per forward-key label, and ``"*"`` for every key without its
  own entry, the fields of :class:`KeyPolicy`;
- openai-forward 0.8.1's names: ``FORWARD_KEY_CONFIG`` (forward key ->
  level), ``OPENAI_API_KEY_CONFIG`` (default key -> levels it serves),
  ``LEVEL_MODELS``, ``REQ_RATE_LIMIT``, ``GLOBAL_RATE_LIMIT``,
  ``RATE_LIMIT_STRATEGY``, with the ``limits`` library's syntax for rates.

Every parser raises ``ValueError`` with a message naming the field; the
configuration loader puts the setting's name in front.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

#: The policy entry for every key without its own.
EVERY_KEY = "*"

_UNITS = {
    "second": 1.0,
    "minute": 60.0,
    "hour": 3600.0,
    "day": 86400.0,
    "month": 30 * 86400.0,  # as the limits library counts a month
    "year": 365 * 86400.0,
}
_RATE = re.compile(
    r"\s*(\d+)\s*(?:/|\s+per\s+)\s*(\d+)?\s*(second|minute|hour|day|month|year)s?\s*",
    re.IGNORECASE,
)
_RATE_SEPARATORS = re.compile(r"[,;|]")


@dataclass(frozen=True)
class Rate:
    """``amount`` per ``seconds``, as ``"100/2minutes"`` says."""

    amount: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.amount}/{self.seconds:g}s"


def parse_rates(text: str) -> tuple[Rate, ...]:
    """Rates in the ``limits`` library's syntax.

    ``"5/minute"``, ``"100/2minutes"``, ``"10 per hour"``, several separated
    by ``;`` (or ``,``, ``|``); ``"inf"`` or an empty string is no limit.
    """
    text = text.strip()
    if text.lower() in ("", "inf"):
        return ()
    rates = []
    for part in _RATE_SEPARATORS.split(text):
        match = _RATE.fullmatch(part)
        if not match:
            raise ValueError(f"{part.strip()!r} is not a rate like '5/minute' or '100/2minutes'")
        amount = int(match.group(1))
        multiple = int(match.group(2) or 1)
        if amount <= 0 or multiple <= 0:
            raise ValueError(f"{part.strip()!r}: amount and period must be positive")
        rates.append(Rate(amount, multiple * _UNITS[match.group(3).lower()]))
    return tuple(rates)


@dataclass(frozen=True)
class KeyPolicy:
    """What one forward key may do.  Every field is optional (None: no limit).

    :ivar models: shell-style patterns of the models it may use.
    :ivar rpm: requests per minute.
    :ivar tpm: tokens (prompt and completion) per minute.
    :ivar max_parallel: requests in flight at once.
    :ivar tokens_per_day: tokens per UTC day; ``tokens_per_month`` per month.
    :ivar usd_per_day: US dollars per UTC day, from the price table;
        ``usd_per_month`` per month.
    :ivar requests: more request rates (from 0.8.1's REQ_RATE_LIMIT), by
        route path prefix: ``((prefix, rates), ...)``.
    """

    models: Optional[tuple[str, ...]] = None
    rpm: Optional[int] = None
    tpm: Optional[int] = None
    max_parallel: Optional[int] = None
    tokens_per_day: Optional[int] = None
    tokens_per_month: Optional[int] = None
    usd_per_day: Optional[float] = None
    usd_per_month: Optional[float] = None

    def allows(self, model: str) -> bool:
        """Whether ``model`` matches one of :attr:`models` (all, if None)."""
        if self.models is None:
            return True
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    @property
    def limits_tokens(self) -> bool:
        """Whether a token or dollar count matters (so usage must be known)."""
        return any(
            v is not None
            for v in (
                self.tpm, self.tokens_per_day, self.tokens_per_month,
                self.usd_per_day, self.usd_per_month,
            )
        )


_INT_FIELDS = ("rpm", "tpm", "max_parallel", "tokens_per_day", "tokens_per_month")
_USD_FIELDS = ("usd_per_day", "usd_per_month")
POLICY_FIELDS = frozenset(("models",) + _INT_FIELDS + _USD_FIELDS)


def parse_key_policy_entry(where: str, entry: Any) -> KeyPolicy:
    """One label's entry: an object of :data:`POLICY_FIELDS`."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: must be an object")
    unknown = sorted(set(entry) - POLICY_FIELDS)
    if unknown:
        raise ValueError(
            f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(POLICY_FIELDS))})"
        )
    values: dict[str, Any] = {}
    if "models" in entry:
        models = entry["models"]
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise ValueError(f"{where}.models: must be a list of model names or patterns")
        values["models"] = tuple(models)
    for name in _INT_FIELDS:
        if name in entry:
            value = entry[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}.{name}: must be a whole number >= 0")
            values[name] = value
    for name in _USD_FIELDS:
        if name in entry:
            value = entry[name]
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{where}.{name}: must be a number of dollars >= 0")
            values[name] = float(value)
    return KeyPolicy(**values)


def parse_key_policy_table(table: Any) -> dict[str, KeyPolicy]:
    """The whole KEY_POLICY object: label (or ``*``) -> entry."""
    if not isinstance(table, Mapping):
        raise ValueError("must be an object of forward-key label -> policy")
    return {
        str(label): parse_key_policy_entry(str(label), entry) for label, entry in table.items()
    }


def parse_key_policy_json(text: str) -> dict[str, KeyPolicy]:
    """KEY_POLICY as JSON text."""
    return parse_key_policy_table(_json(text))


def read_key_policy_file(path: str) -> dict[str, KeyPolicy]:
    """KEY_POLICY_FILE: a ``.toml`` file (Python 3.11+), else JSON."""
    path = path.strip()
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path!r} ({e.strerror})") from None
    if path.lower().endswith(".toml"):
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            raise ValueError("TOML needs Python 3.11 or later; write the file as JSON") from None
        try:
            table = tomllib.loads(data.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path!r} is not valid TOML ({e})") from None
        return parse_key_policy_table(table)
    try:
        return parse_key_policy_json(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path!r} is not UTF-8 text") from None


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None


# ---------------------------------------------------------------- 0.8.1 names


def parse_forward_key_config(text: str) -> dict[str, int]:
    """FORWARD_KEY_CONFIG: ``{"fk-…": level}``; a key may be ``label:fk-…``.

    :returns: the key as written (label included) -> level.
    """
    table = _json(text)
    if not isinstance(table, Mapping) or not table:
        raise ValueError('must be a JSON object like {"fk-...": 0}')
    out = {}
    for key, level in table.items():
        if isinstance(level, bool) or not isinstance(level, int) or level < 0:
            raise ValueError("every level must be a whole number >= 0")
        out[str(key)] = level
    return out


def parse_api_key_config(text: str) -> dict[str, tuple[int, ...]]:
    """OPENAI_API_KEY_CONFIG: ``{"sk-…": [levels]}`` (a single level too)."""
    table = _json(text)
    if not isinstance(table, Mapping) or not table:
        raise ValueError('must be a JSON object like {"sk-...": [0, 1]}')
    out = {}
    for key, levels in table.items():
        if isinstance(levels, int) and not isinstance(levels, bool):
            levels = [levels]
        if (
            not isinstance(levels, list)
            or not levels
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in levels)
        ):
            raise ValueError("every key needs a non-empty list of levels (whole numbers >= 0)")
        out[str(key)] = tuple(sorted(set(levels)))
    return out


def parse_level_models(text: str) -> dict[int, tuple[str, ...]]:
    """LEVEL_MODELS: ``{"1": ["gpt-4o-mini", ...]}``; level 0 may use every model."""
    table = _json(text)
    if not isinstance(table, Mapping):
        raise ValueError('must be a JSON object like {"1": ["gpt-4o-mini"]}')
    out = {}
    for level, models in table.items():
        try:
            number = int(level)
        except (TypeError, ValueError):
            raise ValueError(f"level {level!r} is not a whole number") from None
        if number < 0:
            raise ValueError(f"level {level!r} is negative")
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise ValueError(f"level {level}: must be a list of model names")
        out[number] = tuple(models)
    return out


@dataclass(frozen=True)
class RouteRate:
    """One REQ_RATE_LIMIT rule: keys of ``level`` on paths under ``route``."""

    route: str
    level: int
    rates: tuple[Rate, ...]


def parse_req_rate_limit(text: str) -> tuple[RouteRate, ...]:
    """REQ_RATE_LIMIT: ``{"/v1/chat/completions": [{"level": 1, "limit": "100/2minutes"}]}``."""
    table = _json(text)
    if not isinstance(table, Mapping):
        raise ValueError("must be a JSON object of route -> list of {level, limit}")
    rules = []
    for route, items in table.items():
        if not isinstance(route, str) or not route.startswith("/"):
            raise ValueError(f"route {route!r} must start with '/'")
        if isinstance(items, str):  # openai-forward < 0.8: one limit a route
            items = [{"level": 0, "limit": items}]
        if not isinstance(items, list):
            raise ValueError(f"{route}: must be a list of {{level, limit}} objects")
        for item in items:
            if not isinstance(item, Mapping) or set(item) - {"level", "limit"} or "limit" not in item:
                raise ValueError(f"{route}: each rule is {{\"level\": N, \"limit\": \"5/minute\"}}")
            level = item.get("level", 0)
            if isinstance(level, bool) or not isinstance(level, int) or level < 0:
                raise ValueError(f"{route}: level must be a whole number >= 0")
            if not isinstance(item["limit"], str):
                raise ValueError(f"{route}: limit must be a string like '5/minute'")
            try:
                rates = parse_rates(item["limit"])
            except ValueError as e:
                raise ValueError(f"{route}: {e}") from None
            rules.append(RouteRate(route.rstrip("/") or "/", level, rates))
    return tuple(rules)


def parse_strategy(text: str) -> str:
    """RATE_LIMIT_STRATEGY: ``fixed-window`` or ``moving-window``."""
    value = text.strip().lower()
    if value in ("fixed-window", "moving-window"):
        return value
    if value == "fixed-window-elastic-expiry":
        raise ValueError("fixed-window-elastic-expiry is not supported; use fixed-window")
    raise ValueError(f"{text!r} is not fixed-window or moving-window")


def refuse_token_rate_limit(text: str) -> None:
    """TOKEN_RATE_LIMIT (0.8.1 paced streamed output) is refused by name."""
    raise ValueError(
        "pacing streamed output is not supported; limit tokens with \"tpm\" in KEY_POLICY"
    )


@dataclass(frozen=True)
class Policies:
    """Every policy, validated against the configured keys.

    :ivar keys: label (or ``*``) -> policy.
    :ivar levels: forward-key label -> level (labels not here: level 0).
    :ivar level_models: level -> models it may use (level 0 and levels not
        here: every model).
    :ivar route_rates: REQ_RATE_LIMIT's rules.
    :ivar global_rates: GLOBAL_RATE_LIMIT: the per-key, per-route rate for
        routes and levels no rule names (0.8.1's meaning).
    :ivar moving: RATE_LIMIT_STRATEGY is moving-window (else fixed).
    """

    keys: Mapping[str, KeyPolicy] = field(default_factory=dict)
    levels: Mapping[str, int] = field(default_factory=dict)
    level_models: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    route_rates: tuple[RouteRate, ...] = ()
    global_rates: tuple[Rate, ...] = ()
    moving: bool = False

    @property
    def active(self) -> bool:
        """Whether any request can be refused or counted at all."""
        return bool(self.keys or self.level_models or self.route_rates or self.global_rates)

    def policy_for(self, label: str) -> Optional[KeyPolicy]:
        """The policy of a key label, else the ``*`` entry, else None."""
        policy = self.keys.get(label)
        return policy if policy is not None else self.keys.get(EVERY_KEY)

    def level_allows(self, level: int, model: str) -> bool:
        """Whether keys of ``level`` may use ``model`` (LEVEL_MODELS)."""
        models = self.level_models.get(level) if level else None
        if models is None:
            return True
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in models)

    def request_rates(self, level: int, path: str) -> tuple[tuple[str, tuple[Rate, ...]], ...]:
        """The REQ_RATE_LIMIT rates for a key of ``level`` on ``path``,
        as ``((rule route, rates),)``; GLOBAL_RATE_LIMIT when no rule names
        the route and level; empty for none."""
        for rule in self.route_rates:
            if _under(path, rule.route) and rule.level == level:
                return ((rule.route, rule.rates),) if rule.rates else ()
        if self.global_rates:
            return (("*", self.global_rates),)
        return ()


def _under(path: str, route: str) -> bool:
    return route == "/" or path == route or path.startswith(route + "/")
