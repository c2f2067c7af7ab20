"""
The ``--workers`` policy store: the supervisor owns the counters, workers ask
it over AMP.

With ``--workers N`` the supervisor keeps one
:class:`~.memory.MemoryStore` and serves it to each worker over a unix
socket pair made for that worker (the worker finds its end on file
descriptor :data:`STORE_FD`).  Every counter lives in one process, so limits
are exact across the workers with no extra server, and each check is one
round trip on a local socket.  AMP (Twisted's own RPC) frames the calls and
matches answers to questions, so a worker may have many calls in flight.

Why this design: the alternatives were shared memory (locks across
processes, and no cleanup when a worker dies) or a file database (a disk
write per request).  Here the supervisor also sees each worker's
connection end: when a worker dies, every reservation it still held is
given back at once (:meth:`StoreServer.connectionLost`), so a crashed
worker leaks no slot and no tokens.

Default-key health travels the same way: a worker that finds a key revoked
(401) or resting (429) tells the supervisor (:class:`MarkKey`), which tells
every worker (:class:`KeyMarked`), so one worker's discovery protects all,
and checking a key's health costs no round trip.

Every call from a worker is bounded by its ``timeout``; one that fails or
times out errs with :class:`~.store.StoreUnavailable`.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorSocket, IReactorTime
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from .memory import MemoryStore
from .store import (
    Bucket,
    BucketState,
    IKeyHealth,
    IPolicyStore,
    IStoreInfo,
    Mark,
    Settlement,
    StoreUnavailable,
    Verdict,
)

#: The file descriptor a worker finds its end of the store socket on.
STORE_FD = 4

_BUCKET = [
    (b"id", amp.Unicode()),
    (b"kind", amp.Unicode()),
    (b"limit", amp.Integer()),
    (b"amount", amp.Integer()),
    (b"seconds", amp.Float()),
    (b"start", amp.Float()),
]


class Reserve(amp.Command):
    """Take from every bucket, or from none (:meth:`IPolicyStore.reserve`)."""

    arguments = [
        (b"reservation", amp.Unicode()),
        (b"buckets", amp.AmpList(_BUCKET)),
        (b"now", amp.Float()),
    ]
    response = [
        (b"granted", amp.Boolean()),
        (b"states", amp.AmpList([
            (b"limit", amp.Integer()),
            (b"remaining", amp.Integer()),
            (b"reset", amp.Float()),
        ])),
        (b"refused", amp.Integer(optional=True)),
        (b"retry_after", amp.Float()),
    ]


class Settle(amp.Command):
    """Replace reserved amounts by real ones (:meth:`IPolicyStore.settle`)."""

    arguments = [
        (b"reservation", amp.Unicode()),
        (b"settlements", amp.AmpList(_BUCKET + [(b"settled", amp.Integer())])),
        (b"now", amp.Float()),
    ]
    response = []


class MarkKey(amp.Command):
    """A worker tells the supervisor a default key rests or is revoked."""

    arguments = [(b"key", amp.Unicode()), (b"until", amp.Float(optional=True))]
    response = []


class KeyMarks(amp.Command):
    """A worker asks for every key resting or revoked now."""

    arguments = [(b"now", amp.Float())]
    response = [(b"marks", amp.AmpList([
        (b"key", amp.Unicode()),
        (b"until", amp.Float(optional=True)),
    ]))]


class KeyMarked(amp.Command):
    """The supervisor tells a worker a default key rests or is revoked."""

    arguments = [(b"key", amp.Unicode()), (b"until", amp.Float(optional=True))]
    response = []
    requiresAnswer = False


def _bucket_box(bucket: Bucket) -> dict[str, Any]:
    return {"id": bucket.id, "kind": bucket.kind, "limit": bucket.limit,
            "amount": bucket.amount, "seconds": bucket.seconds, "start": bucket.start}


def _box_bucket(box: Mapping[str, Any]) -> Bucket:
    return Bucket(box["id"], box["kind"], box["limit"], box["amount"], box["seconds"], box["start"])


def _adopt(reactor: IReactorSocket, fd: int, make: Callable[[], amp.AMP]) -> Any:
    """Run a new ``make()`` protocol on the connected unix socket ``fd``
    (which the caller may close afterwards: the reactor keeps its own copy)."""
    built: list[amp.AMP] = []

    class _Once(ServerFactory):
        def buildProtocol(self, addr: Any) -> amp.AMP:
            protocol = make()
            built.append(protocol)
            return protocol

    reactor.adoptStreamConnection(fd, socket.AF_UNIX, _Once())
    return built[0]


# ---------------------------------------------------------------- supervisor side


class StoreHub:
    """The supervisor's store, and its connections to the workers.

    :param store: the one store every worker shares.
    :param clock: the time reservations of a vanished worker are given back at.
    """

    log = Logger()

    def __init__(self, store: MemoryStore, clock: IReactorTime) -> None:
        self.store = store
        self.clock = clock
        self.connections: set[StoreServer] = set()
        store.watch(self._marked)

    def _marked(self, key: str, until: Mark) -> None:
        for connection in list(self.connections):
            connection.callRemote(KeyMarked, key=key, until=until)

    def serve(self, reactor: IReactorSocket, fd: int) -> "StoreServer":
        """Serve the store on our end of a socket pair (``fd``, which the
        caller may close afterwards: the reactor keeps its own copy)."""
        server: StoreServer = _adopt(reactor, fd, lambda: StoreServer(self))
        self.connections.add(server)
        return server

    def pair(self, reactor: IReactorSocket) -> socket.socket:
        """A new socket pair: ours is served at once, the other is returned
        for a worker (the caller hands it over, then closes it)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.serve(reactor, ours.fileno())
        finally:
            ours.close()
        return theirs


class StoreServer(amp.AMP):
    """The supervisor's end of one worker's store connection.

    Remembers the reservations the worker holds, to give them back if the
    worker goes away without settling them.
    """

    def __init__(self, hub: StoreHub) -> None:
        super().__init__()
        self.hub = hub
        #: Reservations the worker holds: name -> its buckets.
        self.open: dict[str, dict[Bucket, None]] = {}
        #: Fires once the connection is gone and its holdings given back.
        self.gone: Deferred[None] = Deferred()

    @Reserve.responder
    def reserve(self, reservation: str, buckets: list[dict[str, Any]], now: float) -> dict[str, Any]:
        wanted = [_box_bucket(b) for b in buckets]
        verdict = self.hub.store.reserve_now(reservation, wanted, now)
        if verdict.granted and wanted:
            held = self.open.setdefault(reservation, {})
            for bucket in wanted:
                held[bucket] = None
        return {
            "granted": verdict.granted,
            "states": [
                {"limit": s.limit, "remaining": s.remaining, "reset": s.reset}
                for s in verdict.states
            ],
            "refused": verdict.refused,
            "retry_after": verdict.retry_after,
        }

    @Settle.responder
    def settle(self, reservation: str, settlements: list[dict[str, Any]], now: float) -> dict[str, Any]:
        held = self.open.get(reservation)
        if held is None:
            return {}  # settled already, or never granted
        todo = []
        for box in settlements:
            bucket = _box_bucket(box)
            if bucket in held:
                del held[bucket]
                todo.append(Settlement(bucket, box["settled"]))
        if not held:
            del self.open[reservation]
        self.hub.store.settle_now(reservation, todo, now)
        return {}

    @MarkKey.responder
    def mark(self, key: str, until: Optional[float]) -> "Deferred[dict[str, Any]]":
        return self.hub.store.mark(key, until).addCallback(lambda _: {})

    @KeyMarks.responder
    def marks(self, now: float) -> dict[str, Any]:
        marks = self.hub.store.marks_now(now)
        return {"marks": [{"key": k, "until": u} for k, u in marks.items()]}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.hub.connections.discard(self)
        if self.open:
            now = self.hub.clock.seconds()
            self.hub.log.info(
                "a worker went away holding {count} reservation(s); giving them back",
                count=len(self.open),
            )
            for reservation, held in self.open.items():
                self.hub.store.settle_now(
                    reservation, [Settlement(b, 0) for b in held], now
                )
            self.open = {}
        self.gone.callback(None)


# ---------------------------------------------------------------- worker side


class StoreClient(amp.AMP):
    """A worker's end of the store connection: receives key marks."""

    def __init__(self, on_marked: Callable[[str, Mark], None]) -> None:
        super().__init__()
        self.on_marked = on_marked
        self.gone: Deferred[None] = Deferred()

    @KeyMarked.responder
    def marked(self, key: str, until: Optional[float]) -> dict[str, Any]:
        self.on_marked(key, until)
        return {}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.gone.callback(None)


@implementer(IPolicyStore, IKeyHealth, IStoreInfo)
class SupervisorStore:
    """A worker's policy store: every call goes to the supervisor.

    :param clock: for timeouts.
    :param timeout: seconds any one call may take.
    """

    name = "supervisor"
    log = Logger()

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self._watchers: list[Callable[[str, Mark], None]] = []
        self.protocol: Optional[StoreClient] = None

    def connect(self, reactor: IReactorSocket, fd: int = STORE_FD) -> None:
        """Talk to the supervisor over the socket on ``fd`` (then closed:
        the reactor keeps its own copy)."""
        self.protocol = _adopt(reactor, fd, lambda: StoreClient(self._marked))
        os.close(fd)

    def start(self) -> None:
        """Nothing to do: the connection is made by :meth:`connect`."""

    def _marked(self, key: str, until: Mark) -> None:
        for watcher in list(self._watchers):
            watcher(key, until)

    def _call(self, command: type[amp.Command], **kwargs: Any) -> "Deferred[dict[str, Any]]":
        protocol = self.protocol
        if protocol is None or protocol.gone.called:
            return fail(StoreUnavailable("supervisor: not connected"))
        d = protocol.callRemote(command, **kwargs)
        d.addTimeout(self.timeout, self.clock)

        def unavailable(failure: Failure) -> Failure:
            return Failure(StoreUnavailable(f"supervisor: {failure.getErrorMessage()}"))

        return d.addErrback(unavailable)

    # ------------------------------------------------------------ IPolicyStore

    def reserve(self, reservation: str, buckets: Sequence[Bucket], now: float) -> "Deferred[Verdict]":
        d = self._call(Reserve, reservation=reservation,
                       buckets=[_bucket_box(b) for b in buckets], now=now)

        def verdict(answer: dict[str, Any]) -> Verdict:
            states = tuple(
                BucketState(s["limit"], s["remaining"], s["reset"]) for s in answer["states"]
            )
            return Verdict(answer["granted"], states, answer.get("refused"),
                           answer["retry_after"])

        return d.addCallback(verdict)

    def settle(
        self, reservation: str, settlements: Sequence[Settlement], now: float
    ) -> "Deferred[None]":
        boxes = [dict(_bucket_box(s.bucket), settled=s.amount) for s in settlements]
        return self._call(Settle, reservation=reservation, settlements=boxes,
                          now=now).addCallback(lambda _: None)

    def close(self) -> "Deferred[None]":
        """Drop the connection: the supervisor gives back whatever this
        worker still holds."""
        protocol, self.protocol = self.protocol, None
        if protocol is None or protocol.gone.called:
            return succeed(None)
        assert protocol.transport is not None  # connected: gone has not fired
        protocol.transport.loseConnection()
        return protocol.gone

    # ------------------------------------------------------------ IKeyHealth

    def mark(self, key: str, until: Mark) -> "Deferred[None]":
        return self._call(MarkKey, key=key, until=until).addCallback(lambda _: None)

    def marks(self, now: float) -> "Deferred[Mapping[str, Mark]]":
        d = self._call(KeyMarks, now=now)
        return d.addCallback(lambda answer: {m["key"]: m.get("until") for m in answer["marks"]})

    def watch(self, callback: Callable[[str, Mark], None]) -> None:
        self._watchers.append(callback)
