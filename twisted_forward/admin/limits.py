"""
What the admin page shows of the per-key policies: each forward key's
limits, and what remains of each now.

:class:`IKeyLimits` is the one thing the admin needs from the policies;
:class:`PolicyLimits` provides it over the policy gate and its store.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from ..policies.gate import SLOT_LEASE, PolicyGate
from ..policies.prices import MICRO
from ..policies.rules import KeyPolicy
from ..policies.store import CONCURRENT, FIXED, MOVING, Bucket, Settlement, Verdict
from ..policies.windows import day_window, fixed_window, month_window


class IKeyLimits(Interface):
    """Per forward-key policy and remaining allowance, for display."""

    def describe(labels: Sequence[str]) -> "Deferred[Mapping[str, Mapping[str, Any]]]":
        """For each label: ``{"policy": {...} | None, "remaining": {...} | None}``.

        ``policy`` is the key's configured limits as JSON-ready values
        (models, rpm, tpm, max_parallel, tokens/USD per day/month);
        ``remaining`` what is left of each limit now, under the same names.
        Never a key: labels only.
        """


#: Seconds the policy store gets to say what remains.
PEEK_TIMEOUT = 5.0


def policy_fields(policy: KeyPolicy) -> dict[str, Any]:
    """A key's policy as JSON-ready values (limits not set left out)."""
    out: dict[str, Any] = {}
    for name in ("models", "rpm", "tpm", "max_parallel", "tokens_per_day",
                 "tokens_per_month", "usd_per_day", "usd_per_month"):
        value = getattr(policy, name)
        if value is not None:
            out[name] = list(value) if name == "models" else value
    return out


@implementer(IKeyLimits)
class PolicyLimits:
    """What remains of each forward key's limits, read from the policy store.

    The store has no read-only question, so this asks the one it has, with
    nothing taken: a reservation of amount 0 on the same buckets the
    policy gate draws on (same names, same windows), which returns how
    full each is, then settles it at 0, which releases it.  A full bucket
    refuses the reservation, and says how full it is all the same.

    :param gate: the proxy's policy gate (its policies, store and clock).
    """

    def __init__(self, gate: PolicyGate, reactor: IReactorTime) -> None:
        self.gate = gate
        self.reactor = reactor
        self._peeks = itertools.count(1)
        self._prefix = os.urandom(4).hex()

    def buckets(self, label: str, policy: KeyPolicy, now: float) -> list[tuple[str, Bucket]]:
        """``(limit name, bucket)`` for each limit of ``policy``, as the gate
        names and windows them, each taking nothing."""
        moving = self.gate.policies.moving
        out: list[tuple[str, Bucket]] = []

        def window(id: str, limit: int, seconds: float) -> Bucket:
            if moving:
                return Bucket(id, MOVING, limit, 0, seconds)
            start, length = fixed_window(now, seconds)
            return Bucket(id, FIXED, limit, 0, length, start)

        if policy.rpm is not None:
            out.append(("rpm", window(f"{label}/rpm", policy.rpm, 60.0)))
        if policy.tpm is not None:
            out.append(("tpm", window(f"{label}/tpm", policy.tpm, 60.0)))
        if policy.max_parallel is not None:
            out.append(("max_parallel", Bucket(
                f"{label}/parallel", CONCURRENT, policy.max_parallel, 0, SLOT_LEASE)))
        for name, limit, period in (
            ("tokens_per_day", policy.tokens_per_day, day_window),
            ("tokens_per_month", policy.tokens_per_month, month_window),
        ):
            if limit is not None:
                start, length = period(now)
                out.append((name, Bucket(f"{label}/{name}", FIXED, limit, 0, length, start)))
        for name, dollars, period in (
            ("usd_per_day", policy.usd_per_day, day_window),
            ("usd_per_month", policy.usd_per_month, month_window),
        ):
            if dollars is not None:
                start, length = period(now)
                out.append((name, Bucket(
                    f"{label}/{name}", FIXED, int(round(dollars * MICRO)), 0, length, start)))
        return out

    def describe(self, labels: Sequence[str]) -> "Deferred[Mapping[str, Mapping[str, Any]]]":
        """Each label's policy and what remains of each of its limits."""
        now = self.gate.clock()
        out: dict[str, dict[str, Any]] = {}
        waits = []
        for label in labels:
            policy = self.gate.policies.policy_for(label)
            if policy is None:
                out[label] = {"policy": None, "remaining": None}
                continue
            entry: dict[str, Any] = {"policy": policy_fields(policy), "remaining": {}}
            out[label] = entry
            named = self.buckets(label, policy, now)
            if named:
                waits.append(self._peek(entry, named, now))
        d = gatherResults(waits, consumeErrors=True) if waits else succeed(None)
        return d.addCallback(lambda _: out)

    def _peek(self, entry: dict[str, Any], named: list[tuple[str, Bucket]],
              now: float) -> "Deferred[None]":
        store = self.gate.store
        reservation = f"admin-peek-{self._prefix}-{next(self._peeks)}"
        buckets = [b for _, b in named]
        d = store.reserve(reservation, buckets, now)
        if not d.called:
            d.addTimeout(PEEK_TIMEOUT, self.reactor)

        def got(verdict: Verdict) -> None:
            for (name, bucket), state in zip(named, verdict.states):
                usd = name.startswith("usd_")
                entry["remaining"][name] = {
                    "limit": bucket.limit / MICRO if usd else bucket.limit,
                    "remaining": round(state.remaining / MICRO, 6) if usd else state.remaining,
                    "reset_seconds": round(state.reset, 1),
                }
            if verdict.granted:
                store.settle(
                    reservation, [Settlement(b, 0) for b in buckets], now
                ).addErrback(lambda _: None)

        def failed(_: object) -> None:
            entry["remaining"] = {"error": "the policy store did not answer"}

        return d.addCallbacks(got, failed)
