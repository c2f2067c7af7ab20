"""
The chat record files: one JSON object a line in ``LOG_DIR/chat_*.jsonl``.

Writing
    :class:`ChatLogObserver` is a twisted.logger observer for events of the
    ``twisted_forward.chat`` namespace.  It encodes each record as one line
    at once, buffers the lines, and hands them to a thread in batches, on a
    short timer (0.5 s) or when 1 MiB is waiting, so a slow disk never
    stalls the reactor.  :meth:`ChatLogObserver.flush` and
    :meth:`ChatLogObserver.close` say when the lines are on disk.

Files and rotation
    Records go to ``chat_YYYY-MM-DD.jsonl`` for the UTC day the exchange
    started; once that file holds ``max_bytes`` (100 MB by default) new
    batches go to ``chat_YYYY-MM-DD.1.jsonl``, ``.2`` and so on.  Files are
    never renamed: rotation only changes which name is opened next.

Several processes
    Every process opens the files with ``O_APPEND`` and writes each batch of
    whole lines with a single ``write()``: POSIX has the offset set to the
    end of the file and the data written with no other write in between, so
    lines of several workers sharing ``LOG_DIR`` never interleave (on a local
    file system; NFS does not honour ``O_APPEND``).  Because nothing is ever
    renamed, no worker can pull a file from under another.

A full disk
    A record is on disk whole or not at all, and once.  A write cut short
    (a full disk, a quota) is taken back to its last whole line
    (``ftruncate``, under an ``flock`` every writer takes, so no other
    worker's lines are in the way); the records not written stay queued, in
    order, and are written when space returns, never twice.  At most
    ``retain_bytes`` (64 MiB) wait in memory: past that the oldest are
    dropped.  The failure is logged once when it starts and once when
    writing works again, not at every retry; failed writes, dropped and
    waiting records are counted (:meth:`ChatLogObserver.counts`, exported
    as metrics).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Optional

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

#: The namespace of the events that carry chat records.
CHAT_NAMESPACE = "twisted_forward.chat"
#: The event field that holds the record.
RECORD_FIELD = "chat_record"

_NAME = re.compile(r"^chat_(\d{4}-\d{2}-\d{2})(?:\.(\d+))?\.jsonl$")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)

#: A function that runs a blocking callable off the reactor thread.
Runner = Callable[[Callable[[], Any]], "Deferred[Any]"]
#: ``os.write``'s shape: write to a file descriptor, return the bytes written.
Writer = Callable[[int, Any], int]


class LinesNotWritten(OSError):
    """A batch was written in part: its first :attr:`written` lines are on
    disk whole, the rest are not on disk at all.

    :ivar written: how many lines of the batch are on disk.
    """

    def __init__(self, written: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.written = written


def file_name(day: str, index: int = 0) -> str:
    """The name of the ``index``-th file of records for ``day`` (YYYY-MM-DD)."""
    return f"chat_{day}.jsonl" if index == 0 else f"chat_{day}.{index}.jsonl"


def parse_file_name(name: str) -> Optional[tuple[str, int]]:
    """``(day, index)`` for a chat record file name, None for any other."""
    match = _NAME.match(name)
    if match is None:
        return None
    return match.group(1), int(match.group(2) or 0)


def utc_iso(seconds: float) -> str:
    """A POSIX time as ``2025-06-01T12:00:00.123Z``."""
    stamp = datetime.fromtimestamp(seconds, timezone.utc)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record_day(record: dict[str, Any], fallback: float) -> str:
    """The UTC day a record is filed under: that of its ``time``."""
    stamp = record.get("time")
    if isinstance(stamp, str) and _DAY.match(stamp[:10]):
        return stamp[:10]
    return utc_iso(fallback)[:10]


def encode_record(record: dict[str, Any], secrets: Iterable[bytes] = ()) -> bytes:
    """One record as one line of UTF-8 JSON, ending in ``\\n``.

    Never raises and never yields a second line: JSON escapes control
    characters; U+2028/U+2029 (line breaks to some readers) and lone
    surrogates (not encodable as UTF-8) are written as ``\\u`` escapes; any
    configured secret is masked.  A record that cannot be encoded still
    leaves a line saying so.
    """
    try:
        text = json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        text = json.dumps(
            {
                "time": record.get("time"),
                "request_id": record.get("request_id"),
                "kind": record.get("kind"),
                "problems": ["record could not be encoded as JSON"],
            },
            default=str,
            separators=(",", ":"),
        )
    if "\u2028" in text or "\u2029" in text:
        text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    data = text.encode("utf-8", "backslashreplace")
    for secret in secrets:
        if secret in data:
            data = data.replace(secret, b"***")
    return data + b"\n"


def secret_forms(secrets: Iterable[str]) -> tuple[bytes, ...]:
    """The byte strings under which ``secrets`` could appear in a line."""
    forms: set[bytes] = set()
    for secret in secrets:
        if secret:
            forms.add(secret.encode("utf-8"))
            forms.add(json.dumps(secret)[1:-1].encode("utf-8"))
    return tuple(sorted(forms, key=len, reverse=True))


class RecordFiles:
    """Appends batches of lines to a directory's chat record files.

    Blocking: meant to be called from one thread at a time (the observer's
    writer), never from the reactor thread while the proxy serves.

    :param write: ``os.write`` (tests give one that fails partway).
    """

    def __init__(
        self, directory: str, max_bytes: int = 100 * 1000 * 1000, write: Writer = os.write
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._os_write = write
        self._fd: Optional[int] = None
        self._day: Optional[str] = None
        self._index = 0
        self._path = ""

    def append(self, batch: list[tuple[str, bytes]]) -> None:
        """Write ``(day, line)`` pairs, each day's run of lines in one write.

        :raises LinesNotWritten: when only the first lines made it (whole).
        """
        start = 0
        while start < len(batch):
            day = batch[start][0]
            end = start + 1
            while end < len(batch) and batch[end][0] == day:
                end += 1
            try:
                self._write(day, [line for _, line in batch[start:end]])
            except LinesNotWritten as e:
                raise LinesNotWritten(start + e.written, e) from None
            except OSError as e:
                raise LinesNotWritten(start, e) from None
            start = end

    def _write(self, day: str, lines: list[bytes]) -> None:
        fd = self._open(day)
        # Every writer of the directory takes the lock, so the file's size
        # is where this write lands, and a torn tail can be cut off without
        # touching another worker's lines.
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            start = os.fstat(fd).st_size
            # A file that does not end a line (a crash mid-write, a tail that
            # could not be cut): the next record starts on a line of its own.
            lead = b"\n" if start and os.pread(fd, 1, start - 1) != b"\n" else b""
            data = lead + b"".join(lines)
            view = memoryview(data)
            written = 0
            try:
                while written < len(data):  # more than one only on a signal or a full disk
                    n = self._os_write(fd, view[written:])
                    if n <= 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    written += n
            except OSError as e:
                kept = self._keep_whole(fd, start, written, len(lead), lines)
                raise LinesNotWritten(kept, e) from None
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    @staticmethod
    def _keep_whole(fd: int, start: int, written: int, lead: int, lines: list[bytes]) -> int:
        """After a short write: cut the file back to its last whole line;
        how many of ``lines`` are on disk."""
        whole, count = lead, 0
        for line in lines:
            if whole + len(line) > written:
                break
            whole += len(line)
            count += 1
        if count == 0:
            whole = 0  # as it was: not even the leading newline is kept
        if written != whole:
            try:
                os.ftruncate(fd, start + whole)
            except OSError:
                pass  # the next write starts on a new line; readers skip the fragment
        return count

    def _open(self, day: str) -> int:
        if self._fd is not None and self._day == day:
            here: Optional[os.stat_result]
            there: Optional[os.stat_result]
            try:
                here = os.fstat(self._fd)
                there = os.stat(self._path)
            except OSError:
                here = there = None
            if (
                here is not None and there is not None
                and (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
                and here.st_size < self.max_bytes
            ):
                return self._fd
        index = self._index if self._day == day else 0
        self.close()
        os.makedirs(self.directory, exist_ok=True)
        while True:
            path = os.path.join(self.directory, file_name(day, index))
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                size = 0
            if size < self.max_bytes:
                break
            index += 1
        self._fd = os.open(path, _FLAGS, 0o600)
        self._day, self._index, self._path = day, index, path
        return self._fd

    def close(self) -> None:
        """Close the open file, if any (the next write opens it again)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def thread_runner(reactor: Any) -> Runner:
    """Runs blocking callables in the reactor's thread pool."""
    from twisted.internet.threads import deferToThreadPool

    def run(f: Callable[[], Any]) -> "Deferred[Any]":
        return deferToThreadPool(reactor, reactor.getThreadPool(), f)

    return run


@implementer(ILogObserver)
class ChatLogObserver:
    """Writes the records of ``twisted_forward.chat`` events as JSON lines.

    :param files: where the lines go.
    :param clock: for the flush timer.
    :param run: runs the blocking writes off the reactor thread (the
        reactor's thread pool in the service; tests run them inline).
    :param secrets: strings that must never reach a file (the configured
        keys); masked as ``***`` should one ever be in a record.
    """

    log = Logger()

    def __init__(
        self,
        files: RecordFiles,
        clock: IReactorTime,
        run: Runner,
        secrets: Iterable[str] = (),
        flush_interval: float = 0.5,
        flush_bytes: int = 1 << 20,
        retain_bytes: int = 64 << 20,
    ) -> None:
        self.files = files
        self.clock = clock
        self.run = run
        self.secrets = secret_forms(secrets)
        self.flush_interval = flush_interval
        self.flush_bytes = flush_bytes
        self.retain_bytes = retain_bytes
        self._pending: list[tuple[str, bytes]] = []
        self._pending_bytes = 0
        self._accepted = 0  # lines taken in
        self._settled = 0  # lines written (or given up on after a failure)
        self._writing = False
        self._failed = False
        self._closing = False
        self._closed = False
        self._timer: Optional[IDelayedCall] = None
        self._waiters: list[tuple[int, Deferred[None]]] = []
        #: Writes that failed (a full disk counts once a retry).
        self.write_failures = 0
        #: Records given up on: never written.
        self.dropped = 0
        # Whether the failure / the drops of the current episode were logged.
        self._failure_logged = False
        self._drops_logged = False

    def counts(self) -> dict[str, int]:
        """Waiting records, failed writes and dropped records, for metrics."""
        return {
            "pending": self.pending,
            "write_failures": self.write_failures,
            "dropped": self.dropped,
        }

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") != CHAT_NAMESPACE:
            return
        record = event.get(RECORD_FIELD)
        if not isinstance(record, dict):
            return
        try:
            line = encode_record(record, self.secrets)
            day = record_day(record, self.clock.seconds())
        except Exception:
            self.log.failure("a chat record could not be encoded")
            return
        self._pending.append((day, line))
        self._pending_bytes += len(line)
        self._accepted += 1
        if self._closed:
            self._write_inline()
        elif self._closing:
            pass
        elif self._pending_bytes >= self.flush_bytes:
            self._kick()
        elif self._timer is None and not self._writing:
            self._timer = self.clock.callLater(self.flush_interval, self._on_timer)

    @property
    def pending(self) -> int:
        """Lines accepted but not yet written."""
        return self._accepted - self._settled

    def flush(self) -> "Deferred[None]":
        """Fires once every line accepted so far is written (or given up on)."""
        if self._settled >= self._accepted:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((self._accepted, d))
        self._kick()
        return d

    @inlineCallbacks
    def close(self) -> Any:
        """Write everything, close the file; later lines are written at once."""
        self._failed = False  # one more try for lines a failed write left
        while (self._pending or self._writing) and not self._failed:
            yield self.flush()
        self._cancel_timer()
        if self._pending:
            self._drop(len(self._pending))
        self._closing = True  # from here lines wait for the file to be closed
        yield self.run(self.files.close)
        self._closed = True
        if self._pending:
            self._write_inline()

    def _on_timer(self) -> None:
        self._timer = None
        self._failed = False
        self._kick()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _kick(self) -> None:
        if self._writing or not self._pending:
            self._settle()
            return
        self._cancel_timer()
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        upto = self._accepted
        self._writing = True
        try:
            d = self.run(lambda: self.files.append(batch))
        except Exception:
            d = Deferred()
            d.errback(Failure())
        d.addBoth(self._written, batch, upto)

    def _written(self, result: object, batch: list[tuple[str, bytes]], upto: int) -> None:
        self._writing = False
        if isinstance(result, Failure):
            self._failed = True
            self.write_failures += 1
            # Lines that made it whole stay written: only the rest is retried.
            done = result.value.written if isinstance(result.value, LinesNotWritten) else 0
            self._settled += done
            left = batch[done:]
            if not self._failure_logged:
                self._failure_logged = True
                self.log.error(
                    "could not write chat records to {directory}: {why}; holding the "
                    "unwritten ones (up to {limit} bytes) and retrying every {interval}s",
                    directory=self.files.directory, why=result.getErrorMessage(),
                    limit=self.retain_bytes, interval=self.flush_interval,
                )
            self._pending[:0] = left
            self._pending_bytes += sum(len(line) for _, line in left)
            while self._pending_bytes > self.retain_bytes and self._pending:
                self._drop(1)
            # Whoever waits is told now rather than never; the lines stay queued.
            self._settle(upto)
            if self._timer is None and not self._closing:
                self._timer = self.clock.callLater(self.flush_interval, self._on_timer)
            return
        if self._failure_logged:
            self._failure_logged = self._drops_logged = False
            self.log.info(
                "chat records are written to {directory} again", directory=self.files.directory
            )
        self._failed = False
        self._settled += len(batch)
        self._settle()
        if self._pending:
            if self._waiters or self._pending_bytes >= self.flush_bytes:
                self._kick()
            elif self._timer is None and not self._closing:
                self._timer = self.clock.callLater(self.flush_interval, self._on_timer)

    def _drop(self, count: int) -> None:
        dropped, self._pending = self._pending[:count], self._pending[count:]
        self._pending_bytes -= sum(len(line) for _, line in dropped)
        self._settled += len(dropped)
        self.dropped += len(dropped)
        if not self._drops_logged:
            self._drops_logged = True
            self.log.error(
                "dropped chat record(s) that could not be written (counted in "
                "openai_forward_chat_records_dropped; no more such lines until "
                "records are written again)"
            )

    def _settle(self, upto: Optional[int] = None) -> None:
        """Fire the flush waiters whose lines are all settled (or up to ``upto``)."""
        level = self._settled if upto is None else max(self._settled, upto)
        ready = [d for target, d in self._waiters if target <= level]
        self._waiters = [(t, d) for t, d in self._waiters if t > level]
        for d in ready:
            d.callback(None)

    def _write_inline(self) -> None:
        """After close: write at once (blocking; only late stragglers)."""
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        written = len(batch)
        try:
            self.files.append(batch)
        except LinesNotWritten as e:
            written = e.written
            self.write_failures += 1
            self.log.error(
                "could not write {count} chat record(s): {why}",
                count=len(batch) - written, why=e.strerror,
            )
        try:
            self.files.close()
        except OSError:
            pass
        self.dropped += len(batch) - written
        self._settled += len(batch)


# ---------------------------------------------------------------- reading


def record_files(
    directory: str, first_day: Optional[str] = None, last_day: Optional[str] = None
) -> list[str]:
    """The chat record files of ``directory`` for days in the range, in order."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        parsed = parse_file_name(name)
        if parsed is None:
            continue
        day, index = parsed
        if first_day is not None and day < first_day:
            continue
        if last_day is not None and day > last_day:
            continue
        found.append((day, index, os.path.join(directory, name)))
    return [path for _, _, path in sorted(found)]


def read_records(paths: Iterable[str], bad: Optional[list[str]] = None) -> Iterator[dict[str, Any]]:
    """The records in ``paths``, in file order.

    A line that is not a JSON object (a write cut short by a full disk, say)
    is skipped and named in ``bad``.
    """
    for path in paths:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    yield record
                elif bad is not None:
                    bad.append(f"{path}:{number}")
