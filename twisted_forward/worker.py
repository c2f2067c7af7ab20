"""
``--workers N``, the worker's side: a process the supervisor
(:mod:`twisted_forward.supervisor`) started, serving on the socket it shares.

The worker reads its options as one JSON line on standard input, builds the
very same service the single-process proxy runs, adopts the listening socket
(file descriptor 3) and takes turns at accepting on it; it stops when told
(SIGTERM) or when its supervisor is gone (standard input at end of file).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import Any, Callable, NoReturn, Optional

from twisted.application.service import IServiceCollection
from twisted.internet import defer, endpoints, fdesc, tcp
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._compat import limit_accepts_per_read
from .config import ConfigError
from .supervisor import LISTEN_FD, REPORT_FD_ENV
from .tap import Options, ProxyService, build_service

#: Connections a worker accepts per wake-up (see :class:`SharedSocketEndpoint`).
ACCEPT_BATCH = 1


@implementer(IStreamServerEndpoint)
class SharedSocketEndpoint:
    """Adopts the supervisor's listening socket, and takes turns with the
    other workers at accepting from it.

    Every worker waiting on the socket wakes when a connection arrives, and
    a Twisted port accepts as many connections as it can per wake-up (it
    learns to take up to 100 or more at a time).  On a shared socket that
    lets the first worker awake take a whole burst, such as a client's pool
    of keep-alive connections, and the others none.  Here a worker accepts
    at most :data:`ACCEPT_BATCH` per wake-up, leaving the rest to whoever is
    awake next.
    """

    def __init__(self, reactor: Any, fileno: int, family: int, batch: int = ACCEPT_BATCH) -> None:
        self._adopted = endpoints.AdoptedStreamServerEndpoint(reactor, fileno, family)
        self.batch = batch

    def listen(self, factory: IProtocolFactory) -> "defer.Deferred[IListeningPort]":
        return self._adopted.listen(factory).addCallback(self._take_turns)

    def _take_turns(self, port: IListeningPort) -> IListeningPort:
        # An adopted stream socket is a tcp.Port (unix.Port is one).
        if not isinstance(port, tcp.Port):
            raise TypeError(f"an adopted socket gave {port!r}, not a tcp.Port")
        limit_accepts_per_read(port, self.batch)
        return port



@implementer(ILogObserver)
class _Tagged:
    """Log events marked with the worker they come from, in ``log_system``."""

    def __init__(self, observer: ILogObserver, tag: str) -> None:
        self.observer = observer
        self.tag = tag

    def __call__(self, event: dict[str, Any]) -> None:
        event = dict(event)
        system = event.get("log_system")
        event["log_system"] = self.tag if system in (None, "-") else f"{self.tag} {system}"
        self.observer(event)


@implementer(IReadDescriptor)
class _ParentWatch:
    """Reads the worker's standard input; its end of file means the
    supervisor is gone."""

    def __init__(self, on_gone: Callable[[], None]) -> None:
        self.on_gone = on_gone

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "supervisor-pipe"

    def doRead(self) -> Optional[Any]:
        from twisted.internet.main import CONNECTION_DONE

        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        return None if data else CONNECTION_DONE

    def connectionLost(self, reason: Failure) -> None:
        self.on_gone()


def _read_spec() -> dict[str, Any]:
    """The one JSON line the supervisor writes first, read without buffering
    past it."""
    line = bytearray()
    while not line.endswith(b"\n"):
        data = os.read(0, 1)
        if not data:
            raise SystemExit("openai-forward worker: no instructions from the supervisor")
        line += data
    return json.loads(line)


def _options_argv(values: dict[str, str]) -> list[str]:
    return [f"--{name}={value}" for name, value in values.items()]


def _cannot_start(why: str) -> NoReturn:
    """Tell the supervisor why this worker cannot start (one line, on the
    report pipe it gave; standard error without one), and exit 1."""
    line = why.replace("\n", " ") + "\n"
    fd = os.environ.get(REPORT_FD_ENV, "")
    try:
        if not fd.isdigit():
            raise OSError("no report pipe")
        os.write(int(fd), line.encode("utf-8", "replace"))
    except OSError:
        sys.stderr.write("openai-forward worker: " + line)
        sys.stderr.flush()
    raise SystemExit(1)


def worker_main() -> None:
    """Entry point of a worker process (``python -m twisted_forward.worker``)."""
    # A reload relayed while this worker starts must not kill it (SIGHUP's
    # default); it reads the configuration as it is now anyway.  The
    # service installs its reload handler when it starts.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    spec = _read_spec()
    index = int(spec["worker"])
    family = getattr(socket, "AF_" + spec["family"])

    from twisted.logger import globalLogBeginner, textFileLogObserver

    tagged = _Tagged(textFileLogObserver(sys.stdout), f"worker-{index}")
    globalLogBeginner.beginLoggingTo([tagged], redirectStandardIO=False)

    from twisted.internet import reactor

    options = Options()
    values = {k: v for k, v in spec["options"].items() if k != "workers"}
    options.parseOptions(_options_argv(values))
    try:
        service = build_service(
            options, reactor, endpoint=SharedSocketEndpoint(reactor, LISTEN_FD, family),
            worker=True,
        )
    except (ConfigError, ValueError) as e:
        _cannot_start(str(e))
    for child in IServiceCollection(service):
        if isinstance(child, ProxyService):
            child.built.health.extra.update({"worker": index, "pid": os.getpid()})

    log = Logger(namespace="twisted_forward.worker")

    def supervisor_gone() -> None:
        log.warn("the supervisor is gone; stopping")
        reactor.stop()

    watch = _ParentWatch(supervisor_gone)
    fdesc.setNonBlocking(0)

    def start() -> None:
        service.startService()
        reactor.addReader(watch)
        log.info("worker {index} serving (pid {pid})", index=index, pid=os.getpid())

    def stop() -> Any:
        # From here on the supervisor closing the pipe is no news.
        reactor.removeReader(watch)
        return service.stopService()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()


if __name__ == "__main__":
    worker_main()
