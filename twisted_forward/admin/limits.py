"""
What the admin page shows of the per-key policies: each forward key's
limits, and what remains of each now.

:class:`IKeyLimits` is the one thing the admin needs from the policies; an
adapter over the policy engine provides it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred
from zope.interface import Interface


class IKeyLimits(Interface):
    """Per forward-key policy and remaining allowance, for display."""

    def describe(labels: Sequence[str]) -> "Deferred[Mapping[str, Mapping[str, Any]]]":
        """For each label: ``{"policy": {...} | None, "remaining": {...} | None}``.

        ``policy`` is the key's configured limits as JSON-ready values
        (models, rpm, tpm, max_parallel, tokens/USD per day/month);
        ``remaining`` what is left of each limit now, under the same names.
        Never a key: labels only.
        """
