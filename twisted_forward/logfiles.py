"""
SIGUSR1: the twistd log file, after logrotate or by twistd itself.

twistd's own SIGUSR1 renames ``--logfile`` to ``name.1`` (shifting older
ones) and opens a new file, but does nothing if the file is already gone:
after logrotate has moved it, twistd would write to the moved file forever.
:class:`LogReopenService` keeps twistd's rotation and adds the reopen: on
SIGUSR1, if the file at the log's path is no longer the one being written
(moved or deleted by an external tool), the path is opened anew; otherwise
twistd rotates as before.

Chat records need no signal: their writer notices a moved or deleted file
at its next write and opens the path again
(:class:`twisted_forward.chat.files.RecordFiles`).
"""

from __future__ import annotations

import os
import signal
from typing import Any, Optional

from twisted.application.service import Service
from twisted.logger import Logger

from ._compat import twistd_log_file


def _identity(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


_log = Logger()


def _say_nothing_to_reopen() -> None:
    _log.info("SIGUSR1 ignored: no log file to reopen (logs go to standard output)")


def _nothing_to_reopen(_signum: int, _frame: Any) -> None:
    """The SIGUSR1 handler when twistd writes no log file: one log line
    (from the reactor's thread, not inside the signal handler)."""
    from twisted.internet import reactor

    reactor.callFromThread(_say_nothing_to_reopen)  # type: ignore[attr-defined]  # the global reactor provides IReactorThreads


class LogReopenService(Service):
    """Installs the SIGUSR1 handler described above while running.

    When twistd writes no log file (the foreground, as under systemd or
    Docker; ``twist``), there is nothing to reopen: SIGUSR1 is then logged
    and ignored, where its default action would kill the proxy at once, with
    no drain and its last chat records lost (a handler someone else
    installed is left alone).
    """

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._log_file: Any = None
        self._writing: Optional[tuple[int, int]] = None
        self._previous: Any = None
        self._handler: Any = None

    def startService(self) -> None:
        super().startService()
        previous = signal.getsignal(signal.SIGUSR1)
        log_file = twistd_log_file(previous)
        if log_file is None:
            if previous in (signal.SIG_DFL, None):
                # Kept after the service stops: a SIGUSR1 during the drain
                # must not kill the process either.
                signal.signal(signal.SIGUSR1, _nothing_to_reopen)
            return
        self._log_file, self._previous = log_file, previous
        self._writing = _identity(log_file.path)

        def handler(_signum: int, _frame: Any) -> None:
            self.reactor.callFromThread(self.reopen_or_rotate)

        self._handler = handler
        signal.signal(signal.SIGUSR1, handler)

    def reopen_or_rotate(self) -> None:
        """Reopen the log if its file was moved away, else rotate it."""
        log_file = self._log_file
        if log_file is None:
            return
        if _identity(log_file.path) != self._writing:
            log_file.reopen()
            self.log.info("log file reopened (it was moved or removed)")
        else:
            log_file.rotate()
        self._writing = _identity(log_file.path)

    def stopService(self) -> None:
        super().stopService()
        if self._handler is not None and signal.getsignal(signal.SIGUSR1) is self._handler:
            signal.signal(signal.SIGUSR1, self._previous)
        self._handler = None
