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

from .config import SETTINGS, Config, ConfigError, describe, load_config, read_env_file
from .site import Built, ForwardSite, build_root


def port_to_endpoint(port: str) -> str:
    """``9999`` means TCP on all interfaces; anything else is an endpoint string."""
    port = port.strip()
    if port.isdigit():
        if not 0 <= int(port) < 65536:
            raise ConfigError(f"--port: {port} is out of range")
        return f"tcp:{port}"
    return port


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


class ProxyService(Service):
    """Owns the proxy's lifetime: start-up lines, draining, closing the pool.

    On stop it marks the proxy draining (``/healthz`` answers 503), lets open
    exchanges finish for up to ``grace`` seconds, then cuts the rest and
    closes the upstream connections.  The listening port, stopped first by
    the parent service, takes no new connections meanwhile.
    """

    log = Logger()

    def __init__(self, built: Built, config: Config, reactor: IReactorCore) -> None:
        self.built = built
        self.config = config
        self.reactor = reactor

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
        yield self.built.upstream.close()


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
        if options["workers"]:
            from .workers import make_supervisor

            return make_supervisor(
                options["workers"],
                options["endpoint"],
                {"port": options["port"], "env-file": options["env-file"],
                 **options.setting_values()},
                dict(os.environ if environ is None else environ),
                config.shutdown_grace,
                reactor,
            )
    except (ConfigError, ValueError) as e:
        # One clear line, not a traceback.
        sys.stderr.write(f"openai-forward: {e}\n")
        raise SystemExit(1)
    top = MultiService()
    built = build_root(config, reactor)  # type: ignore[arg-type]
    ProxyService(built, config, reactor).setServiceParent(top)  # type: ignore[arg-type]
    site = ForwardSite(built.root, reactor=reactor)
    strports.service(options["endpoint"], site, reactor=reactor).setServiceParent(top)
    return top
