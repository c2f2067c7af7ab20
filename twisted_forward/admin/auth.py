"""
The admin key check: ``Authorization: Bearer <ADMIN_KEY>`` on every API call.

The key is compared as a SHA-256 digest with :func:`hmac.compare_digest`, so
the time taken tells nothing about how much of a guess was right, nor about
the key's length.  Only the digest is kept.  What a client sent is never
logged, and a refusal says nothing about why the key was wrong.
"""

from __future__ import annotations

import hashlib
import hmac

from twisted.web.iweb import IRequest

_AUTHORIZATION = b"authorization"


class AdminAuth:
    """Checks requests for the admin key.

    :param key: the configured ADMIN_KEY.
    """

    def __init__(self, key: str) -> None:
        self._digest = hashlib.sha256(key.encode("utf-8")).digest()

    def __repr__(self) -> str:
        return "<AdminAuth>"

    def matches(self, candidate: bytes) -> bool:
        """Whether ``candidate`` is the admin key (constant time)."""
        return hmac.compare_digest(hashlib.sha256(candidate).digest(), self._digest)

    def allows(self, request: IRequest) -> bool:
        """Whether ``request`` carries the admin key as its one Bearer credential."""
        values = request.requestHeaders.getRawHeaders(_AUTHORIZATION)
        if not values or len(values) != 1:
            return False
        words = values[0].split()
        if len(words) != 2 or words[0].lower() != b"bearer":
            # Still hash something, so a malformed header is not answered
            # faster than a wrong key.
            self.matches(values[0])
            return False
        return self.matches(words[1])
