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

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from .config import (
    SETTINGS,
    Config,
    ConfigError,
    describe,
    load_config,
    parse_endpoint,
    read_env_file,
)
from .chat.recorder import ChatRecorder, open_chat_log
from .metrics import MetricsResource
from .access import AccessGate
from .admin.service import AdminService
from .site import Built, ForwardSite, build_root


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
        raise ConfigError(f"LOG_DIR (--log-dir): cannot write chat records there ({e})") from None


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
        reactor: IReactorCore,
        recorder: Optional[ChatRecorder] = None,
    ) -> None:
        self.built = built
        self.config = config
        self.reactor = reactor
        self.recorder = recorder

    def startService(self) -> None:
        super().startService()
        for line in describe(self.config):
            self.log.info("{line}", line=line)
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
            if self.recorder is not None:
                yield self.recorder.close()
        # twistd and twist re-raise the terminating signal at exit, so a
        # supervisor would see "killed by SIGTERM".  The shutdown was
        # orderly: report success (exit status 0) instead.
        if getattr(self.reactor, "_exitSignal", None) is not None:
            self.reactor._exitSignal = None  # type: ignore[attr-defined]


def makeService(
    options: Options,
    reactor: Optional[IReactorCore] = None,
    environ: Optional[dict[str, str]] = None,
) -> IService:
    """Build the proxy's service tree from parsed options.

    :param environ: the environment to read settings from (tests pass
        their own); ``os.environ`` by default.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor  # type: ignore[assignment]
    try:
        config = load(options, environ)
        endpoints.serverFromString(reactor, options["endpoint"])
        if config.metrics_port is not None:
            endpoints.serverFromString(reactor, config.metrics_port)
        if config.admin_port is not None:
            endpoints.serverFromString(reactor, config.admin_port)
        if options["workers"]:
            from .supervisor import make_supervisor

            if config.metrics_port is not None:
                # Every worker would bind it.
                raise ConfigError("METRICS_PORT (--metrics-port): not with --workers")
            if config.admin_port is not None:
                raise ConfigError("ADMIN_PORT (--admin-port): not with --workers")

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
    except IndexError:
        # serverFromString's systemd: parser, when no socket was passed in.
        sys.stderr.write(
            "openai-forward: --port/--metrics-port: no inherited socket at that "
            "index (systemd: needs LISTEN_FDS and LISTEN_FDNAMES)\n"
        )
        raise SystemExit(1)
    except (ConfigError, ValueError) as e:
        # One clear line, not a traceback.
        sys.stderr.write(f"openai-forward: {e}\n")
        raise SystemExit(1)
    top = MultiService()
    built = build_root(config, reactor, recorder=recorder)  # type: ignore[arg-type]
    ProxyService(built, config, reactor, recorder).setServiceParent(top)  # type: ignore[arg-type]
    site = ForwardSite(
        built.root, reactor=reactor, max_request_body=config.max_request_body
    )
    site.metrics = built.metrics
    site.gate = built.root if isinstance(built.root, AccessGate) else None
    if built.admin is not None:
        # Added before the listeners: stopped after they are, it ends the
        # open event streams so the proxy can drain.
        AdminService(built.admin).setServiceParent(top)
    strports.service(options["endpoint"], site, reactor=reactor).setServiceParent(top)
    if config.metrics and config.metrics_port is not None:
        metrics_site = Site(MetricsResource(built.metrics), reactor=reactor)
        metrics_site.noisy = False
        strports.service(config.metrics_port, metrics_site, reactor=reactor).setServiceParent(top)
    if built.admin is not None and config.admin_port is not None:
        admin_site = Site(
            AccessGate(built.admin.resource, config.ip_whitelist, config.ip_blacklist,
                       config.trusted_proxies),
            reactor=reactor,
        )
        admin_site.noisy = False
        strports.service(config.admin_port, admin_site, reactor=reactor).setServiceParent(top)
    return top
