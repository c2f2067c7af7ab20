"""
A non-zero exit status for a twistd process that gives up after start-up.

twistd exits 0 whenever its reactor stops, so a supervisor that cannot go
on (its workers keep dying at start) would look to systemd or Docker like
an orderly stop.  :func:`give_up` stops the reactor as usual (services stop,
workers drain, the pidfile is removed) and then, once the interpreter is
exiting, ends the process with the status asked for.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

_status = [0]
_registered = [False]


def _exit_with_status() -> None:
    if not _status[0]:
        return
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
    # atexit handlers cannot change the exit status, so this one ends the
    # process.  Handlers registered before it (they run last-in, first-out)
    # are skipped: by then twistd has stopped its services, flushed its log
    # and removed its pidfile, and standard streams are flushed above.
    os._exit(_status[0])


def set_exit_status(status: int) -> None:
    """Make the process exit with ``status`` when it ends normally."""
    _status[0] = status
    if not _registered[0]:
        _registered[0] = True
        atexit.register(_exit_with_status)


def give_up(reactor: Any, status: int = 1) -> None:
    """Stop the reactor (an orderly shutdown), then exit with ``status``."""
    set_exit_status(status)
    if getattr(reactor, "running", False):
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)
