"""
``--workers N``, the supervisor's side: N processes serving one listening socket.

One Twisted process uses one core.  With ``--workers N`` the twistd process
becomes a supervisor: it binds the port the endpoint string names (so every
option of ``tcp:``, ``tcp6:``, ``unix:`` and ``systemd:`` endpoints applies,
and privileges needed to bind are only needed there), never accepts on it,
and starts N worker processes (``python -m twisted_forward.worker``, :mod:`twisted_forward.worker`).  Each
worker gets the listening socket as file descriptor 3 and adopts it
(``reactor.adoptStreamPort``), so the kernel hands each new connection to
whichever worker accepts it first; workers take one connection per wake-up,
so a burst of connections is shared out instead of going to the first worker
awake (:class:`SharedSocketEndpoint`).  Each worker gets the plugin's options as
one JSON line on its standard input (not on its command line, where ``ps``
would show a key given as an option) and builds the very same service the
single-process proxy runs.

A worker that dies is started again, at once if it had run for a while,
after a growing delay (up to 30 s) if it keeps dying young.  SIGTERM (or
SIGINT) to the supervisor sends SIGTERM to every worker; each stops
accepting, drains its open exchanges for up to ``SHUTDOWN_GRACE`` seconds
and exits; the supervisor closes the socket and exits once all have (killing
any still there ``SHUTDOWN_GRACE + 10`` seconds later).  A worker whose supervisor vanished
(its standard input reaches end of file) stops by itself.

Workers write their log lines straight to the supervisor's standard output
and error, each line tagged ``worker-<n>``.  Each worker writes its own chat
records; it finds its number in ``TWISTED_FORWARD_WORKER``.

Unless ``REDIS_URL`` is set, the supervisor also keeps the policy counters
and the default keys' health for all the workers, so limits are exact across
them: each worker talks to it over its own unix socket pair, found on file
descriptor 4 (:mod:`twisted_forward.policies.amp_store`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import typing
from typing import Any, Callable, Optional, cast

from prometheus_client.multiprocess import mark_process_dead
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer, endpoints
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IAddress, IDelayedCall, IListeningPort, IProcessTransport
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._compat import clear_exit_signal
from .config import Config, ConfigError
from .exitstatus import give_up
from .logfiles import LogReopenService
from .metrics import MULTIPROC_ENV
from .metrics_folder import MetricsFolder, sweep
from .policies.amp_store import STORE_FD, StoreHub
from .policies.memory import MemoryStore
from .policies.shared import STORE_FD_ENV
from .reload import ConfigSource, install_handler

#: The file descriptor a worker finds the listening socket on.
LISTEN_FD = 3
#: A worker that ran this long is restarted at once when it dies.
STABLE_AFTER = 10.0
#: Restart delays for workers that keep dying young.
FIRST_DELAY = 0.5
MAX_DELAY = 30.0
#: A worker that dies young this many times in a row makes the supervisor
#: give up and exit 1: a broken set-up that restarting does not mend.
GIVE_UP_AFTER = 3
#: Extra time after the shutdown grace before stragglers are killed.
KILL_MARGIN = 10.0
#: The environment variable holding a worker's number (1..N).
WORKER_ENV = "TWISTED_FORWARD_WORKER"
#: The file descriptor a worker writes its one-line start-up error to (a
#: pipe the supervisor reads), named to the worker in :data:`REPORT_FD_ENV`.
REPORT_FD = 5
REPORT_FD_ENV = "TWISTED_FORWARD_REPORT_FD"
#: The most of a worker's report the supervisor keeps.
MAX_REPORT = 4096

_ADOPTABLE = (
    endpoints.TCP4ServerEndpoint,
    endpoints.TCP6ServerEndpoint,
    endpoints.UNIXServerEndpoint,
    endpoints.AdoptedStreamServerEndpoint,
)


class WorkersError(ValueError):
    """``--workers`` cannot be used as asked; the text says why."""


def check_endpoint(reactor: Any, description: str) -> None:
    """Refuse endpoints whose listening socket a worker cannot adopt.

    :raises WorkersError: for TLS and other wrapped endpoints.
    """
    endpoint = endpoints.serverFromString(reactor, description)
    if not isinstance(endpoint, _ADOPTABLE):
        raise WorkersError(
            f"--workers needs a tcp:, tcp6:, unix: or systemd: port, not {description!r} "
            "(terminate TLS in front of the proxy, or run one process)"
        )


class SharedPort(typing.Protocol):
    """The listening port the supervisor holds for its workers.

    The tcp:, unix: and systemd: endpoints give a ``tcp.Port`` (``unix.Port``
    is one), which has these beyond ``IListeningPort``: its socket's
    descriptor, to hand to the workers, and its family.
    """

    addressFamily: int

    def fileno(self) -> int: ...

    def stopReading(self) -> None: ...

    def getHost(self) -> IAddress: ...

    def stopListening(self) -> Optional[Deferred[None]]: ...


def _family_name(family: int) -> str:
    for name in ("INET", "INET6", "UNIX"):
        if getattr(socket, "AF_" + name, None) == family:
            return name
    raise WorkersError(f"cannot hand a socket of address family {family} to workers")


def _describe(address: Any) -> str:
    host = getattr(address, "host", None)
    if host is not None:
        return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
    name = getattr(address, "name", None)
    return name.decode() if isinstance(name, bytes) else str(name)


class SharedSocket(Factory):
    """The supervisor's factory: its port never accepts a connection."""

    noisy = False

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        return None


class _Worker(ProcessProtocol):
    """The supervisor's end of one worker process."""

    #: The child process, set before connectionMade.
    transport: IProcessTransport

    def __init__(self, pool: "WorkerPool", index: int, spec: bytes) -> None:
        self.pool = pool
        self.index = index
        self.spec = spec
        self.started = pool.reactor.seconds()
        self.pid: Optional[int] = None
        self._report = b""

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        # Stays open: its end of file tells the worker the supervisor is gone.
        self.transport.writeToChild(0, self.spec)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == REPORT_FD and len(self._report) < MAX_REPORT:
            self._report = (self._report + data)[:MAX_REPORT]

    def cause(self) -> Optional[str]:
        """The start-up error the worker reported (one line), or None."""
        lines = self._report.decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else None

    def processEnded(self, reason: Failure) -> None:
        self.pool._ended(self, reason)


class WorkerPool(Service):
    """The supervisor: owns the listening socket and the worker processes.

    :param options: the plugin's option values to hand to every worker
        (``workers`` left out).
    :param environ: the environment the workers run with.
    :param store_hub: the policy store and default keys' health the workers
        share (:mod:`twisted_forward.policies.amp_store`); each worker gets
        its own socket to it.  None when they share Redis instead.
    """

    log = Logger()

    def __init__(
        self,
        count: int,
        endpoint: str,
        options: dict[str, Optional[str]],
        environ: dict[str, str],
        grace: float,
        reactor: Any,
        executable: str = sys.executable,
        port: Optional[IListeningPort] = None,
        source: Optional[ConfigSource] = None,
        store_hub: Optional[StoreHub] = None,
    ) -> None:
        if count < 1:
            raise WorkersError("--workers must be at least 1")
        self.count = count
        self.endpoint = endpoint
        self.options = {k: v for k, v in options.items() if v is not None}
        self.environ = dict(environ)
        self.grace = grace
        self.reactor = reactor
        self.executable = executable
        self.store_hub = store_hub
        #: Bound by :func:`make_supervisor` already, or bound at start.
        self.bound = port
        #: Where a reload (SIGHUP) reads the configuration; None: no reloads.
        self.source = source
        self._restore_sighup: Optional[Callable[[], None]] = None
        self.port: Optional[SharedPort] = None
        self.workers: dict[int, _Worker] = {}
        self.restarts: dict[int, IDelayedCall] = {}
        self.delays: dict[int, float] = {}
        #: Worker index -> deaths in a row before STABLE_AFTER.
        self.young_deaths: dict[int, int] = {}
        #: Whether a worker ever ran STABLE_AFTER seconds: past that, a
        #: worker dying young is restarted (with back-off), never given up on.
        self.stable = False
        self.stopping = False
        self._all_ended: list[defer.Deferred[None]] = []
        #: The multiprocess metrics folder the workers share (see
        #: :mod:`twisted_forward.metrics`), made at start, removed at stop.
        self.metrics_dir: Optional[str] = None
        self.metrics_folder: Optional[MetricsFolder] = None
        #: The site of METRICS_PORT, when the supervisor serves it.
        self.metrics_site: Any = None
        #: Fires with the listening port once it is bound (for tests).
        self.listening: defer.Deferred[IListeningPort] = defer.Deferred()

    # ------------------------------------------------------------ start

    def startService(self) -> None:
        super().startService()
        self.stopping = False
        if self.metrics_folder is None:
            for path in sweep():
                self.log.info(
                    "removed the metrics folder {path}, left by a supervisor that was killed",
                    path=path,
                )
            # A new folder each start: series of a previous run must not
            # be summed into this one.
            self.metrics_folder = MetricsFolder.create()
            self.metrics_dir = self.metrics_folder.path
        if self.source is not None:
            self._restore_sighup = install_handler(signal.SIGHUP, self.reactor, self.reload)
        if self.bound is not None:
            bound, self.bound = self.bound, None
            self._bound(bound)
            return
        d = endpoints.serverFromString(self.reactor, self.endpoint).listen(SharedSocket())
        d.addCallbacks(self._bound, self._bind_failed)

    def _bind_failed(self, failure: Failure) -> None:
        from .listening import listen_error

        self.log.error(
            "cannot start: --port: {why}", why=listen_error(failure.value, self.endpoint)
        )
        give_up(self.reactor)

    def _bound(self, listening: IListeningPort) -> None:
        port = cast(SharedPort, listening)  # what a socket endpoint gives, see SharedPort
        # The supervisor keeps the socket open for the workers but never
        # accepts on it itself.
        port.stopReading()
        self.port = port
        self.family = _family_name(port.addressFamily)
        self.log.info(
            "listening on {address}; starting {count} worker processes",
            address=_describe(port.getHost()), count=self.count,
        )
        for index in range(1, self.count + 1):
            self._spawn(index)
        self.listening.callback(listening)

    def _spec(self, index: int) -> bytes:
        return json.dumps(
            {"worker": index, "family": self.family, "options": self.options}
        ).encode() + b"\n"

    def _spawn(self, index: int) -> None:
        self.restarts.pop(index, None)
        if self.stopping or self.port is None:
            return
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(self.environ)
        env[WORKER_ENV] = str(index)
        env[REPORT_FD_ENV] = str(REPORT_FD)
        if self.metrics_dir is not None:
            env[MULTIPROC_ENV] = self.metrics_dir
        env["PYTHONPATH"] = os.pathsep.join(
            [here] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        worker = _Worker(self, index, self._spec(index))
        fds: dict[int, Any] = {0: "w", 1: 1, 2: 2, LISTEN_FD: self.port.fileno(), REPORT_FD: "r"}
        store_end = None
        if self.store_hub is not None:
            store_end = self.store_hub.pair(self.reactor)
            fds[STORE_FD] = store_end.fileno()
            env[STORE_FD_ENV] = str(STORE_FD)
        try:
            self.reactor.spawnProcess(
                worker,
                self.executable,
                [self.executable, "-m", "twisted_forward.worker"],
                env=env,
                childFDs=fds,
            )
        finally:
            if store_end is not None:
                store_end.close()  # the worker has its copy
        self.workers[index] = worker
        self.log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    # ------------------------------------------------------------ reload

    def reload(self) -> bool:
        """SIGHUP: check the new configuration, then relay the signal to
        every worker, which reloads and reports on its own log line.

        A configuration the supervisor finds invalid is refused here, once,
        and no worker is disturbed.
        """
        if self.source is None or self.stopping:
            return False
        try:
            config = self.source.load()
        except ConfigError as e:
            self.log.error(
                "reload refused: {why}; the workers keep the running configuration",
                why=str(e),
            )
            return False
        self.grace = config.shutdown_grace
        if self.metrics_site is not None:
            self.metrics_site.serve(self.metrics_site.resource, (ip_gate(config),))
        sent = []
        for index in sorted(self.workers):
            worker = self.workers[index]
            _signal(worker, "HUP")
            sent.append(f"worker {index} (pid {worker.pid})")
        self.log.info(
            "reload: sent to {count} worker(s): {workers}; each reports its result",
            count=len(sent), workers=", ".join(sent) or "none",
        )
        return True

    # ------------------------------------------------------------ deaths

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self.metrics_dir is not None and worker.pid is not None:
            # Its counters stay in the sums; its live gauges go.
            mark_process_dead(worker.pid, self.metrics_dir)
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        why = "exited cleanly" if reason.check(ProcessDone) else reason.getErrorMessage()
        cause = worker.cause()
        if cause is not None:
            why = cause
        if self.stopping:
            self.log.info("worker {index} (pid {pid}) stopped: {why}",
                          index=worker.index, pid=worker.pid, why=why)
            if not self.workers:
                waiters, self._all_ended = self._all_ended, []
                for d in waiters:
                    d.callback(None)
            return
        lived = self.reactor.seconds() - worker.started
        if lived >= STABLE_AFTER:
            self.young_deaths[worker.index] = 0
            self.stable = True
            delay = 0.0
        else:
            deaths = self.young_deaths[worker.index] = self.young_deaths.get(worker.index, 0) + 1
            if deaths >= GIVE_UP_AFTER and not self._ever_stable():
                self.log.error(
                    "cannot start: worker {index} ended {deaths} times in a row within "
                    "{stable:.0f}s of starting: {why}. Stopping: fix the cause and "
                    "start again",
                    index=worker.index, deaths=deaths, stable=STABLE_AFTER,
                    why=why if cause is not None else why + " (its own error is above)",
                )
                give_up(self.reactor)
                return
            delay = min(MAX_DELAY, max(FIRST_DELAY, 2 * self.delays.get(worker.index, 0.0)))
        self.delays[worker.index] = delay
        self.log.warn(
            "worker {index} (pid {pid}) ended after {lived:.1f}s: {why}; "
            "starting it again in {delay:.1f}s",
            index=worker.index, pid=worker.pid, lived=lived, why=why, delay=delay,
        )
        self.restarts[worker.index] = self.reactor.callLater(delay, self._spawn, worker.index)

    def _ever_stable(self) -> bool:
        now = self.reactor.seconds()
        if any(now - w.started >= STABLE_AFTER for w in self.workers.values()):
            self.stable = True
        return self.stable

    # ------------------------------------------------------------ stop

    def ended(self) -> "defer.Deferred[None]":
        """Fires once no worker process is left."""
        if not self.workers:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._all_ended.append(d)
        return d

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        self.stopping = True
        if self._restore_sighup is not None:
            self._restore_sighup()
            self._restore_sighup = None
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()
        if self.workers:
            self.log.info("stopping {count} worker processes", count=len(self.workers))
            for worker in list(self.workers.values()):
                _signal(worker, "TERM")
            done = self.ended()
            timer = self.reactor.callLater(self.grace + KILL_MARGIN, self._kill_stragglers)
            yield done
            if timer.active():
                timer.cancel()
        # Only now: closing a port Twisted bound shuts the socket down for
        # every process holding it, and the workers drain first.
        if self.port is not None:
            port, self.port = self.port, None
            yield port.stopListening()
        if self.metrics_folder is not None:
            self.metrics_folder.remove()
            self.metrics_folder = self.metrics_dir = None
        # As a single proxy does (ProxyService.stopService): twistd would
        # re-raise the SIGTERM that stopped it, and systemd or Docker would
        # see "killed by SIGTERM" (exit 143) after an orderly stop.
        clear_exit_signal(self.reactor)

    def _kill_stragglers(self) -> None:
        for worker in list(self.workers.values()):
            self.log.warn("worker {index} (pid {pid}) did not stop; killing it",
                          index=worker.index, pid=worker.pid)
            _signal(worker, "KILL")


def ip_gate(config: Config) -> Any:
    """The IP gate of the supervisor's METRICS_PORT."""
    from .access import AccessGate

    return AccessGate(config.ip_whitelist, config.ip_blacklist, config.trusted_proxies)


def _signal(worker: _Worker, name: str) -> None:
    try:
        worker.transport.signalProcess(name)
    except Exception:
        pass  # already gone; processEnded will say so


def make_supervisor(
    count: int,
    endpoint: str,
    options: dict[str, Optional[str]],
    environ: dict[str, str],
    grace: float,
    reactor: Any,
    source: Optional[ConfigSource] = None,
    share_store: bool = True,
    metrics_port: Optional[tuple[Any, str, Config]] = None,
) -> MultiService:
    """The service twistd runs for ``--workers N``: the log reopener and
    the :class:`WorkerPool`.

    :param share_store: the supervisor keeps the policy counters and the
        default keys' health for the workers (not when they use Redis).
    :param metrics_port: METRICS_PORT's endpoint, its description and the
        configuration: the supervisor serves the workers' summed metrics
        there, behind the IP gate.
    """
    from .listening import endpoint_from_string, listen_now

    check_endpoint(reactor, endpoint)
    # Bound now, so a port in use stops start-up with one line (see
    # twisted_forward.listening).
    port = listen_now(
        endpoint_from_string(reactor, endpoint, "--port"), SharedSocket(), "--port", endpoint
    )
    top = MultiService()
    LogReopenService(reactor).setServiceParent(top)
    hub = StoreHub(MemoryStore(), reactor) if share_store else None
    pool = WorkerPool(
        count, endpoint, options, environ, grace, reactor, port=port, source=source,
        store_hub=hub,
    )
    pool.setServiceParent(top)
    if metrics_port is not None:
        try:
            serve_metrics(pool, *metrics_port, reactor).setServiceParent(top)
        except ConfigError:
            port.stopListening()
            raise
    return top


def serve_metrics(
    pool: WorkerPool, endpoint: Any, description: str, config: Config, reactor: Any
) -> IService:
    """METRICS_PORT under ``--workers``: bound now, served by the supervisor,
    every scrape the sum over the workers' multiprocess folder, behind the
    IP gate (as on the workers' port; a reload brings the new lists).

    :raises ConfigError: when the port cannot be had.
    """
    from twisted.application.internet import StreamServerEndpointService

    from .listening import BoundEndpoint, listen_now
    from .metrics import MetricsResource, WorkersFolder
    from .site import SidePortSite

    site = SidePortSite(
        MetricsResource(None, source=WorkersFolder(lambda: pool.metrics_dir)), reactor=reactor,
        head_checks=(ip_gate(config),),
    )
    bound = listen_now(endpoint, site, "METRICS_PORT (--metrics-port)", description)
    pool.metrics_site = site
    log = Logger(namespace="twisted_forward.supervisor")
    log.info(
        "metrics of all the workers, summed, on {address} (METRICS_PORT; any path, "
        "{path} included)", address=_describe(bound.getHost()), path=config.metrics_path,
    )
    return StreamServerEndpointService(BoundEndpoint(bound, site), site)
