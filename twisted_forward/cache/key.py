"""
Which requests the cache takes, and the key their answers are stored under.

A request is examined only if its body is at most ``max_request_body``
bytes (read from a bounded prefix: a large upload is never read whole).  It
opts in with ``"caching": true`` in its JSON body, or by the default
(DEFAULT_REQUEST_CACHING_VALUE); the field is taken out before the body goes
upstream, since the real API refuses unknown fields.

The key is a SHA-256 over the credential's partition, the route (its prefix
and upstream), the path and query, and the canonical body: its keys sorted,
without ``caching``, ``user`` and ``stream_options`` (which do not change
the answer's content).  ``stream`` stays in: a streamed and a whole answer
are different bytes.

Partitions: a forward key's partition is a hash of the key itself (not its
label: a label given by position would move to another tenant when the
list is reordered); a client's own key likewise; keyless requests given a
default key share ``default``; with CACHE_SHARED every request shares one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import IO, Any, Mapping, Optional, Sequence

from ..config import ForwardKey
from ..keys import CLIENT_KEY, DEFAULT_KEY, KeyDecision

#: Body fields left out of the key.
IGNORED_FIELDS = ("caching", "user", "stream_options")
#: The version of the key scheme; a change makes every old entry a miss.
KEY_VERSION = b"tfc1"

_PARTITION_SALT = b"twisted-forward cache partition\0"


def read_prefix(content: Optional[IO[bytes]], limit: int) -> Optional[bytes]:
    """The whole body if it is at most ``limit`` bytes, else None.

    Reads at most ``limit + 1`` bytes and puts the file back at its start.
    """
    if content is None:
        return b""
    content.seek(0)
    data = content.read(limit + 1)
    content.seek(0)
    if len(data) > limit:
        return None
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True)
class Examined:
    """What the cache makes of a request body.

    :ivar reason: why it is not cacheable (``""`` when it is): ``too_large``,
        ``not_json``, ``not_requested``, ``sampled`` (n > 1, or temperature
        > 0 without seed), ``tools``.
    :ivar canonical: the canonical body, when cacheable.
    :ivar body: the body to send upstream instead of the client's (the
        ``caching`` field taken out), or None to send it unchanged.
    :ivar stream: the request asked for a streamed answer.
    :ivar wants_usage: it asked for ``stream_options.include_usage``.
    """

    reason: str
    canonical: Optional[bytes] = None
    body: Optional[bytes] = None
    stream: bool = False
    wants_usage: bool = False

    @property
    def cacheable(self) -> bool:
        """Whether the answer may come from, and go to, the cache."""
        return not self.reason


def examine(
    body: Optional[bytes], default_caching: bool, nondeterministic: bool
) -> Examined:
    """Decide whether a request body is cacheable.

    :param body: the whole body, or None when it was over the bound.
    :param default_caching: a body without ``caching`` opts in.
    :param nondeterministic: also take sampled requests and tool calls.
    """
    if body is None:
        return Examined("too_large")
    if not default_caching and b'"caching"' not in body:
        # The usual request, not asking: no JSON parsing on the hot path.
        return Examined("not_requested")
    try:
        obj = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return Examined("not_json")
    if not isinstance(obj, dict):
        return Examined("not_json")
    replacement: Optional[bytes] = None
    if "caching" in obj:
        requested = obj.pop("caching") is True
        replacement = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    else:
        requested = default_caching
    stream = obj.get("stream") is True
    if not requested:
        return Examined("not_requested", body=replacement, stream=stream)
    if not nondeterministic:
        reason = _nondeterminism(obj)
        if reason:
            return Examined(reason, body=replacement, stream=stream)
    canonical = json.dumps(
        {k: v for k, v in obj.items() if k not in IGNORED_FIELDS},
        sort_keys=True, ensure_ascii=False, separators=(",", ":"),
    ).encode()
    options = obj.get("stream_options")
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    return Examined("", canonical, replacement, stream, wants_usage)


def without_caching(body: bytes) -> bytes:
    """``body`` (a JSON object) without its ``caching`` field; unchanged if
    it has none or is not JSON."""
    try:
        obj = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return body
    if not isinstance(obj, dict) or "caching" not in obj:
        return body
    del obj["caching"]
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _nondeterminism(obj: Mapping[str, Any]) -> str:
    """Why a request asks for an answer that should differ each time, or ``""``.

    An absent ``temperature`` is not counted as sampling: a client that
    sends ``caching: true`` without one asks for a repeatable answer.
    """
    n = obj.get("n")
    if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 1:
        return "sampled"
    temperature = obj.get("temperature")
    if (
        isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
        and temperature > 0 and obj.get("seed") is None
    ):
        return "sampled"
    if obj.get("tools") or obj.get("functions"):
        return "tools"
    return ""


def cache_key(partition: str, route: str, target: bytes, canonical: bytes) -> bytes:
    """The store key (hex, ASCII) of an answer.

    :param route: the route's identity (prefix and upstream).
    :param target: the path and query under the route.
    """
    digest = hashlib.sha256()
    for part in (KEY_VERSION, partition.encode(), route.encode(), target, canonical):
        digest.update(b"%d:" % len(part))
        digest.update(part)
    return digest.hexdigest().encode("ascii")


def _credential_hash(kind: bytes, secret: bytes) -> str:
    return hashlib.sha256(_PARTITION_SALT + kind + b"\0" + secret).hexdigest()[:32]


class Partitions:
    """Names the cache partition of a request's credential.

    :param forward_keys: the configured forward keys (their label names the
        key a decision was made for).
    :param shared: every credential shares one partition (CACHE_SHARED).
    """

    SHARED = "shared"

    def __init__(self, forward_keys: Sequence[ForwardKey], shared: bool) -> None:
        self.shared = shared
        self._forward = {
            fk.label: "fk:" + _credential_hash(b"fk", fk.key.encode()) for fk in forward_keys
        }

    def of(self, decision: KeyDecision) -> str:
        """The partition of the request ``decision`` was made for."""
        if self.shared:
            return self.SHARED
        if decision.label == CLIENT_KEY:
            secret = b"\0".join(sorted(value for _, value in decision.send))
            return "sk:" + _credential_hash(b"sk", secret)
        if decision.label == DEFAULT_KEY:
            return "default"
        forward = self._forward.get(decision.label)
        if forward is not None:
            return forward
        return decision.label  # "none": no key at all
