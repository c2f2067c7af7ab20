"""
The twistd plugin's options and service: ``twistd -n openai-forward``.

``Options`` takes ``--port`` (a number or a Twisted endpoint string) and one
option per setting of the configuration contract; ``makeService`` reads the
environment and ``.env``, validates, and builds the service tree.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorCore, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage

from ._compat import clear_exit_signal
from .access import AccessGate
from .admin.live import LiveTally
from .admin.service import AdminService
from .chat.recorder import ChatRecorder, Recorder, open_chat_log
from .config import (
    SETTINGS,
    Config,
    ConfigError,
    describe,
    load_config,
    parse_endpoint,
    read_env_file,
)
from .ledger import ILedger
from .ledger.feed import feeding_recorder
from .ledger.service import check_data_dir, open_ledger
from .limits import resolve_caps
from .listening import BoundEndpoint, endpoint_from_string, listen_now
from .metrics import MetricsResource
from .policies.prices import PriceTable
from .site import Built, SidePortSite, build_root, make_site


def port_to_endpoint(port: str) -> str:
    """``9999`` means TCP on all interfaces; anything else is an endpoint string."""
    try:
        return parse_endpoint(port)
    except ValueError as e:
        raise ConfigError(f"--port: {e}") from None


class Options(usage.Options):
    """Command-line options of ``twistd openai-forward``."""

    synopsis = "[options]"
    longdesc = (
        "Forward the OpenAI API. Every option also has an environment variable "
        "(in brackets); a .env file in the working directory is read too, and "
        "options override both."
    )
    optParameters = [
        ["port", "p", "8000",
         "Port number or endpoint string (tcp:9999:interface=127.0.0.1, ssl:…, unix:…)."],
        ["env-file", None, ".env", "Read settings from this file if it exists."],
        ["workers", None, "0",
         "Serve from N processes sharing the port (0: this process serves)."],
    ] + [
        [s.option, None, None, f"{s.help} [{s.env}]"] for s in SETTINGS
    ]

    def postOptions(self) -> None:
        try:
            self["endpoint"] = port_to_endpoint(self["port"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        workers = str(self["workers"]).strip()
        if not workers.isdigit():
            raise usage.UsageError(f"--workers: {workers!r} is not a whole number")
        self["workers"] = int(workers)

    def setting_values(self) -> dict[str, Optional[str]]:
        """Raw values of the settings given as options."""
        return {s.option: self[s.option] for s in SETTINGS}


def load(options: Options, environ: Optional[dict[str, str]] = None) -> Config:
    """The validated config for these options, the environment and .env."""
    env = dict(os.environ if environ is None else environ)
    return load_config(options.setting_values(), env, read_env_file(options["env-file"]))


def open_recorder(config: Config, reactor: IReactorCore) -> Optional[ChatRecorder]:
    """The chat recorder, or None when LOG_CHAT is off (nothing is written)."""
    if not config.log_chat:
        return None
    secrets = config.default_keys + tuple(k.key for k in config.forward_keys)
    if config.admin_key is not None:
        secrets += (config.admin_key,)
    try:
        return open_chat_log(config.log_dir, reactor, secrets)
    except OSError as e:
        raise log_dir_error(config, e) from None


def log_dir_error(config: Config, e: OSError) -> ConfigError:
    """The one-line start-up error for a LOG_DIR the proxy cannot write to."""
    why = e.strerror or str(e)
    return ConfigError(
        f"LOG_DIR (--log-dir): cannot write chat records in {config.log_dir!r} ({why}): "
        "make that folder writable by this user, choose another, or set LOG_CHAT=false"
    )


def check_log_dir(config: Config) -> None:
    """Create LOG_DIR and check it is writable, without opening a recorder
    (the supervisor's check, before its workers open theirs)."""
    if not config.log_chat:
        return
    try:
        os.makedirs(config.log_dir, exist_ok=True)
        if not os.access(config.log_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise log_dir_error(config, e) from None


class ProxyService(Service):
    """Owns the proxy's lifetime: start-up lines, draining, closing the pool.

    On stop it marks the proxy draining (``/healthz`` answers 503), lets open
    exchanges finish for up to ``grace`` seconds, then cuts the rest and
    closes the upstream connections; last, the chat records are flushed and
    closed, so every exchange answered is on disk.  The listening port,
    stopped first by the parent service, takes no new connections meanwhile.
    """

    log = Logger()

    def __init__(
        self,
        built: Built,
        config: Config,
        reactor: Any,
        recorder: Optional[ChatRecorder] = None,
        ledger: Optional[IService] = None,
    ) -> None:
        self.built = built
        self.config = config
        self.reactor = reactor
        self.recorder = recorder
        self.ledger = ledger

    def startService(self) -> None:
        super().startService()
        if self.ledger is not None:
            self.ledger.startService()
        for line in describe(self.config):
            self.log.info("{line}", line=line)
        total, per_client, upstream = resolve_caps(self.config)
        self.log.info(
            "caps: {total} client connections, {per_client} per client address, "
            "{upstream} upstream requests in flight (None: no cap)",
            total=total, per_client=per_client, upstream=upstream,
        )
        if self.built.keys.open_relay:
            self.log.warn(
                "OPENAI_API_KEY is set and FORWARD_KEY is not: anyone who can reach "
                "this port spends your OpenAI keys. Set FORWARD_KEY or restrict "
                "access with IP_WHITELIST."
            )

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        self.built.health.draining = True
        open_count = sum(len(p.open) for p in self.built.proxies)
        if open_count:
            self.log.info(
                "draining {count} open request(s) for up to {grace}s",
                count=open_count, grace=self.config.shutdown_grace,
            )
            drained = defer.DeferredList(
                [p.drained() for p in self.built.proxies], consumeErrors=True
            )
            # On timeout the DeferredList is cancelled, which fires it.
            yield drained.addTimeout(self.config.shutdown_grace, self.reactor)
            for proxy in self.built.proxies:
                for exchange in list(proxy.open):
                    exchange.abort()
        try:
            yield self.built.upstream.close()
        finally:
            try:
                if self.built.cache is not None:
                    # After the drain: the last answers have been stored.
                    yield self.built.cache.close()
                if self.built.policy is not None:
                    # Every exchange has ended (and so settled or released its
                    # reservation): let go of the store.
                    yield self.built.policy.store.close()
            finally:
                try:
                    if self.recorder is not None:
                        yield self.recorder.close()
                finally:
                    # Last: every exchange has ended, so its figures are pending.
                    if self.ledger is not None and self.ledger.running:
                        yield self.ledger.stopService()
        # twistd and twist re-raise the terminating signal at exit, so a
        # supervisor would see "killed by SIGTERM".  The shutdown was
        # orderly: report success (exit status 0) instead.
        clear_exit_signal(self.reactor)


def makeService(
    options: Options,
    reactor: Optional[Any] = None,
    environ: Optional[dict[str, str]] = None,
    endpoint: Optional[IStreamServerEndpoint] = None,
) -> IService:
    """Build the proxy's service tree from parsed options, and bind its ports.

    Any start-up failure found here (a bad setting, a port that cannot be
    had, an unreadable TLS file, an unwritable folder) is one line on
    standard error and exit status 1: this runs before twistd redirects
    standard error to its log and before a daemon forks.

    :param reactor: the reactor (IReactorCore, IReactorTime, IReactorTCP,
        ...: typed Any, since zope interfaces cannot be intersected); the
        global one by default.
    :param environ: the environment to read settings from (tests pass
        their own); ``os.environ`` by default.
    :param endpoint: serve on this endpoint instead of ``--port`` (a worker
        adopting its supervisor's socket).
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        return _make_service(options, reactor, environ, endpoint)
    except (ConfigError, ValueError) as e:
        # One clear line, not a traceback.
        sys.stderr.write(f"openai-forward: {e}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None


def _make_service(
    options: Options,
    reactor: Any,
    environ: Optional[dict[str, str]],
    endpoint: Optional[IStreamServerEndpoint],
) -> IService:
    config = load(options, environ)
    if endpoint is None:
        endpoint = endpoint_from_string(reactor, options["endpoint"], "--port")
    metrics_endpoint = None
    if config.metrics_port is not None:
        metrics_endpoint = endpoint_from_string(
            reactor, config.metrics_port, "METRICS_PORT (--metrics-port)"
        )
    admin_endpoint = None
    if config.admin_port is not None:
        admin_endpoint = endpoint_from_string(
            reactor, config.admin_port, "ADMIN_PORT (--admin-port)"
        )
    if options["workers"]:
        from .supervisor import make_supervisor

        if config.metrics_port is not None:
            # Every worker would bind it.
            raise ConfigError("METRICS_PORT (--metrics-port): not with --workers")
        if config.admin_port is not None:
            raise ConfigError("ADMIN_PORT (--admin-port): not with --workers")
        check_log_dir(config)
        check_data_dir(config)

        return make_supervisor(
            options["workers"],
            options["endpoint"],
            {"port": options["port"], "env-file": options["env-file"],
             **options.setting_values()},
            dict(os.environ if environ is None else environ),
            config.shutdown_grace,
            reactor,
        )
    recorder = open_recorder(config, reactor)
    ledger = open_ledger(config, reactor)
    top = MultiService()
    # The exchanges feed the ledger; with the admin page on, through its
    # live tally (which counts tokens for the live figures on the way).
    feed: Optional[ILedger] = ledger
    if config.admin_key is not None:
        feed = LiveTally(ledger)
    exchange_recorder: Optional[Recorder] = recorder
    if feed is not None:
        prices = PriceTable.load(config.policy.prices_file, config.policy.unknown_price)
        recorder, exchange_recorder = feeding_recorder(recorder, feed, reactor, prices.cost_usd)
    try:
        built = build_root(
            config, reactor, recorder=exchange_recorder, ledger=feed
        )
    except ValueError as e:  # a store the configuration names cannot be opened
        sys.stderr.write(f"openai-forward: {e}\n")
        raise SystemExit(1) from None
    ProxyService(built, config, reactor, recorder, ledger).setServiceParent(
        top
    )
    site = make_site(built, config, reactor)
    if built.admin is not None:
        # Added before the listeners: stopped after they are, it ends the
        # open event streams so the proxy can drain.
        AdminService(built.admin).setServiceParent(top)
    admin_site = None
    if built.admin is not None and admin_endpoint is not None:
        admin_site = SidePortSite(
            AccessGate(built.admin.resource, config.ip_whitelist, config.ip_blacklist,
                       config.trusted_proxies),
            reactor=reactor,
        )
    metrics_site = None
    if config.metrics and metrics_endpoint is not None:
        metrics_site = SidePortSite(MetricsResource(built.metrics), reactor=reactor)
    # Bound last, so nothing after can fail with a port left open.
    port = listen_now(endpoint, site, "--port", options["port"])
    StreamServerEndpointService(BoundEndpoint(port, site), site).setServiceParent(top)
    bound = [port]
    for extra_site, extra_endpoint, name, value in (
        (metrics_site, metrics_endpoint, "METRICS_PORT (--metrics-port)", config.metrics_port),
        (admin_site, admin_endpoint, "ADMIN_PORT (--admin-port)", config.admin_port),
    ):
        if extra_site is None:
            continue
        assert extra_endpoint is not None
        try:
            extra_port = listen_now(extra_endpoint, extra_site, name, value or "")
        except ConfigError:
            for done in bound:
                done.stopListening()
            raise
        bound.append(extra_port)
        StreamServerEndpointService(
            BoundEndpoint(extra_port, extra_site), extra_site
        ).setServiceParent(top)
    return top
