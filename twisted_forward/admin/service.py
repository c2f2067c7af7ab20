"""
Building the admin from the configuration, and the service that runs its
clockwork: live sampling while the proxy runs, event streams ended on stop.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional

from prometheus_client import Counter
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime

from ..chat.files import thread_runner
from ..config import Config
from ..keys import DefaultKeys
from ..metrics import Metrics
from .api import AdminAPI, Runner
from .assets import load_assets
from .auth import AdminAuth
from .limits import IKeyLimits
from .live import LiveFigures, LiveTally, read_totals
from .resource import AdminResource


@dataclass
class Admin:
    """The admin's parts, for the site and the service tree."""

    resource: AdminResource
    live: LiveFigures
    tally: LiveTally


class AdminService(Service):
    """Samples the live figures while running; on stop, ends the event
    streams so the proxy can drain."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    def startService(self) -> None:
        super().startService()
        self.admin.live.start()

    def stopService(self) -> Any:
        super().stopService()
        self.admin.live.stop()
        self.admin.resource.close()

    def swap(self, admin: Admin) -> None:
        """After a reload: sample and serve ``admin``; the previous one's
        event streams end (the page's EventSource reconnects to the new)."""
        previous, self.admin = self.admin, admin
        if self.running:
            previous.live.stop()
            previous.resource.close()
            admin.live.start()


#: One refusals counter per Metrics: a reload builds the admin again on the
#: same registry, which takes each series once.
_REFUSALS: "weakref.WeakKeyDictionary[Metrics, Counter]" = weakref.WeakKeyDictionary()


def admin_refusals(metrics: Metrics) -> Counter:
    """The counter of refused admin requests, in the proxy's registry."""
    counter = _REFUSALS.get(metrics)
    if counter is None:
        counter = _REFUSALS[metrics] = Counter(
            "openai_forward_admin_refusals",
            "Admin API requests refused, by reason (a missing or wrong admin key).",
            ["reason"],
            registry=metrics.registry,
        )
    return counter


def build_admin(
    config: Config,
    reactor: Any,
    default_keys: DefaultKeys,
    metrics: Metrics,
    tally: LiveTally,
    limits: Optional[IKeyLimits] = None,
    run: Optional[Runner] = None,
) -> Admin:
    """The admin for ``config`` (which must have an ADMIN_KEY).

    :param tally: the ledger as the exchange feeds it, counting tokens for
        the live figures on the way.
    """
    assert config.admin_key is not None
    clock: IReactorTime = reactor
    live = LiveFigures(lambda: read_totals(metrics, tally), clock)
    api = AdminAPI(
        tally,
        default_keys,
        [k.label for k in config.forward_keys],
        limits,
        config.log_dir if config.log_chat else None,
        clock,
        run if run is not None else thread_runner(reactor),
    )
    secrets = (config.admin_key,) + tuple(config.default_keys) + tuple(
        k.key for k in config.forward_keys
    )
    resource = AdminResource(
        api, AdminAuth(config.admin_key), load_assets(), live, admin_refusals(metrics), secrets
    )
    return Admin(resource, live, tally)
