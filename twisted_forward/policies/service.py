"""
Putting the policies together for a running proxy: the store and the gate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from twisted.internet.interfaces import IReactorTime

from .gate import PolicyGate
from .memory import MemoryStore
from .prices import PriceTable
from .settings import PolicyConfig
from .store import IPolicyStore

if TYPE_CHECKING:
    from ..metrics import Metrics

#: Chooses the store for a configuration; the ``--workers`` worker and the
#: Redis support replace or extend it.  Returns None to mean "in memory".
StoreFactory = Callable[[PolicyConfig, IReactorTime], Optional[IPolicyStore]]


def default_store(config: PolicyConfig, reactor: IReactorTime) -> Optional[IPolicyStore]:
    """In memory, unless REDIS_URL asks for Redis."""
    from .shared import open_shared_store

    return open_shared_store(config, reactor, {})


def build_gate(
    config: PolicyConfig,
    reactor: IReactorTime,
    metrics: Optional["Metrics"] = None,
    store: Optional[IPolicyStore] = None,
) -> Optional[PolicyGate]:
    """The policy gate for ``config``, or None when no policy is set (the
    exchange then skips the hook entirely).

    :param store: the store to count in; by default :func:`default_store`'s
        choice, else memory.
    :raises ValueError: a price table that cannot be read; a store that
        cannot be opened.
    """
    if not config.active:
        return None
    if store is None:
        store = default_store(config, reactor) or MemoryStore()
    prices = PriceTable.load(config.prices_file, config.unknown_price)
    refused: Optional[Callable[[str, str], None]] = None
    store_failed: Optional[Callable[[], None]] = None
    if metrics is not None:
        counter = metrics.policy_refusals

        def count_refusal(label: str, reason: str) -> None:
            counter.labels(label, reason).inc()

        refused = count_refusal
        store_failed = metrics.policy_store_failures.inc
    return PolicyGate(
        config.policies,
        store,
        prices,
        reactor,
        on_store_failure=config.on_store_failure,
        refused=refused,
        store_failed=store_failed,
    )
