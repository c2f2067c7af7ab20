"""
The twistd plugin's options and service: ``twistd -n openai-forward``.

``Options`` takes ``--port`` (a number or a Twisted endpoint string) and one
option per setting of the configuration contract; ``makeService`` reads the
environment and ``.env``, validates, and builds the service tree.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.python import usage
from twisted.web.resource import IResource
from zope.interface import provider

from ._compat import clear_exit_signal
from .admin.live import LiveTally
from .admin.service import AdminService
from .chat.recorder import ChatRecorder, IRecorder, open_chat_log
from .config import (
    METRICS_OFF,
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
from .limits import raise_descriptor_limit, resolve_caps
from .listening import BoundEndpoint, endpoint_from_string, listen_now
from .logfiles import LogReopenService
from .loops import base_v1_notes, own_address_conflict
from .metrics import MetricsResource
from .policies.prices import PriceTable
from .policies.service import build_gate
from .policies.shared import open_shared_store
from .reload import ConfigSource, install_handler, restart_only_changes
from .site import Built, ForwardSite, SidePortSite, build_root, make_site

_log = Logger()


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

    def opt_version(self) -> None:
        """Print twisted-forward's version (and Twisted's) and exit."""
        import twisted

        from . import __version__

        print(f"twisted-forward {__version__} (Twisted {twisted.__version__})")
        raise SystemExit(0)

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


def open_recorder(config: Config, reactor: Any) -> Optional[ChatRecorder]:
    """The chat recorder, or None when LOG_CHAT is off (nothing is written)
    and PRINT_CHAT too.

    :param reactor: the reactor: its clock (``IReactorTime``) and thread
        pool (``IReactorThreads``, for the record files' writes).
    """
    secrets = config.default_keys + tuple(k.key for k in config.forward_keys)
    if config.admin_key is not None:
        secrets += (config.admin_key,)
    recorder: Optional[ChatRecorder] = None
    if config.log_chat:
        try:
            recorder = open_chat_log(config.log_dir, reactor, secrets)
        except OSError as e:
            raise log_dir_error(config, e) from None
    if config.print_chat:
        if recorder is None:
            recorder = ChatRecorder(reactor)
        recorder.publisher.addObserver(chat_printer(secrets))
    return recorder


def chat_printer(secrets: tuple[str, ...]) -> ILogObserver:
    """PRINT_CHAT: an observer logging each chat record as one JSON line,
    every key masked (as in the record files)."""
    from .chat.files import RECORD_FIELD, encode_record, secret_forms

    log = Logger(namespace="twisted_forward.print_chat")
    forms = secret_forms(secrets)

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        record = event.get(RECORD_FIELD)
        if record is not None:
            line = encode_record(record, forms).decode("utf-8", "replace").rstrip("\n")
            log.info("chat {record}", record=line)

    return observe


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


#: Seconds a start-up check of a Redis server may take, a step.
REDIS_CHECK_TIMEOUT = 5.0


def check_redis(config: Config) -> None:
    """At start-up, ask each Redis the settings name whether it answers.

    One the limits need (REDIS_URL with key policies, failing ``closed``)
    that does not answer stops start-up with one line; one that is only
    wanted (limits failing ``open``, the response cache) gets a warning
    line and the proxy starts, degraded as documented.

    :raises ConfigError: naming REDIS_URL, the server (never its password)
        and the ways out.
    """
    from .redis_link import parse_redis_url, probe

    policy, cache = config.policy, config.cache
    wanted: list[tuple[str, str, bool]] = []
    if policy.redis_url:
        required = policy.active and policy.on_store_failure == "closed"
        wanted.append(("REDIS_URL (--redis-url)", policy.redis_url, required))
    if cache.enabled and cache.backend == "redis" and cache.redis_url \
            and cache.redis_url != policy.redis_url:
        wanted.append(("the cache's Redis (CACHE_ROOT_PATH_OR_URL)", cache.redis_url, False))
    for setting, url, required in wanted:
        target = parse_redis_url(url)
        try:
            probe(target, REDIS_CHECK_TIMEOUT, ca_file=config.ssl_cert_file)
        except ConnectionError as e:
            if required:
                raise ConfigError(
                    f"{setting}: cannot reach {target} ({e}): start it, fix the URL, or set "
                    "LIMITS_ON_STORE_FAILURE=open to serve while it is down"
                ) from None
            _log.warn(
                "{setting}: cannot reach {target} ({why}); starting anyway, and using it "
                "once it answers (until then: limits as LIMITS_ON_STORE_FAILURE=open says, "
                "cache misses)",
                setting=setting, target=str(target), why=str(e),
            )


def refuse_own_address(config: Config, source: ConfigSource, port: Any) -> None:
    """Refuse an upstream that is the proxy's own listening address.

    :raises ConfigError: naming the setting that gave the upstream.
    """
    address = port.getHost()
    if not isinstance(getattr(address, "port", None), int):
        return  # a unix socket: no URL names it
    route = own_address_conflict(config.routes, address.host, address.port)
    if route is None:
        return
    setting = (
        "FORWARD_CONFIG (--forward-config)" if source.given("FORWARD_CONFIG")
        else "OPENAI_BASE_URL (--base-url)"
    )
    raise ConfigError(
        f"{setting}: {route.base} is this proxy's own address (it listens on port "
        f"{address.port}): every request would come back to it. Point it at the real "
        "upstream (https://api.openai.com by default); an OPENAI_BASE_URL exported for "
        "the SDK is the usual cause"
    )


def with_feed(
    config: Config, reactor: IReactorTime, recorder: Optional[ChatRecorder],
    feed: Optional[ILedger],
) -> tuple[Optional[ChatRecorder], Optional[IRecorder]]:
    """The chat recorder (to flush and close) and the recorder the exchanges
    use: with the ledger fed beside the chat records when there is one."""
    if feed is None:
        return recorder, recorder
    prices = PriceTable.load(config.policy.prices_file, config.policy.unknown_price)
    return feeding_recorder(recorder, feed, reactor, prices.cost_usd)


class ProxyService(Service):
    """Owns the proxy's lifetime: start-up lines, reloads, draining, closing
    the pool.

    On SIGHUP it reloads (:mod:`twisted_forward.reload`): the configuration
    is read again and, if valid, a new resource tree serves new requests
    while open ones finish on the tree they started with.

    On stop it marks the proxy draining (``/healthz`` answers 503), lets open
    exchanges finish for up to ``grace`` seconds, then cuts the rest and
    closes the upstream connections; last, the chat records are flushed and
    closed, so every exchange answered is on disk.  The listening port,
    stopped first by the parent service, takes no new connections meanwhile.

    :param site: the site whose tree a reload swaps.
    :param source: where a reload reads the configuration; None: no reloads.
    :param admin_service: runs the admin's live figures; a reload hands it
        the new admin.
    :param side_sites: the side ports' sites (METRICS_PORT, ADMIN_PORT),
        each with what it serves of a tree; a reload gives them the new
        tree's part and IP gate.
    """

    log = Logger()

    def __init__(
        self,
        built: Built,
        config: Config,
        reactor: Any,
        recorder: Optional[ChatRecorder] = None,
        ledger: Optional[IService] = None,
        site: Optional[ForwardSite] = None,
        source: Optional[ConfigSource] = None,
        admin_service: Optional[AdminService] = None,
        feed: Optional[ILedger] = None,
        side_sites: Sequence[tuple[SidePortSite, Callable[[Built], IResource]]] = (),
    ) -> None:
        self.built = built
        self.config = config
        self.reactor = reactor
        self.recorder = recorder
        self.ledger = ledger
        self.feed = feed
        self.site = site
        self.source = source
        self.admin_service = admin_service
        self.side_sites = tuple(side_sites)
        #: Earlier generations with exchanges still open.
        self.retired: list[_Generation] = []
        self._restore_sighup: Optional[Callable[[], None]] = None

    def startService(self) -> None:
        super().startService()
        if self.ledger is not None:
            self.ledger.startService()
        self._describe()
        if self.built.shared_store is not None:
            self.built.shared_store.start()
        if self.built.key_health is not None:
            self.built.key_health.start()
        if self.source is not None and self.site is not None:
            self._restore_sighup = install_handler(signal.SIGHUP, self.reactor, self.reload)

    def _describe(self) -> None:
        for line in describe(self.config):
            self.log.info("{line}", line=line)
        total, per_client, upstream = resolve_caps(self.config)
        self.log.info(
            "caps: {total} client connections, {per_client} per client address, "
            "{upstream} upstream requests in flight (None: no cap)",
            total=total, per_client=per_client, upstream=upstream,
        )
        if self.source is not None:
            for name, where, close in self.source.unknown():
                self.log.warn(
                    "unknown setting {name} in {where}: ignored{hint}",
                    name=name, where=where,
                    hint=f"; did you mean {close}?" if close else "",
                )
        for note in base_v1_notes(self.config.routes):
            self.log.warn("{note}", note=note)
        if self.built.keys.open_relay and not self.config.ip_whitelist:
            # (With IP_WHITELIST only the listed addresses can spend them.)
            self.log.warn(
                "OPENAI_API_KEY is set and FORWARD_KEY is not: anyone who can reach "
                "this port spends your OpenAI keys. Set FORWARD_KEY or restrict "
                "access with IP_WHITELIST."
            )

    # ------------------------------------------------------------ reload

    def reload(self) -> bool:
        """Read the configuration again and serve new requests with it.

        :returns: whether the new configuration is in effect (if not, the
            reason is logged and the running configuration stays).
        """
        if self.source is None or self.site is None or not self.running:
            return False
        shadowed = self.source.shadowed_changes()
        current = self.built
        shared = current.shared_store
        try:
            config = self.source.load()
            restart_only_changes(self.config, config)
            same_pool = _pool_settings(config) == _pool_settings(self.config)
            same_store = (
                current.policy is not None
                and config.policy.redis_url == self.config.policy.redis_url
            )
            same_cache = (
                current.cache is not None and config.cache.enabled
                and _cache_store_settings(config) == _cache_store_settings(self.config)
            )
            recorder = open_recorder(config, self.reactor)
            recorder, exchange_recorder = with_feed(config, self.reactor, recorder, self.feed)
            try:
                policy = build_gate(
                    config.policy, self.reactor, current.metrics,
                    # The store shared with other processes stays; another
                    # is handed on when its settings are the same.
                    store=shared if shared is not None else (
                        current.policy.store if same_store and current.policy is not None else None
                    ),
                )
                built = build_root(
                    config, self.reactor, recorder=exchange_recorder,
                    ledger=self.feed,
                    upstream=current.upstream if same_pool else None,
                    metrics=current.metrics, health=current.health, policy=policy,
                    cache_store=(
                        current.cache.store if same_cache and current.cache is not None else None
                    ),
                    cache_metrics=current.cache_metrics, store=shared,
                )
            except BaseException:
                if recorder is not None:
                    recorder.close()
                raise
        except (ConfigError, ValueError, OSError) as e:
            self.log.error(
                "reload refused: {why}; the running configuration stays", why=str(e)
            )
            return False
        except Exception:
            self.log.failure("reload failed; the running configuration stays")
            return False
        for name in shadowed:
            self.log.warn(
                "reload: {name} changed in {file} but has no effect: the environment "
                "of a running process cannot change; restart with the new value",
                name=name, file=self.source.env_file,
            )
        self.site.serve(built, config)
        for side, part in self.side_sites:
            side.serve(part(built), (built.gate,))
        if self.admin_service is not None and built.admin is not None:
            self.admin_service.swap(built.admin)
        self.retired.append(
            _Generation(current, self.recorder, own_pool=not same_pool,
                        own_store=shared is None and not (same_store and built.policy is not None),
                        own_cache=not (same_cache and built.cache is not None))
        )
        self.built, self.config, self.recorder = built, config, recorder
        self.log.info("reloaded the configuration; open requests finish on the previous one")
        self._describe()
        if built.key_health is not None:
            built.key_health.start()
        self._close_drained()
        return True

    def _close_drained(self) -> None:
        """Close what retired generations own, once their exchanges ended."""
        for generation in list(self.retired):
            if any(p.open for p in generation.built.proxies):
                defer.DeferredList(
                    [p.drained() for p in generation.built.proxies]
                ).addCallback(lambda _: self._close_drained())
                continue
            self.retired.remove(generation)
            generation.close()

    # ------------------------------------------------------------ stop

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self._restore_sighup is not None:
            self._restore_sighup()
            self._restore_sighup = None
        self.built.health.draining = True
        shared = self.built.shared_store
        generations = [
            _Generation(self.built, self.recorder, own_store=shared is None)
        ] + self.retired
        self.retired = []
        proxies = [p for g in generations for p in g.built.proxies]
        open_count = sum(len(p.open) for p in proxies)
        if open_count:
            self.log.info(
                "draining {count} open request(s) for up to {grace}s",
                count=open_count, grace=self.config.shutdown_grace,
            )
            drained = defer.DeferredList([p.drained() for p in proxies], consumeErrors=True)
            # On timeout the DeferredList is cancelled, which fires it.
            yield drained.addTimeout(self.config.shutdown_grace, self.reactor)
            for proxy in proxies:
                for exchange in list(proxy.open):
                    exchange.abort()
        # Every exchange has ended (and so settled or released its policy
        # reservation, and stored its answer in the cache): close the pools,
        # the stores, then the chat records.
        yield defer.DeferredList([g.close() for g in generations], consumeErrors=True)
        if shared is not None:
            # The store shared with other processes, which gives back any
            # reservation still open.
            yield shared.close()
        if self.ledger is not None and self.ledger.running:
            # Last: every exchange has ended, so its figures are pending.
            yield self.ledger.stopService()
        # twistd and twist re-raise the terminating signal at exit, so a
        # supervisor would see "killed by SIGTERM".  The shutdown was
        # orderly: report success (exit status 0) instead.
        clear_exit_signal(self.reactor)


@dataclass
class _Generation:
    """One configuration's tree and what it alone owns, for closing.

    :ivar own_pool: whether its upstream pool is its own (not handed on to
        the next generation by a reload).
    :ivar own_store: likewise for its policy gate's counting store.
    :ivar own_cache: likewise for its response cache's store.
    """

    built: Built
    recorder: Optional[ChatRecorder]
    own_pool: bool = True
    own_store: bool = True
    own_cache: bool = True

    @defer.inlineCallbacks
    def close(self) -> Any:
        try:
            if self.own_pool:
                yield self.built.upstream.close()
        finally:
            try:
                if self.own_cache and self.built.cache is not None:
                    yield self.built.cache.close()
                if self.own_store and self.built.policy is not None:
                    yield self.built.policy.store.close()
            finally:
                if self.recorder is not None:
                    yield self.recorder.close()


def admin_resource(built: Built) -> IResource:
    """What ADMIN_PORT serves: the admin page and API of ``built``."""
    assert built.admin is not None  # ADMIN_PORT needs ADMIN_KEY
    return built.admin.resource


def side_metrics(built: Built) -> IResource:
    """What METRICS_PORT serves: ``built``'s metrics, with no key (the port
    is the operator's choice of who can reach it, behind the IP gate)."""
    return MetricsResource(built.metrics)


def _cache_store_settings(config: Config) -> tuple[Any, ...]:
    """The settings the response cache's store is opened with."""
    c = config.cache
    return (c.backend, c.root, c.redis_url, c.max_bytes)


def _pool_settings(config: Config) -> tuple[Any, ...]:
    """The settings the upstream connection pool is built from."""
    return (config.connect_timeout, config.proxy, config.ssl_cert_file)


def makeService(
    options: Options,
    reactor: Optional[Any] = None,
    environ: Optional[dict[str, str]] = None,
    endpoint: Optional[IStreamServerEndpoint] = None,
    worker: bool = False,
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
    :param worker: build a worker of ``--workers`` (its supervisor serves
        METRICS_PORT).
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        return build_service(options, reactor, environ, endpoint, worker)
    except (ConfigError, ValueError) as e:
        # One clear line, not a traceback.
        sys.stderr.write(f"openai-forward: {e}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None


def build_service(
    options: Options,
    reactor: Any,
    environ: Optional[dict[str, str]] = None,
    endpoint: Optional[IStreamServerEndpoint] = None,
    worker: bool = False,
) -> IService:
    """:func:`makeService`'s work, for callers that report a start-up
    failure themselves (a worker tells its supervisor).

    :raises ConfigError: (or ValueError) naming the setting and the fix.
    """
    source = ConfigSource(
        options.setting_values(),
        dict(os.environ if environ is None else environ),
        options["env-file"],
    )
    config = source.load()
    # Before anything derives its caps from the limit (and before workers,
    # which inherit it, are spawned).
    before, after = raise_descriptor_limit()
    _log.info(
        "open-descriptor limit {before} raised to {after} (the hard limit allows it)"
        if after > before else "open-descriptor limit {after} (not raised)",
        before=before, after=after,
    )
    if endpoint is None:
        endpoint = endpoint_from_string(reactor, options["endpoint"], "--port")
    metrics_endpoint = None
    if config.metrics_port is not None and config.metrics != METRICS_OFF and not worker:
        metrics_endpoint = endpoint_from_string(
            reactor, config.metrics_port, "METRICS_PORT (--metrics-port)"
        )
    admin_endpoint = None
    if config.admin_port is not None:
        admin_endpoint = endpoint_from_string(
            reactor, config.admin_port, "ADMIN_PORT (--admin-port)"
        )
    if not worker:
        # The supervisor checks for its workers.
        check_redis(config)
    if options["workers"]:
        from .supervisor import WorkerPool, make_supervisor

        if config.admin_port is not None:
            raise ConfigError("ADMIN_PORT (--admin-port): not with --workers")
        check_log_dir(config)
        check_data_dir(config)

        supervisor = make_supervisor(
            options["workers"],
            options["endpoint"],
            {"port": options["port"], "env-file": options["env-file"],
             **options.setting_values()},
            dict(os.environ if environ is None else environ),
            config.shutdown_grace,
            reactor,
            source=source,
            share_store=config.policy.redis_url is None,
            metrics_port=(
                (metrics_endpoint, config.metrics_port, config)
                if metrics_endpoint is not None and config.metrics_port is not None else None
            ),
        )
        for child in supervisor:
            shared_port = child.bound if isinstance(child, WorkerPool) else None
            if shared_port is not None:
                try:
                    refuse_own_address(config, source, shared_port)
                except ConfigError:
                    shared_port.stopListening()
                    raise
        return supervisor
    recorder = open_recorder(config, reactor)
    ledger = open_ledger(config, reactor)
    top = MultiService()
    LogReopenService(reactor).setServiceParent(top)
    # The exchanges feed the ledger; with the admin page on, through its
    # live tally (which counts tokens for the live figures on the way).
    feed: Optional[ILedger] = ledger
    if config.admin_key is not None:
        feed = LiveTally(ledger)
    recorder, exchange_recorder = with_feed(config, reactor, recorder, feed)
    # A store the configuration names that cannot be opened raises
    # ValueError: one line, from makeService.
    shared = open_shared_store(
        config.policy, reactor, os.environ if environ is None else environ,
        ca_file=config.ssl_cert_file,
    )
    built = build_root(
        config, reactor, recorder=exchange_recorder, ledger=feed,
        store=shared,
    )
    site = make_site(built, config, reactor)
    # The side ports run the proxy's IP gate on every request head, as its
    # own port does (and follow reloads with it).
    side_sites: list[tuple[SidePortSite, Callable[[Built], IResource]]] = []
    admin_site = None
    if built.admin is not None and admin_endpoint is not None:
        admin_site = SidePortSite(
            admin_resource(built), reactor=reactor, head_checks=(built.gate,)
        )
        side_sites.append((admin_site, admin_resource))
    metrics_site = None
    if metrics_endpoint is not None:
        metrics_site = SidePortSite(
            side_metrics(built), reactor=reactor, head_checks=(built.gate,)
        )
        side_sites.append((metrics_site, side_metrics))
    admin_service = AdminService(built.admin) if built.admin is not None else None
    ProxyService(
        built, config, reactor, recorder, ledger,
        site=site, source=source, admin_service=admin_service, feed=feed,
        side_sites=side_sites,
    ).setServiceParent(top)
    if admin_service is not None:
        # Added before the listeners: stopped after they are, it ends the
        # open event streams so the proxy can drain.
        admin_service.setServiceParent(top)
    # Bound last, so nothing after can fail with a port left open.
    port = listen_now(endpoint, site, "--port", options["port"])
    try:
        refuse_own_address(config, source, port)
    except ConfigError:
        port.stopListening()
        raise
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
