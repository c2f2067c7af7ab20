"""
Child processes for the tests that run real ``twistd``, ``twist``, workers
and supervisors (run modes, start-up failures, workers, SIGTERM, memory,
reload): where the checkout is, how to start twistd, and one process
protocol that collects the child's output and lets a test wait for a line
or a JSON log event, each wait bounded and failing with the child's last
lines; and assertions that tell an orderly exit from a death by signal.

Every child started here is killed at the test's cleanup if it still runs.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Callable, Optional, Union

from twisted.internet import defer
from twisted.internet import reactor as default_reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

#: The checkout: children get it as PYTHONPATH, so they import this code.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The argv that starts twistd with this interpreter (no script on PATH needed).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

#: The argv that starts ``twist`` (``python -m twisted``) with this interpreter.
TWIST = [sys.executable, "-m", "twisted"]

#: How long a wait for a line, an event or the child's end may take before
#: the test fails with the child's last lines (seconds).  Generous: start-up
#: on a loaded two-core machine takes a few seconds.
WAIT = 30.0

#: How many of the child's last lines a failure message shows.
TAIL = 30


class ChildProcess(ProcessProtocol):
    """A child whose standard output and error are collected, as bytes and
    as lines.

    :ivar raw: everything the child wrote, both streams, as bytes.
    :ivar out: what it wrote to standard output.
    :ivar err: what it wrote to standard error.
    :ivar lines: its complete lines so far (both streams), decoded.
    :ivar ended: fires with the reason it ended (``ProcessDone`` or
        ``ProcessTerminated``); never fails.
    :ivar exit_code: its exit status, once ended (None if a signal ended it).
    :ivar exit_signal: the signal that ended it, if one did.
    """

    def __init__(self, reactor: Any = default_reactor, name: str = "the child") -> None:
        self.reactor = reactor
        self.name = name
        self.raw = b""
        self.out = b""
        self.err = b""
        self.lines: list[str] = []
        self._partial = {1: b"", 2: b""}
        self._waiters: list[tuple[Callable[[str], Any], str, int, defer.Deferred[Any]]] = []
        self.ended: defer.Deferred[Any] = defer.Deferred()
        self.reason: Optional[BaseException] = None
        self.exit_code: Optional[int] = None
        self.exit_signal: Optional[int] = None

    # What it wrote

    @property
    def output(self) -> str:
        """Everything the child wrote so far (both streams), decoded."""
        return self.raw.decode("utf-8", "replace")

    @property
    def errors(self) -> str:
        """What it wrote to standard error, decoded."""
        return self.err.decode("utf-8", "replace")

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self.transport is not None and self.transport.pid is not None
        return int(self.transport.pid)

    def tail(self, count: int = TAIL) -> str:
        """Its last ``count`` lines (and any unfinished one), for a failure
        message."""
        pending = [p.decode("utf-8", "replace") for p in self._partial.values() if p]
        return "\n".join(self.lines[-count:] + pending)

    def status(self) -> str:
        """How it ended, in words: "running", "exit status N" or "signal N"."""
        if not self.ended.called:
            return "running"
        if self.exit_signal is not None:
            return f"signal {self.exit_signal}"
        return f"exit status {self.exit_code}"

    # Waiting

    def wait_for(
        self, pattern: Union[str, bytes, "re.Pattern[str]"], start: int = 0, timeout: float = WAIT
    ) -> defer.Deferred[Any]:
        """Fires with the match of the first line, from line ``start`` on,
        that matches ``pattern`` (a regular expression).  Fails with the
        child's last lines if the child ends first or ``timeout`` seconds
        pass."""
        if isinstance(pattern, bytes):
            pattern = pattern.decode("utf-8")
        regex = re.compile(pattern)
        return self._wait(regex.search, f"a line matching {regex.pattern!r}", start, timeout)

    def wait_for_event(
        self, predicate: Callable[[dict[str, Any]], bool], start: int = 0, timeout: float = WAIT
    ) -> defer.Deferred[dict[str, Any]]:
        """Fires with the first JSON log event (``twist --log-format json``,
        one event a line) from line ``start`` on for which ``predicate``
        is true; fails as :meth:`wait_for` does."""

        def match(line: str) -> Optional[dict[str, Any]]:
            try:
                event = json.loads(line.strip("\x1e"))
            except ValueError:
                return None
            return event if isinstance(event, dict) and predicate(event) else None

        return self._wait(match, "a JSON event the test waits for", start, timeout)

    def exited(self, timeout: float = WAIT) -> defer.Deferred[BaseException]:
        """Fires with the reason the child ended (``ProcessDone`` or
        ``ProcessTerminated``), once it has; fails with its last lines if
        it is still running after ``timeout`` seconds."""
        if self.ended.called:
            assert self.reason is not None
            return defer.succeed(self.reason)
        d: defer.Deferred[BaseException] = defer.Deferred()

        def fire(reason: BaseException) -> BaseException:
            if not d.called:
                d.callback(reason)
            return reason

        self.ended.addCallback(fire)
        timer = self.reactor.callLater(timeout, self._timed_out, d, "to end", timeout)
        d.addBoth(_cancelling(timer))
        return d

    def _wait(
        self, match: Callable[[str], Any], what: str, start: int, timeout: float
    ) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        for line in self.lines[start:]:
            found = match(line)
            if found is not None:
                d.callback(found)
                return d
        if self.ended.called:
            d.errback(self._failure(f"{self.name} ended ({self.status()}) before {what}"))
            return d
        waiter = (match, what, start, d)
        self._waiters.append(waiter)
        timer = self.reactor.callLater(timeout, self._timed_out, d, what, timeout, waiter)
        d.addBoth(_cancelling(timer))
        return d

    def _timed_out(self, d: defer.Deferred[Any], what: str, timeout: float, waiter: Any = None) -> None:
        if waiter is not None and waiter in self._waiters:
            self._waiters.remove(waiter)
        if not d.called:
            d.errback(self._failure(f"{self.name}: waited {timeout:g} s for {what} ({self.status()})"))

    def _failure(self, message: str) -> AssertionError:
        return AssertionError(f"{message}; its last lines:\n{self.tail()}")

    def _line(self, line: str) -> None:
        self.lines.append(line)
        for waiter in list(self._waiters):
            match = waiter[0](line)
            if match is not None:
                self._waiters.remove(waiter)
                waiter[3].callback(match)

    # ProcessProtocol

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.raw += data
        if fd == 2:
            self.err += data
        else:
            self.out += data
        partial = self._partial.get(fd, b"") + data
        *complete, self._partial[fd] = partial.split(b"\n")
        for raw in complete:
            self._line(raw.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        for fd, partial in list(self._partial.items()):
            if partial:
                self._partial[fd] = b""
                self._line(partial.decode("utf-8", "replace"))
        self.reason = reason.value
        self.exit_code = getattr(reason.value, "exitCode", None)
        self.exit_signal = getattr(reason.value, "signal", None)
        waiting, self._waiters = self._waiters, []
        for _, what, _, d in waiting:
            d.errback(self._failure(f"{self.name} ended ({self.status()}) before {what}"))
        self.ended.callback(reason.value)

    def signal(self, name: str) -> None:
        """Send signal ``name`` ("TERM", "KILL", "HUP", ...) to the child."""
        assert self.transport is not None
        self.transport.signalProcess(name)


def _cancelling(timer: Any) -> Callable[[Any], Any]:
    def cancel(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    return cancel


def child_env(**settings: str) -> dict[str, str]:
    """A child's environment: this checkout on PYTHONPATH, the caller's
    PATH, chat records off, then ``settings``; nothing else of the test
    runner's environment (a developer's own OPENAI_API_KEY stays out)."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": ROOT, "LOG_CHAT": "false"}
    env.update(settings)
    return env


def spawn(
    test: SynchronousTestCase,
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    *,
    name: Optional[str] = None,
    reactor: Any = default_reactor,
    child_fds: Optional[dict[int, Union[str, int]]] = None,
) -> ChildProcess:
    """Start ``argv`` (its first item the program) as a child of ``test``
    in ``cwd``; killed with SIGKILL at cleanup if it still runs then.

    :param child_fds: the child's descriptors, as ``spawnProcess``'s
        ``childFDs`` (standard output and error must stay "r").
    """
    child = ChildProcess(reactor, name or os.path.basename(argv[0]))
    reactor.spawnProcess(child, argv[0], argv, env=env, path=cwd, childFDs=child_fds)

    def kill_if_running() -> Any:
        if child.ended.called:
            return None
        child.signal("KILL")
        return child.ended

    test.addCleanup(kill_if_running)
    return child


def spawn_twistd(
    test: SynchronousTestCase, args: list[str], env: dict[str, str], cwd: str, **kwargs: Any
) -> ChildProcess:
    """``twistd ARGS`` as a child of ``test`` (see :func:`spawn`)."""
    return spawn(test, [*TWISTD, *args], env, cwd, name="twistd", **kwargs)


def run(
    test: SynchronousTestCase,
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    timeout: float = WAIT,
    **kwargs: Any,
) -> defer.Deferred[ChildProcess]:
    """Run ``argv`` to its end (see :func:`spawn`); fires with the ended
    child, or fails with its last lines after ``timeout`` seconds."""
    child = spawn(test, argv, env, cwd, **kwargs)
    return child.exited(timeout).addCallback(lambda _: child)


def assert_exit(test: SynchronousTestCase, child: ChildProcess, code: int) -> None:
    """``child`` ended by itself with exit status ``code`` (0: an orderly
    exit), not by a signal; the failure shows its last lines."""
    test.assertTrue(child.ended.called, f"{child.name} is still running")
    expected = ProcessDone if code == 0 else ProcessTerminated
    test.assertEqual(
        (type(child.reason).__name__, child.exit_code, child.exit_signal),
        (expected.__name__, code, None),
        f"{child.name} ended with {child.status()}, not exit status {code}; "
        f"its last lines:\n{child.tail()}",
    )


def assert_signalled(test: SynchronousTestCase, child: ChildProcess, signal_number: int) -> None:
    """``child`` was ended by signal ``signal_number`` (an abort, or twistd
    re-raising the signal that stopped it), not by an exit."""
    test.assertTrue(child.ended.called, f"{child.name} is still running")
    test.assertEqual(
        (child.exit_code, child.exit_signal),
        (None, signal_number),
        f"{child.name} ended with {child.status()}, not signal {signal_number}; "
        f"its last lines:\n{child.tail()}",
    )
