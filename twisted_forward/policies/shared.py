"""
Which store holds the shared state, by deployment.

==========================  ===============================================
one process                 in memory (:class:`~.memory.MemoryStore`)
``--workers N``             the supervisor's memory, over AMP
                            (:class:`~.amp_store.SupervisorStore`)
several instances           Redis or Valkey, ``REDIS_URL``
                            (:class:`~.redis_store.RedisStore`)
==========================  ===============================================

REDIS_URL wins: workers of an instance that uses Redis each talk to Redis.
A shared store is wrapped in :class:`~.failover.GuardedStore`, so an outage
costs requests one timeout, not one each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from twisted.internet.interfaces import IReactorSocket, IReactorTime

from .settings import PolicyConfig

if TYPE_CHECKING:
    from .failover import GuardedStore

#: The environment variable telling a worker which file descriptor holds
#: its end of the supervisor's store socket.
STORE_FD_ENV = "TWISTED_FORWARD_STORE_FD"


def open_shared_store(
    config: PolicyConfig,
    reactor: IReactorTime,
    environ: Mapping[str, str],
    failed: Optional[Callable[[str], None]] = None,
    ca_file: Optional[str] = None,
) -> Optional["GuardedStore"]:
    """The shared store this process should use, or None for memory.

    :param environ: where a worker finds :data:`STORE_FD_ENV`.
    :param failed: called with the store's name for each failed call.
    :param ca_file: CAs to check a ``rediss://`` server against (else the
        system's).
    """
    from .failover import GuardedStore

    if config.redis_url:
        from .. import redis_link
        from .redis_store import RedisStore, connection

        target = redis_link.parse_redis_url(config.redis_url)
        timeout = config.store_timeout

        def connect() -> Any:
            return connection(target, timeout, ca_file=ca_file)

        return GuardedStore(RedisStore(connect, reactor, timeout), reactor, failed)
    fd = environ.get(STORE_FD_ENV)
    if fd is not None and fd.isdigit():
        from .amp_store import SupervisorStore

        store = SupervisorStore(reactor, config.store_timeout)
        # A worker's reactor is the process's own: it also adopts sockets.
        store.connect(IReactorSocket(reactor), int(fd))
        return GuardedStore(store, reactor, failed)
    return None
