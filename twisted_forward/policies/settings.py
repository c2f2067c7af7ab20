"""
The policy settings, and how they combine with the key settings.

:data:`POLICY_SETTINGS` rows join :data:`twisted_forward.config.SETTINGS`
(each has an environment variable, a ``.env`` entry and a twistd option);
:func:`build` turns the parsed values into one :class:`PolicyConfig` and
folds openai-forward 0.8.1's key tables into the forward and default keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional

from ..redis_link import check_redis_url
from .prices import Price, load_prices, parse_price
from .rules import (
    EVERY_KEY,
    KeyPolicy,
    Policies,
    parse_api_key_config,
    parse_forward_key_config,
    parse_key_policy_json,
    parse_level_models,
    parse_rates,
    parse_req_rate_limit,
    parse_strategy,
    read_key_policy_file,
    refuse_token_rate_limit,
)

#: Labels a KEY_POLICY entry may name besides the forward keys' own:
#: keyless requests given a default key (an open relay).
BUILTIN_LABELS = ("default",)


def parse_redis_url(value: str) -> str:
    """A ``redis://``, ``rediss://`` or ``unix://`` URL (Redis or Valkey)."""
    return check_redis_url(value)


def parse_req_rate_limit_backend(value: str) -> str:
    """0.8.1's REQ_RATE_LIMIT_BACKEND: a Redis URL (``memory://``: none)."""
    if value.strip().lower() in ("", "memory://"):
        return ""
    return parse_redis_url(value)


def parse_store_timeout(value: str) -> float:
    """LIMITS_STORE_TIMEOUT: a positive number of seconds, at most 60."""
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number of seconds") from None
    if not 0 < seconds <= 60:
        raise ValueError(f"{value!r} must be more than 0 and at most 60 seconds")
    return seconds


def parse_failure_mode(value: str) -> str:
    """LIMITS_ON_STORE_FAILURE: ``open`` or ``closed``."""
    mode = value.strip().lower()
    if mode not in ("open", "closed"):
        raise ValueError(f"{value!r} is not open or closed")
    return mode


def parse_prices_file(value: str) -> str:
    """A readable, valid price table (read again when the proxy starts)."""
    path = value.strip()
    try:
        with open(path, encoding="utf-8") as f:
            load_prices(f.read())
    except OSError as e:
        raise ValueError(f"cannot read {path!r} ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path!r} is not UTF-8 text") from None
    return path


def _token_rate_limit(value: str) -> None:
    if value.strip():
        refuse_token_rate_limit(value)


#: (env, option, parse, help): rows of the settings table.
POLICY_SETTINGS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("KEY_POLICY", "key-policy", parse_key_policy_json,
     'Per forward-key label (and "*"): models, rpm, tpm, max_parallel, '
     "tokens_per_day/month, usd_per_day/month, as JSON."),
    ("KEY_POLICY_FILE", "key-policy-file", read_key_policy_file,
     "KEY_POLICY read from this JSON (or .toml) file."),
    ("PRICES_FILE", "prices-file", parse_prices_file,
     "JSON price table (USD per 1M tokens) replacing the built-in one."),
    ("UNKNOWN_MODEL_PRICE", "unknown-model-price", parse_price,
     "USD per 1M input,output tokens for models not in the price table "
     "[default: 10,30]."),
    ("REDIS_URL", "redis-url", parse_redis_url,
     "Redis/Valkey (redis://, rediss://, unix://) holding limits shared by instances."),
    ("LIMITS_STORE_TIMEOUT", "limits-store-timeout", parse_store_timeout,
     "Seconds a shared store (Redis, the --workers supervisor) may take to answer "
     "[default: 0.5]."),
    ("LIMITS_ON_STORE_FAILURE", "limits-on-store-failure", parse_failure_mode,
     "open (serve, count locally, warn) or closed (503) when the store is down "
     "[default: closed]."),
    # openai-forward 0.8.1's names, with 0.8.1's meaning.
    ("OPENAI_API_KEY_CONFIG", "api-key-config", parse_api_key_config,
     'openai-forward 0.8: {"sk-…": [levels]}, default keys and the levels they serve.'),
    ("FORWARD_KEY_CONFIG", "forward-key-config", parse_forward_key_config,
     'openai-forward 0.8: {"fk-…": level}, forward keys and their level.'),
    ("LEVEL_MODELS", "level-models", parse_level_models,
     'openai-forward 0.8: {"1": ["gpt-4o-mini"]}, the models of each level (0: all).'),
    ("REQ_RATE_LIMIT", "req-rate-limit", parse_req_rate_limit,
     'openai-forward 0.8: {"/v1/chat/completions": [{"level": 1, "limit": "100/2minutes"}]}.'),
    ("GLOBAL_RATE_LIMIT", "global-rate-limit", parse_rates,
     "openai-forward 0.8: the request rate for routes REQ_RATE_LIMIT does not name "
     "[default: inf]."),
    ("RATE_LIMIT_STRATEGY", "rate-limit-strategy", parse_strategy,
     "fixed-window or moving-window [default: fixed-window]."),
    ("REQ_RATE_LIMIT_BACKEND", "req-rate-limit-backend", parse_req_rate_limit_backend,
     "openai-forward 0.8: a redis:// URL, the same as REDIS_URL."),
    ("TOKEN_RATE_LIMIT", "token-rate-limit", _token_rate_limit,
     "openai-forward 0.8 (output pacing): refused; use tpm in KEY_POLICY."),
)

#: The fallback price when UNKNOWN_MODEL_PRICE is not set.
DEFAULT_UNKNOWN_PRICE = Price(10.0, 30.0, 10.0)


@dataclass(frozen=True)
class PolicyConfig:
    """Everything the policies need, validated.

    :ivar policies: the rules.
    :ivar key_levels: per default key (same order as the config's
        ``default_keys``), the levels it serves; None: every level.
    :ivar prices_file: the price table to use instead of the built-in one.
    :ivar unknown_price: the price of models the table does not know.
    :ivar redis_url: where shared counters live (None: this process, or the
        ``--workers`` supervisor).
    :ivar on_store_failure: ``open`` or ``closed``.
    :ivar store_timeout: seconds a shared store may take to answer.
    """

    policies: Policies = field(default_factory=Policies)
    key_levels: tuple[Optional[frozenset[int]], ...] = ()
    prices_file: Optional[str] = None
    unknown_price: Price = DEFAULT_UNKNOWN_PRICE
    redis_url: Optional[str] = field(default=None, repr=False)
    on_store_failure: str = "closed"
    store_timeout: float = 0.5

    @property
    def active(self) -> bool:
        """Whether any request is checked at all."""
        return self.policies.active

    def describe(self) -> list[str]:
        """Start-up lines saying what is limited (labels only, no key)."""
        p = self.policies
        if not p.active:
            return []
        parts = []
        if p.keys:
            parts.append("key policies for " + ", ".join(sorted(p.keys)))
        if p.levels:
            parts.append(f"{len(p.levels)} forward key(s) with levels")
        if p.level_models:
            parts.append("models limited for level(s) " + ", ".join(map(str, sorted(p.level_models))))
        if p.route_rates or p.global_rates:
            parts.append("request rates (" + ("moving" if p.moving else "fixed") + " windows)")
        where = (
            f"Redis (when it is down: {self.on_store_failure})"
            if self.redis_url else "this process's memory"
        )
        return ["policies: " + "; ".join(parts) + f"; counted in {where}"]


class PolicyConfigError(ValueError):
    """A policy setting is wrong; ``setting`` names it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def build(
    parsed: Mapping[str, Any],
    forward_keys: tuple[Any, ...],
    default_keys: tuple[str, ...],
    parse_forward_keys: Callable[[str], tuple[Any, ...]],
) -> tuple[PolicyConfig, tuple[Any, ...], tuple[str, ...]]:
    """Combine the parsed settings (env name -> value).

    :param parse_forward_keys: FORWARD_KEY's parser, for FORWARD_KEY_CONFIG's
        keys (the same rules and labels).
    :returns: the policy config, and the forward and default keys with
        FORWARD_KEY_CONFIG's and OPENAI_API_KEY_CONFIG's added.
    :raises PolicyConfigError: naming the setting at fault.
    """
    levels: dict[str, int] = {}
    fk_config: dict[str, int] = parsed.get("FORWARD_KEY_CONFIG") or {}
    if fk_config:
        try:
            extra = parse_forward_keys(" ".join(fk_config))
        except ValueError as e:
            raise PolicyConfigError("FORWARD_KEY_CONFIG", str(e)) from None
        keys = {k.key for k in forward_keys}
        labels = {k.label for k in forward_keys}
        renamed = []
        for position, (written, key) in enumerate(zip(fk_config, extra), len(forward_keys) + 1):
            if key.key in keys:
                raise PolicyConfigError(
                    "FORWARD_KEY_CONFIG", f"key {key.label} is also in FORWARD_KEY"
                )
            if key.label in labels:
                if ":" in written:
                    raise PolicyConfigError(
                        "FORWARD_KEY_CONFIG", f"label {key.label} is also in FORWARD_KEY"
                    )
                key = replace(key, label=f"fk#{position}")  # numbered after FORWARD_KEY's
            labels.add(key.label)
            levels[key.label] = fk_config[written]
            renamed.append(key)
        forward_keys = forward_keys + tuple(renamed)

    key_levels: list[Optional[frozenset[int]]] = [None] * len(default_keys)
    sk_config: dict[str, tuple[int, ...]] = parsed.get("OPENAI_API_KEY_CONFIG") or {}
    for key, served in sk_config.items():
        if key.startswith("fk-"):
            raise PolicyConfigError(
                "OPENAI_API_KEY_CONFIG", "a forward key (fk-…) belongs in FORWARD_KEY_CONFIG"
            )
        if key in default_keys:
            key_levels[default_keys.index(key)] = frozenset(served)
        else:
            default_keys = default_keys + (key,)
            key_levels.append(frozenset(served))
    used = dict(levels)
    for key in forward_keys:
        used.setdefault(key.label, 0)
    for label, level in used.items():
        if not any(s is None or level in s for s in key_levels):
            raise PolicyConfigError(
                "FORWARD_KEY_CONFIG" if label in levels else "OPENAI_API_KEY_CONFIG",
                f"{label} has level {level}, which no default key serves",
            )

    if "KEY_POLICY" in parsed and "KEY_POLICY_FILE" in parsed:
        raise PolicyConfigError("KEY_POLICY_FILE", "set KEY_POLICY or KEY_POLICY_FILE, not both")
    setting = "KEY_POLICY_FILE" if "KEY_POLICY_FILE" in parsed else "KEY_POLICY"
    table: dict[str, KeyPolicy] = parsed.get(setting) or {}
    known = [k.label for k in forward_keys] + list(BUILTIN_LABELS) + [EVERY_KEY]
    for label in table:
        if label not in known:
            raise PolicyConfigError(setting, f"{label}: no forward key has this label")

    redis = parsed.get("REDIS_URL") or None
    backend = parsed.get("REQ_RATE_LIMIT_BACKEND") or None
    if redis and backend and redis != backend:
        raise PolicyConfigError(
            "REQ_RATE_LIMIT_BACKEND", "differs from REDIS_URL; set one of them"
        )
    policies = Policies(
        keys=table,
        levels=levels,
        level_models=parsed.get("LEVEL_MODELS") or {},
        route_rates=parsed.get("REQ_RATE_LIMIT") or (),
        global_rates=parsed.get("GLOBAL_RATE_LIMIT") or (),
        moving=parsed.get("RATE_LIMIT_STRATEGY") == "moving-window",
    )
    config = PolicyConfig(
        policies=policies,
        key_levels=tuple(key_levels),
        prices_file=parsed.get("PRICES_FILE"),
        unknown_price=parsed.get("UNKNOWN_MODEL_PRICE") or DEFAULT_UNKNOWN_PRICE,
        redis_url=redis or backend,
        on_store_failure=parsed.get("LIMITS_ON_STORE_FAILURE", "closed"),
        store_timeout=parsed.get("LIMITS_STORE_TIMEOUT", 0.5),
    )
    return config, forward_keys, default_keys

