"""
Chat records on a full disk: a record is on disk whole or not at all, and
exactly once; what cannot be written is held (bounded) and written when
space returns, or dropped and counted; the failure is logged once, not once
a retry.

Unit tests write through a fake ``write`` that fails partway (a short
write, then ENOSPC); the end-to-end test puts LOG_DIR on a 64 KiB tmpfs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from typing import Any, Optional

from twisted.internet import defer, threads
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from twisted_forward.chat.files import CHAT_NAMESPACE, ChatLogObserver, RecordFiles
from twisted_forward.tap import ProxyService

from .harness import ProxyTestCase
from .test_chatlog_files import inline, lines_in


def record(n: int, pad: str = "") -> dict[str, Any]:
    return {"time": "2026-01-02T03:04:05.000Z", "request_id": f"r{n}", "pad": pad}


class FullDisk:
    """``os.write`` on a disk with ``room`` bytes left: a write that does
    not fit writes what fits (a short write), the next one raises ENOSPC."""

    def __init__(self, room: Optional[int]) -> None:
        self.room = room
        self.calls = 0

    def __call__(self, fd: int, data: Any) -> int:
        self.calls += 1
        if self.room is None:
            return os.write(fd, data)
        if self.room == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = os.write(fd, bytes(data[: self.room]))
        self.room -= written
        return written


class FullDiskUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.clock = MemoryReactorClock()
        self.disk = FullDisk(room=None)
        self.files = RecordFiles(self.dir, write=self.disk)
        self.errors: list[dict] = []

        def watch(event: dict) -> None:
            if event.get("log_level") is not None and event["log_level"].name in ("error", "warn"):
                if event.get("log_namespace", "").startswith("twisted_forward"):
                    self.errors.append(event)

        globalLogPublisher.addObserver(watch)
        self.addCleanup(globalLogPublisher.removeObserver, watch)

    def observer(self, **kw: Any) -> ChatLogObserver:
        observer = ChatLogObserver(self.files, self.clock, inline, **kw)
        self.log = Logger(namespace=CHAT_NAMESPACE, observer=observer)
        return observer

    def emit(self, n: int, pad: str = "x" * 100) -> None:
        self.log.info("record", chat_record=record(n, pad))

    def ids(self) -> list[str]:
        return [json.loads(line)["request_id"] for line in lines_in(self.dir)]

    def test_short_write_leaves_no_torn_line(self):
        """Room for two and a half records: the file holds two whole lines,
        never the half."""
        observer = self.observer()
        for n in range(5):
            self.emit(n)
        line = len(lines_in_bytes(record(0, "x" * 100)))
        self.disk.room = 2 * line + line // 2
        self.successResultOf(observer.flush())
        with open(os.path.join(self.dir, os.listdir(self.dir)[0]), "rb") as f:
            data = f.read()
        self.assertTrue(data.endswith(b"\n"), data[-40:])
        self.assertEqual(self.ids(), ["r0", "r1"])
        self.assertEqual(observer.pending, 3)

    def test_space_returns_every_record_exactly_once(self):
        """After the disk fills and frees again, every record is on disk once."""
        observer = self.observer()
        for n in range(5):
            self.emit(n)
        line = len(lines_in_bytes(record(0, "x" * 100)))
        self.disk.room = 2 * line + 7
        self.successResultOf(observer.flush())
        for _ in range(4):  # several retries on a still full disk
            self.clock.advance(0.5)
        self.emit(5)
        self.disk.room = None  # space is back
        self.clock.advance(0.5)
        self.assertEqual(self.ids(), ["r0", "r1", "r2", "r3", "r4", "r5"])
        self.assertEqual(observer.pending, 0)
        self.assertEqual(observer.dropped, 0)

    def test_failure_logged_once_not_per_retry(self):
        """A disk that stays full: one error line, however many retries,
        and one line when writing works again."""
        observer = self.observer()
        self.disk.room = 0
        self.emit(1)
        self.successResultOf(observer.flush())
        for _ in range(10):
            self.clock.advance(0.5)
        self.assertGreaterEqual(self.disk.calls, 5)
        self.assertEqual(len(self.errors), 1, [e.get("log_format") for e in self.errors])
        self.assertEqual(observer.write_failures, self.disk.calls)
        self.disk.room = None
        self.clock.advance(0.5)
        self.assertEqual(self.ids(), ["r1"])
        self.assertEqual(len(self.errors), 1)

    def test_what_cannot_be_held_is_dropped_and_counted(self):
        """Past the memory held for a full disk, the oldest records are
        dropped, counted, logged once; the newest are written later."""
        observer = self.observer(retain_bytes=3 * 200)
        self.disk.room = 0
        for n in range(6):
            self.emit(n)
            self.successResultOf(observer.flush())
        self.assertEqual(observer.dropped, 3)
        dropped_lines = [e for e in self.errors if "dropped" in e.get("log_format", "")]
        self.assertEqual(len(dropped_lines), 1)
        self.disk.room = None
        self.clock.advance(0.5)
        self.assertEqual(self.ids(), ["r3", "r4", "r5"])

    def test_torn_tail_from_before_gets_its_own_line(self):
        """A file left ending mid-record (a crash, a tail that could not be
        cut): the next record starts on a new line, whole and readable."""
        os.makedirs(self.dir)
        path = os.path.join(self.dir, "chat_2026-01-02.jsonl")
        with open(path, "wb") as f:
            f.write(b'{"request_id": "torn", "pa')
        observer = self.observer()
        self.emit(1)
        self.successResultOf(observer.flush())
        with open(path, "rb") as f:
            self.assertEqual(json.loads(f.read().split(b"\n")[1])["request_id"], "r1")

    def test_close_on_a_full_disk_drops_and_counts(self):
        """At shutdown with the disk still full: no hang, the rest counted."""
        observer = self.observer()
        self.disk.room = 0
        self.emit(1)
        self.emit(2)
        self.successResultOf(observer.close())
        self.assertEqual((observer.pending, observer.dropped), (0, 2))


def lines_in_bytes(rec: dict[str, Any]) -> bytes:
    from twisted_forward.chat.files import encode_record

    return encode_record(rec)


class TmpfsLogDirTests(ProxyTestCase):
    """LOG_DIR on a 64 KiB tmpfs, filled up, then freed."""

    #: They scrape /metrics on the proxy's port, without the admin key.
    proxy_settings = {"METRICS": "public"}

    timeout = 60

    def mount_tmpfs(self) -> str:
        if shutil.which("mount") is None or os.geteuid() != 0:
            raise SkipTest("mounting a tmpfs needs root and mount(8)")
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", path],
            capture_output=True,
        )
        if done.returncode != 0:
            raise SkipTest(f"this machine does not allow mounting a tmpfs: "
                           f"{done.stderr.decode(errors='replace').strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", path], capture_output=True)
        return path

    @defer.inlineCallbacks
    def test_full_log_disk_no_torn_line_no_duplicates(self):
        """Serving goes on with the disk full; once space returns every
        record is on disk, whole, exactly once; the failures are counted."""
        log_dir = self.mount_tmpfs()
        filler = os.path.join(log_dir, "filler")
        with open(filler, "wb") as f:  # leave ~6 KiB: a few records
            f.write(b"\0" * (58 * 1024))
        yield self.start_proxy(LOG_CHAT="true", LOG_DIR=log_dir)
        service = [s for s in self.service if isinstance(s, ProxyService)][0]
        total = 60
        for n in range(total):
            response = yield self.client.post(
                self.url("/v1/chat/completions"),
                data=json.dumps({"model": "m", "messages": [
                    {"role": "user", "content": f"question {n} " + "q" * 300}]}).encode(),
                headers={b"content-type": [b"application/json"]},
            )
            self.assertEqual(response.code, 200)
            yield response.content()
        yield service.recorder.flush()
        metrics = yield self.client.get(self.url("/metrics"))
        text = (yield metrics.content()).decode()
        self.assertRegex(text, r"openai_forward_chat_record_write_failures_total [1-9]")
        self.assertRegex(text, r"openai_forward_chat_records_pending [1-9]")
        yield threads.deferToThread(os.unlink, filler)  # space returns
        yield service.recorder.flush()
        ids = []
        for name in sorted(os.listdir(log_dir)):
            with open(os.path.join(log_dir, name), "rb") as f:
                data = f.read()
            self.assertTrue(data.endswith(b"\n"), name)
            ids += [json.loads(line)["request_id"] for line in data.splitlines()]
        self.assertEqual(len(ids), total)
        self.assertEqual(len(set(ids)), total)
