"""
Child processes for the tests that run real ``twistd`` (run modes, workers,
SIGTERM, memory): where the checkout is, how to start twistd, and one
process protocol that collects the child's output and lets a test wait for
a line.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Optional, Union

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

#: The checkout: children get it as PYTHONPATH, so they import this code.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The argv that starts twistd with this interpreter (no script on PATH needed).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class ChildProcess(ProcessProtocol):
    """A child whose standard output and error are collected as lines.

    :ivar raw: everything the child wrote, both streams, as bytes.
    :ivar lines: its complete lines so far, decoded.
    :ivar ended: fires with the reason (ProcessDone/ProcessTerminated).
    :ivar exit_code: the exit status, once ended (None if killed by a signal).
    """

    def __init__(self) -> None:
        self.raw = b""
        self.lines: list[str] = []
        self._partial = b""
        self._waiters: list[tuple["re.Pattern[str]", int, defer.Deferred]] = []
        self.ended: defer.Deferred = defer.Deferred()
        self.exit_code: Optional[int] = None

    @property
    def output(self) -> str:
        """Everything the child wrote so far, decoded."""
        return self.raw.decode("utf-8", "replace")

    def wait_for(self, pattern: Union[str, bytes], start: int = 0) -> defer.Deferred:
        """Fires with the match of the first line from line ``start`` on
        that matches ``pattern``; fails if the child ends first."""
        if isinstance(pattern, bytes):
            pattern = pattern.decode("utf-8")
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((re.compile(pattern), start, d))
        self._check()
        return d

    def _check(self) -> None:
        for waiter in list(self._waiters):
            regex, start, d = waiter
            for line in self.lines[start:]:
                match = regex.search(line)
                if match:
                    self._waiters.remove(waiter)
                    d.callback(match)
                    break

    def outReceived(self, data: bytes) -> None:
        self.raw += data
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        self.lines.extend(raw.decode("utf-8", "replace") for raw in complete)
        self._check()

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            self.lines.append(self._partial.decode("utf-8", "replace"))
            self._partial = b""
            self._check()
        self.exit_code = getattr(reason.value, "exitCode", None)
        waiting, self._waiters = self._waiters, []
        for _, _, d in waiting:
            d.errback(AssertionError("the child ended; its output:\n" + "\n".join(self.lines[-30:])))
        self.ended.callback(reason.value)
