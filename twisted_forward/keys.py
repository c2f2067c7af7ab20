"""
The key rules: which credentials go upstream for a client's request.

A credential is looked for in three headers, the places OpenAI-compatible
clients put a key: ``Authorization: Bearer <key>`` (OpenAI and most
others), ``api-key: <key>`` (Azure OpenAI) and ``x-api-key: <key>``
(Anthropic-style gateways).

- A client's own key (anything not starting with ``fk-``) goes upstream
  untouched, in the header it came in.
- A forward key ``fk-…`` that matches a configured one is swapped for a
  default key, in the header it came in; one that matches none is refused
  (401) and never forwarded.  So is any other ``fk-…`` word in those
  headers (``Authorization: fk-…`` without ``Bearer``, ``Basic fk-…``, a
  forward key beside another credential): a forward key never reaches the
  upstream.
- No key: refused when forward keys are configured; otherwise a default
  key, when there is one (the seed's open-relay behaviour, warned about at
  start-up), sent as ``Authorization: Bearer``.

Forward keys are compared as SHA-256 digests with :func:`hmac.compare_digest`
against every configured key, so timing tells nothing about how much of a
guess was right.  Only labels ever leave this module.

The module also masks keys in what the proxy sends back: :func:`scrub`
masks anything shaped like ``sk-…``/``fk-…``, and :class:`SecretMask`
masks the configured default keys exactly, in a stream, without changing
its length.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

from twisted.web.http_headers import Headers

from .config import ForwardKey

#: Label for requests that carry the client's own key.
CLIENT_KEY = "client"
#: Label for keyless requests given a default key.
DEFAULT_KEY = "default"
#: Label for requests sent with no key at all.
NO_KEY = "none"
#: Label for requests refused for their credentials.
REFUSED_KEY = "refused"

AUTHORIZATION = b"authorization"
#: The headers a key may come in, in the order they are looked at.
CREDENTIAL_HEADERS: tuple[bytes, ...] = (AUTHORIZATION, b"api-key", b"x-api-key")

_FORWARD_PREFIX = b"fk-"
_KEY_PATTERN = re.compile(rb"(?<![A-Za-z0-9])(sk|fk)-[A-Za-z0-9_\-*.]{3,}", re.IGNORECASE)


#: The OpenAI error codes that say the key itself is dead (wrong, deleted,
#: or its account deactivated), as the real API sends them with a 401.  A
#: 401 with any other code (``mismatched_organization``, a restricted key's
#: missing scope, ``no_organization``, ``ip_not_authorized``, none at all) is
#: taken as caused by the request or passing, and revokes nothing.
KEY_DEAD_CODES: frozenset[str] = frozenset({"invalid_api_key", "account_deactivated"})


def key_refused(body: bytes) -> bool:
    """Whether a 401's body says the key itself is invalid.

    Conservative: only an OpenAI-shaped error (``{"error": {"code": ...}}``)
    whose code is one of :data:`KEY_DEAD_CODES` counts; anything else (another
    code, no code, a body that is not JSON) does not.
    """
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    error = parsed.get("error") if isinstance(parsed, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return isinstance(code, str) and code in KEY_DEAD_CODES


def looks_keyed(data: bytes) -> bool:
    """Whether :func:`scrub` would change ``data`` (one search, no copy).

    Every match holds ``sk-`` or ``fk-`` in some case, so ``k-`` or ``K-``:
    two substring searches rule most data (an answer's headers, every
    request) out before the pattern, whose look-behind and case folding
    make it try each byte (about 300 machine instructions a byte: 17,000
    for a small answer's headers, 70,000 with the six ``x-ratelimit-*``).
    """
    if b"k-" not in data and b"K-" not in data:
        return False
    return _KEY_PATTERN.search(data) is not None


def scrub(data: bytes) -> bytes:
    """Mask anything in ``data`` that looks like an OpenAI or forward key.

    ``sk-proj-abc…wxyz`` becomes ``sk-***``: what the upstream echoes of a
    rejected key (a prefix and the last characters) is gone as well.  Data
    with neither ``k-`` nor ``K-`` is returned as it is, without the
    pattern's byte-by-byte search (see :func:`looks_keyed`).
    """
    if b"k-" not in data and b"K-" not in data:
        return data
    return _KEY_PATTERN.sub(lambda m: m.group(1) + b"-***", data)


@dataclass(frozen=True)
class KeyDecision:
    """What to do with one request's credentials.

    :ivar label: a non-secret name for logs and metrics.
    :ivar send: the client's own credentials, ``(header, value)`` pairs to
        send upstream untouched.
    :ivar substituted: True when the proxy puts one of its default keys in,
        so answers must be scrubbed of anything echoing it and another
        default key may be tried on failure.
    :ivar carrier: the header a substituted default key goes in.
    :ivar refusal: None, or the message of a 401 to answer instead.
    :ivar level: the forward key's level (openai-forward 0.8's
        FORWARD_KEY_CONFIG): which default keys it may spend and which
        models it may use.  0 for every other request.
    """

    label: str
    send: tuple[tuple[bytes, bytes], ...] = field(default=(), repr=False)
    substituted: bool = False
    carrier: bytes = AUTHORIZATION
    refusal: Optional[str] = None
    level: int = 0

    @property
    def authorization(self) -> Optional[bytes]:
        """The client's own Authorization value passed on, if any."""
        for name, value in self.send:
            if name == AUTHORIZATION:
                return value
        return None


def credential_value(carrier: bytes, key: bytes) -> bytes:
    """How ``key`` is written in the header ``carrier``."""
    return b"Bearer " + key if carrier == AUTHORIZATION else key


@dataclass(frozen=True)
class KeyHealth:
    """One default key's state, by position, for the admin page.

    :ivar label: ``default#N``, never the key.
    :ivar state: ``ok``, ``resting`` (after a 429, until ``until``) or
        ``revoked`` (the upstream refused it with a 401).
    :ivar until: for a resting key, the clock time its rest ends.
    """

    label: str
    state: str
    until: Optional[float] = None


class DefaultKeys:
    """The default keys, handed out in turn.

    Keys the upstream declared dead (a 401 whose code is in
    :data:`KEY_DEAD_CODES`) leave the rotation; keys that hit a rate limit
    sit out until their cool-down ends.

    :param levels: per key, the forward-key levels it serves (openai-forward
        0.8's OPENAI_API_KEY_CONFIG); None (for a key, or for all) serves
        every level.
    """

    def __init__(
        self,
        keys: Sequence[str],
        clock: Callable[[], float],
        levels: Optional[Sequence[Optional[frozenset[int]]]] = None,
    ) -> None:
        self._keys = [k.encode("ascii") for k in keys]
        #: level -> the keys serving it, for levels some key is limited to.
        self._by_level: dict[int, list[int]] = {}
        self._unlimited = [i for i in range(len(keys)) if not levels or levels[i] is None]
        if levels and any(served is not None for served in levels):
            for level in set().union(*(s for s in levels if s is not None)):
                self._by_level[level] = [
                    i for i, served in enumerate(levels) if served is None or level in served
                ]
        self._next_by_level: dict[int, int] = {}
        self._clock = clock
        self._next = 0
        self._resting: dict[int, float] = {}
        self._revoked: set[int] = set()
        #: Told of every rest and revocation this process decides.
        self._observers: list[Callable[[int, Optional[float]], None]] = []
        n = len(self._keys)
        #: The keys as a mask wants them, made once (a mask is made per answer).
        self._mask_order = _Secrets.of(self._keys)
        #: The order of the keys for a request starting at each one.
        self._rotations = [tuple((s + i) % n for i in range(n)) for s in range(n)]

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"<DefaultKeys: {len(self._keys)} key(s)>"

    def _usable(self, index: int, now: float) -> bool:
        if index in self._revoked:
            return False
        until = self._resting.get(index)
        return until is None or until <= now

    def states(self) -> dict[str, int]:
        """How many keys are ``active``, ``resting`` (rate-limited) and
        ``revoked`` (refused by the upstream) now."""
        now = self._clock()
        revoked = len(self._revoked)
        active = sum(1 for i in range(len(self._keys)) if self._usable(i, now))
        return {
            "active": active,
            "resting": len(self._keys) - revoked - active,
            "revoked": revoked,
        }

    def health(self) -> list[KeyHealth]:
        """Each key's state now, in position order."""
        now = self._clock()
        out = []
        for index in range(len(self._keys)):
            until = self._resting.get(index)
            if index in self._revoked:
                out.append(KeyHealth(self.label(index), "revoked"))
            elif until is not None and until > now:
                out.append(KeyHealth(self.label(index), "resting", until))
            else:
                out.append(KeyHealth(self.label(index), "ok"))
        return out

    def order(self, level: Optional[int] = None) -> list[int]:
        """Key indices to try for one request: the next in turn first.

        With ``level``, only the keys serving that level (when keys are
        limited to levels at all).  Resting keys come last (better a
        rate-limited key than none); revoked keys not at all: empty when
        every key is revoked, and the request must then not go upstream.
        """
        if self._by_level and level is not None:
            serving = self._by_level.get(level, self._unlimited)
            if not serving:
                return []
            start = self._next_by_level.get(level, 0) % len(serving)
            self._next_by_level[level] = start + 1
            rotation = serving[start:] + serving[:start]
        else:
            n = len(self._keys)
            if not n:
                return []
            start = self._next
            self._next = (start + 1) % n
            rotation = list(self._rotations[start])
        if not self._resting and not self._revoked:
            return rotation
        now = self._clock()
        if self._resting:
            # Forget rests that are over (and so get the fast path back).
            self._resting = {i: t for i, t in self._resting.items() if t > now}
        ready = [i for i in rotation if self._usable(i, now)]
        resting = [i for i in rotation if i not in self._revoked and i not in ready]
        return ready + resting

    def credential(self, index: int, carrier: bytes = AUTHORIZATION) -> tuple[bytes, bytes]:
        """The ``(header, value)`` that sends key ``index`` in ``carrier``."""
        return carrier, credential_value(carrier, self._keys[index])

    def label(self, index: int) -> str:
        """A non-secret name for key ``index``: its position."""
        return f"default#{index}"

    def rest(self, index: int, seconds: float) -> None:
        """Take key ``index`` out of the front of the rotation for a while."""
        until = self._clock() + seconds
        self._resting[index] = until
        for observer in list(self._observers):
            observer(index, until)

    def revoke(self, index: int) -> None:
        """The upstream refused key ``index``: stop using it."""
        self._revoked.add(index)
        for observer in list(self._observers):
            observer(index, None)

    def observe(self, observer: Callable[[int, Optional[float]], None]) -> None:
        """Call ``observer(index, until)`` whenever this process rests key
        ``index`` until ``until``, or revokes it (``until`` None), so other
        processes can be told (:mod:`twisted_forward.policies.health`)."""
        self._observers.append(observer)

    def apply(self, index: int, until: Optional[float]) -> bool:
        """Another process rested key ``index`` until ``until`` (or revoked
        it, None): do the same here, telling no observer.  True if this
        process did not know yet."""
        if until is None:
            if index in self._revoked:
                return False
            self._revoked.add(index)
            return True
        if until > self._resting.get(index, 0.0):
            self._resting[index] = until
            return True
        return False

    @property
    def revoked(self) -> frozenset[int]:
        """Indices of keys taken out of the rotation."""
        return frozenset(self._revoked)

    def mask(self) -> "SecretMask":
        """A fresh mask of these keys, for one answer."""
        return SecretMask(self._mask_order)


class ForwardKeys:
    """Constant-time lookup of forward keys, by digest.

    Only the digests are kept: the keys themselves are not reachable from
    this object.
    """

    def __init__(self, keys: Sequence[ForwardKey]) -> None:
        self._entries = [
            (hashlib.sha256(k.key.encode("utf-8")).digest(), k.label) for k in keys
        ]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __repr__(self) -> str:
        return f"<ForwardKeys: {', '.join(label for _, label in self._entries)}>"

    def lookup(self, candidate: bytes) -> Optional[str]:
        """The label of the forward key equal to ``candidate``, or None.

        Fixed-length digests are compared with :func:`hmac.compare_digest`,
        against every configured key whatever matched, so the time taken
        depends on the number of keys only: not on the candidate's length,
        nor on how many of its characters were right, nor on which key it is.
        """
        digest = hashlib.sha256(candidate).digest()
        found: Optional[str] = None
        for key_digest, label in self._entries:
            if hmac.compare_digest(digest, key_digest) and found is None:
                found = label
        return found


def _forward_shaped(word: bytes) -> bool:
    return word[:3].lower() == _FORWARD_PREFIX


class _Credential:
    """What one credential header holds: nothing, a forward key, the
    client's own key, or a forward key in a form we do not take."""

    NONE = "none"
    FORWARD = "forward"
    OWN = "own"
    BAD = "bad"


def parse_credential(header: bytes, value: bytes) -> tuple[str, bytes]:
    """Classify one credential header's value.

    :returns: ``(kind, token)``: the forward key for ``FORWARD``, the value
        as sent for ``OWN``, ``b""`` otherwise.
    """
    words = value.split()
    if not words:
        return _Credential.NONE, b""
    if header == AUTHORIZATION and words[0].lower() == b"bearer":
        if len(words) == 1:
            return _Credential.NONE, b""
        if len(words) == 2 and words[1].startswith(_FORWARD_PREFIX):
            return _Credential.FORWARD, words[1]
    elif header != AUTHORIZATION and len(words) == 1 and words[0].startswith(_FORWARD_PREFIX):
        return _Credential.FORWARD, words[0]
    if any(_forward_shaped(w) for w in words):
        return _Credential.BAD, b""
    return _Credential.OWN, value


def _refuse(message: str) -> KeyDecision:
    return KeyDecision(REFUSED_KEY, refusal=message)


class KeyRules:
    """Decides, per request, which key goes upstream.

    :param levels: forward-key label -> level (labels not there: level 0).
    :param reserved: secrets that open something else (the admin key): a
        request that carries one is refused, never forwarded.
    """

    def __init__(
        self,
        default: DefaultKeys,
        forward: ForwardKeys,
        levels: Optional[Mapping[str, int]] = None,
        reserved: Sequence[str] = (),
    ) -> None:
        self.default = default
        self.forward = forward
        #: forward-key label -> level (labels not here: level 0).
        self.levels: Mapping[str, int] = levels or {}
        self._reserved = [hashlib.sha256(s.encode("utf-8")).digest() for s in reserved if s]

    def _is_reserved(self, value: bytes) -> bool:
        """Whether a word of ``value`` is a reserved secret (constant time per word)."""
        found = False
        for word in value.split():
            digest = hashlib.sha256(word).digest()
            for reserved in self._reserved:
                found |= hmac.compare_digest(digest, reserved)
        return found

    @property
    def open_relay(self) -> bool:
        """True when anyone who reaches the port spends the default keys."""
        return bool(len(self.default)) and not self.forward

    def decide(self, headers: Headers) -> KeyDecision:
        """Apply the key rules to a request's headers."""
        forward: list[tuple[bytes, bytes]] = []
        own: list[tuple[bytes, bytes]] = []
        for name in CREDENTIAL_HEADERS:
            values = headers.getRawHeaders(name)
            if not values:
                continue
            if len(values) > 1:
                return _refuse(f"Send one {name.decode()} header, not several.")
            kind, token = parse_credential(name, values[0])
            if kind == _Credential.BAD:
                return _refuse(
                    "Send a forward key as 'Authorization: Bearer fk-…' "
                    "(or alone in an api-key or x-api-key header)."
                )
            if kind == _Credential.FORWARD:
                forward.append((name, token))
            elif kind == _Credential.OWN:
                if self._reserved and self._is_reserved(token):
                    return _refuse("This key is not accepted here.")
                own.append((name, token))
        if forward:
            if len(forward) + len(own) > 1:
                return _refuse("Send a forward key alone, in one header.")
            [(carrier, token)] = forward
            label = self.forward.lookup(token)
            if label is None:
                return _refuse("Incorrect forward key provided.")
            return KeyDecision(
                label, substituted=True, carrier=carrier, level=self.levels.get(label, 0)
            )
        if own:
            return KeyDecision(CLIENT_KEY, send=tuple(own))
        if self.forward:
            return _refuse("This proxy needs an API key (a forward key fk-…).")
        if len(self.default):
            return KeyDecision(DEFAULT_KEY, substituted=True)
        return KeyDecision(NO_KEY)


class _Secrets(tuple[bytes, ...]):
    """Secrets ordered for masking (longest first, no empties or repeats)."""

    @classmethod
    def of(cls, secrets: Iterable[bytes]) -> "_Secrets":
        return cls(sorted({s for s in secrets if s}, key=len, reverse=True))


class SecretMask:
    """Masks exact secrets in a byte stream, keeping its length.

    Each occurrence of a secret becomes its first three characters (none,
    for a secret shorter than 12) followed by ``*``.  A chunk that ends with what could be the start of a secret
    keeps those bytes back until the next chunk shows whether it is one, so
    a secret split across chunks is masked too; anything else (an SSE event
    ending in a blank line, say) passes at once.
    """

    __slots__ = ("_secrets", "_held",)

    def __init__(self, secrets: Iterable[bytes]) -> None:
        self._secrets = secrets if isinstance(secrets, _Secrets) else _Secrets.of(secrets)
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """Mask ``chunk``; returns what may be sent now."""
        buf = self._held + chunk
        if not self._secrets:
            self._held = b""
            return buf
        buf = self._mask(buf)
        keep = self._partial(buf)
        self._held = buf[len(buf) - keep:] if keep else b""
        return buf[: len(buf) - keep]

    def touches(self, data: bytes) -> bool:
        """Whether ``data`` holds one of the secrets."""
        return any(secret in data for secret in self._secrets)

    def flush(self) -> bytes:
        """The end of the stream: what was held back."""
        held, self._held = self._held, b""
        return held

    def _mask(self, buf: bytes) -> bytes:
        out: Optional[bytearray] = None
        for secret in self._secrets:
            i = (out or buf).find(secret)
            while i >= 0:
                if out is None:
                    out = bytearray(buf)
                shown = 3 if len(secret) >= 12 else 0
                out[i + shown : i + len(secret)] = b"*" * (len(secret) - shown)
                i = out.find(secret, i + 1)
        return buf if out is None else bytes(out)

    def _partial(self, buf: bytes) -> int:
        """Length of the longest end of ``buf`` that starts some secret."""
        best = 0
        for secret in self._secrets:
            first = secret[:1]
            i = buf.find(first, max(0, len(buf) - len(secret) + 1))
            while i >= 0:
                if secret.startswith(buf[i:]):
                    best = max(best, len(buf) - i)
                    break
                i = buf.find(first, i + 1)
        return best
