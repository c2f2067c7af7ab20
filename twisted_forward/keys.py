"""
The key rules: which Authorization goes upstream for a client's request.

- A client's own key (a bearer token not starting with ``fk-``, or any other
  scheme) goes upstream untouched.
- A forward key ``fk-…`` that matches a configured one is swapped for a
  default key; one that matches none is refused (401), never forwarded.
- No key: refused when forward keys are configured; otherwise a default key,
  when there is one (the seed's open-relay behaviour, warned about at start).

Forward keys are compared as SHA-256 digests with :func:`hmac.compare_digest`
against every configured key, so timing tells nothing about how much of a
guess was right.  Only labels ever leave this module.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .config import ForwardKey

#: Label for requests that carry the client's own key.
CLIENT_KEY = "client"
#: Label for keyless requests given a default key.
DEFAULT_KEY = "default"
#: Label for requests sent with no key at all.
NO_KEY = "none"


@dataclass(frozen=True)
class KeyDecision:
    """What to do with one request's credentials.

    :ivar authorization: the Authorization value to send upstream, or None.
    :ivar label: a non-secret name for logs and metrics.
    :ivar substituted: True when the proxy put one of its own keys in, so
        answers must be scrubbed of anything echoing it and another default
        key may be tried on failure.
    :ivar refusal: None, or the message of a 401 to answer instead.
    """

    authorization: Optional[bytes]
    label: str
    substituted: bool = False
    refusal: Optional[str] = None


class DefaultKeys:
    """The default keys, handed out in turn.

    Keys that the upstream rejected (401) leave the rotation; keys that hit a
    rate limit sit out until their cool-down ends.
    """

    def __init__(self, keys: Sequence[str], clock: Callable[[], float]) -> None:
        self._keys = [k.encode("ascii") for k in keys]
        self._clock = clock
        self._next = 0
        self._resting: dict[int, float] = {}
        self._revoked: set[int] = set()

    def __len__(self) -> int:
        return len(self._keys)

    def _usable(self, index: int, now: float) -> bool:
        if index in self._revoked:
            return False
        until = self._resting.get(index)
        return until is None or until <= now

    def order(self) -> list[int]:
        """Key indices to try for one request: the next in turn first.

        Resting keys come last (better a rate-limited key than none);
        revoked keys not at all.
        """
        n = len(self._keys)
        if not n:
            return []
        start = self._next
        self._next = (start + 1) % n
        now = self._clock()
        rotation = [(start + i) % n for i in range(n)]
        ready = [i for i in rotation if self._usable(i, now)]
        resting = [i for i in rotation if i not in self._revoked and i not in ready]
        return ready + resting

    def bearer(self, index: int) -> bytes:
        """The Authorization value for key ``index``."""
        return b"Bearer " + self._keys[index]

    def label(self, index: int) -> str:
        """A non-secret name for key ``index``: its position."""
        return f"default#{index}"

    def rest(self, index: int, seconds: float) -> None:
        """Take key ``index`` out of the front of the rotation for a while."""
        self._resting[index] = self._clock() + seconds

    def revoke(self, index: int) -> None:
        """The upstream refused key ``index``: stop using it."""
        self._revoked.add(index)

    @property
    def revoked(self) -> frozenset[int]:
        """Indices of keys taken out of the rotation."""
        return frozenset(self._revoked)


class ForwardKeys:
    """Constant-time lookup of forward keys, by digest."""

    def __init__(self, keys: Sequence[ForwardKey]) -> None:
        self._entries = [
            (hashlib.sha256(k.key.encode("utf-8")).digest(), k.label) for k in keys
        ]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def lookup(self, candidate: bytes) -> Optional[str]:
        """The label of the forward key equal to ``candidate``, or None.

        Every configured key is compared, whatever matched, so the time taken
        depends on the number of keys only.
        """
        digest = hashlib.sha256(candidate).digest()
        found: Optional[str] = None
        for key_digest, label in self._entries:
            if hmac.compare_digest(digest, key_digest) and found is None:
                found = label
        return found


def bearer_token(values: Optional[Sequence[bytes]]) -> Optional[bytes]:
    """The token of a request's single ``Authorization: Bearer <token>``.

    None when there is no credential (no header, an empty one, or ``Bearer``
    with no token); ``b""`` for a credential in another scheme, which is the
    client's own business.
    """
    if not values:
        return None
    value = values[0].strip()
    scheme, _, token = value.partition(b" ")
    if not scheme:
        return None
    if scheme.lower() != b"bearer":
        return b""
    return token.strip() or None


class KeyRules:
    """Decides, per request, which key goes upstream."""

    def __init__(self, default: DefaultKeys, forward: ForwardKeys) -> None:
        self.default = default
        self.forward = forward

    @property
    def open_relay(self) -> bool:
        """True when anyone who reaches the port spends the default keys."""
        return bool(len(self.default)) and not self.forward

    def decide(self, authorization: Optional[Sequence[bytes]]) -> KeyDecision:
        """Apply the key rules to a request's Authorization header(s)."""
        if authorization is not None and len(authorization) > 1:
            return KeyDecision(
                None, NO_KEY, refusal="Send one Authorization header, not several."
            )
        token = bearer_token(authorization)
        if token is None:
            if self.forward:
                return KeyDecision(
                    None, NO_KEY, refusal="This proxy needs an API key (a forward key fk-…)."
                )
            if len(self.default):
                return KeyDecision(None, DEFAULT_KEY, substituted=True)
            return KeyDecision(None, NO_KEY)
        if token.startswith(b"fk-"):
            label = self.forward.lookup(token)
            if label is None:
                return KeyDecision(
                    None, NO_KEY, refusal="Incorrect forward key provided."
                )
            return KeyDecision(None, label, substituted=True)
        assert authorization is not None
        return KeyDecision(authorization[-1], CLIENT_KEY)
