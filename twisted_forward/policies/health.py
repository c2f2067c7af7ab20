"""
Default keys' health, shared: one process's discovery protects all.

When this process rests a default key (the upstream said 429) or revokes it
(a 401 saying the key is dead), :class:`KeyHealthLink` tells the shared store
(:class:`~.store.IKeyHealth`: the ``--workers`` supervisor, or Redis); marks
any process makes come back through the store's ``watch`` and are applied
to this process's :class:`~twisted_forward.keys.DefaultKeys`.  Keys are named
in the store by :func:`~.store.key_id`, a digest, never the key.

Reading a key's health stays local and free: the store pushes (supervisor)
or is polled in the background (Redis), never asked per request.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..keys import DefaultKeys
from .store import Mark, key_id


class KeyHealthLink:
    """Keeps one process's default keys in step with the shared health.

    :param keys: this process's default keys.
    :param secrets: the same keys, in the same order (only their digests
        leave this object).
    :param health: the shared store's :class:`~.store.IKeyHealth`.
    """

    log = Logger()

    def __init__(
        self, keys: DefaultKeys, secrets: Sequence[str], health: Any, clock: IReactorTime
    ) -> None:
        self.keys = keys
        self.health = health
        self.clock = clock
        self._ids = [key_id(k) for k in secrets]
        self._index = {kid: i for i, kid in enumerate(self._ids)}

    def start(self) -> None:
        """Learn the marks made so far, and follow every mark from now on."""
        self.keys.observe(self._local)
        self.health.watch(self._shared)

        def known(marks: Any) -> None:
            for kid, until in marks.items():
                self._shared(kid, until)

        self.health.marks(self.clock.seconds()).addCallbacks(known, self._not_shared)

    def _local(self, index: int, until: Optional[float]) -> None:
        if not 0 <= index < len(self._ids):
            return
        self.health.mark(self._ids[index], until).addErrback(self._not_shared)

    def _shared(self, kid: str, until: Mark) -> None:
        index = self._index.get(kid)
        if index is not None and self.keys.apply(index, until):
            self.log.info(
                "default key {key} {state} (learnt from the shared store)",
                key=self.keys.label(index),
                state="leaves the rotation" if until is None else "rests",
            )

    def _not_shared(self, failure: Failure) -> None:
        self.log.warn("default keys' health not shared: {why}", why=failure.getErrorMessage())
