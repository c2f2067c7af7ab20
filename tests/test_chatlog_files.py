"""
The chat record files: one whole line a record, buffered writes off the
reactor thread on a timer, rotation, several writer processes, the recorder
and its taps, and the export command.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from twisted_forward.chat import recorder as chatlog
from twisted_forward.chat.export import ExportOptions, export, main
from twisted_forward.chat.files import (
    CHAT_NAMESPACE,
    ChatLogObserver,
    RecordFiles,
    encode_record,
    file_name,
    record_files,
    secret_forms,
)
from twisted_forward.chat.recorder import ChatRecorder, ExchangeInfo, RequestBody

from .fake_upstream import chat_chunks
from .processes import ROOT


def inline(f: Callable[[], Any]) -> Deferred:
    """A runner that runs the blocking write at once (tests only)."""
    try:
        return succeed(f())
    except Exception:
        d: Deferred = Deferred()
        d.errback()
        return d


class Manual:
    """A runner that holds each job until the test runs it."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], Deferred]] = []

    def __call__(self, f: Callable[[], Any]) -> Deferred:
        d: Deferred = Deferred()
        self.jobs.append((f, d))
        return d

    def run_one(self) -> None:
        f, d = self.jobs.pop(0)
        try:
            result = f()
        except Exception:
            d.errback()
        else:
            d.callback(result)


def lines_in(directory: str) -> list[bytes]:
    out = []
    for path in record_files(directory):
        with open(path, "rb") as f:
            out.extend(f.read().splitlines(keepends=True))
    return out


def record(n: int, day: str = "2025-06-01", **extra: Any) -> dict[str, Any]:
    return {"time": f"{day}T10:00:00.000Z", "request_id": f"r{n}", "kind": "chat", **extra}


class EncodeTests(SynchronousTestCase):
    def test_one_line_whatever_the_text(self):
        """A record whose text holds newlines, CR, U+2028/U+2029, NUL, a lone surrogate and
        emoji encodes to exactly one valid UTF-8 line that decodes back to the same text:
        a record can never tear the JSON-lines file."""
        nasty = "line\nbreak\r\u2028sep\u2029para\x00nul \ud800 lone \U0001f389 é"
        line = encode_record(record(1, content=nasty))
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        text = line.decode("utf-8")  # valid UTF-8
        self.assertEqual(len(text.splitlines()), 1)  # no U+2028 etc. either
        decoded = json.loads(text)
        self.assertEqual(decoded["content"], nasty)

    def test_plain_utf8_not_escaped(self):
        """Plain UTF-8 not escaped."""
        self.assertIn("世界".encode(), encode_record(record(1, content="世界")))

    def test_unencodable_record_still_leaves_a_line(self):
        """A record JSON cannot encode (NaN, a set) still leaves one line with its time, id
        and kind and a problem saying why, so the exchange is not silently missing."""
        line = encode_record(record(7, value=float("nan"), other={1, 2}))
        self.assertEqual(
            json.loads(line),
            {"time": "2025-06-01T10:00:00.000Z", "request_id": "r7", "kind": "chat",
             "problems": ["record could not be encoded as JSON"]},
        )

    def test_secrets_masked(self):
        """Configured keys are masked in the encoded line in every form JSON may write them
        (a quote escaped included), so no key reaches disk."""
        secrets = secret_forms(["sk-live-123456", 'fk-with"quote'])
        line = encode_record(record(1, a="key sk-live-123456 here", b='fk-with"quote'), secrets)
        self.assertNotIn(b"sk-live-123456", line)
        self.assertNotIn(b"fk-with", line)
        self.assertEqual(json.loads(line)["a"], "key *** here")


class RecordFilesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()

    def test_day_files_and_whole_lines(self):
        """Records go to one file per UTC day, appended as whole lines in order across
        batches, and each file is created readable by its owner only (0600)."""
        files = RecordFiles(self.dir)
        files.append([("2025-06-01", b"a\n"), ("2025-06-01", b"b\n"), ("2025-06-02", b"c\n")])
        files.append([("2025-06-01", b"d\n")])
        files.close()
        self.assertEqual(sorted(os.listdir(self.dir)), [file_name("2025-06-01"), file_name("2025-06-02")])
        with open(os.path.join(self.dir, "chat_2025-06-01.jsonl"), "rb") as f:
            self.assertEqual(f.read(), b"a\nb\nd\n")
        self.assertEqual(os.stat(os.path.join(self.dir, "chat_2025-06-02.jsonl")).st_mode & 0o777, 0o600)

    def test_size_rotation(self):
        """Past max_bytes a day's file rotates to .1, .2, ...; record_files lists them
        oldest first and every line survives in order."""
        files = RecordFiles(self.dir, max_bytes=10)
        for i in range(5):
            files.append([("2025-06-01", b"%07d\n" % i)])
        files.close()
        self.assertEqual(
            [os.path.basename(p) for p in record_files(self.dir)],
            ["chat_2025-06-01.jsonl", "chat_2025-06-01.1.jsonl", "chat_2025-06-01.2.jsonl"],
        )
        self.assertEqual(lines_in(self.dir), [b"%07d\n" % i for i in range(5)])

    def test_file_removed_under_the_writer(self):
        """When the day's file is moved away (logrotate), the next batch opens a new file at
        the path instead of writing into the moved one."""
        files = RecordFiles(self.dir)
        files.append([("2025-06-01", b"a\n")])
        os.rename(os.path.join(self.dir, "chat_2025-06-01.jsonl"), os.path.join(self.dir, "old"))
        files.append([("2025-06-01", b"b\n")])
        files.close()
        self.assertEqual(lines_in(self.dir), [b"b\n"])

    def test_several_processes_append_whole_lines(self):
        """Writers in separate processes sharing a directory (and rotating
        in it) never tear or interleave a line."""
        script = textwrap.dedent(
            """
            import json, sys
            sys.path.insert(0, sys.argv[1])
            from twisted_forward.chat.files import RecordFiles, encode_record
            files = RecordFiles(sys.argv[2], max_bytes=400_000)
            me = sys.argv[3]
            for batch in range(60):
                lines = []
                for i in range(25):
                    rec = {"time": "2025-06-01T00:00:00Z", "w": me, "n": batch * 25 + i,
                           "pad": "x" * (37 * ((batch + i) % 60))}
                    lines.append(("2025-06-01", encode_record(rec)))
                files.append(lines)
            files.close()
            """
        )
        workers = [
            subprocess.Popen([sys.executable, "-c", script, ROOT, self.dir, str(w)])
            for w in range(4)
        ]
        self.assertEqual([p.wait(timeout=60) for p in workers], [0, 0, 0, 0])
        seen = set()
        for line in lines_in(self.dir):
            rec = json.loads(line)
            seen.add((rec["w"], rec["n"]))
            self.assertEqual(rec["pad"], "x" * len(rec["pad"]))
        self.assertEqual(seen, {(str(w), n) for w in range(4) for n in range(1500)})
        self.assertEqual(len(lines_in(self.dir)), 6000)
        self.assertGreater(len(record_files(self.dir)), 1)


class ObserverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.clock = MemoryReactorClock()
        self.files = RecordFiles(self.dir)

    def observer(self, run=inline, **kw: Any) -> ChatLogObserver:
        observer = ChatLogObserver(self.files, self.clock, run, **kw)
        self.log = Logger(namespace=CHAT_NAMESPACE, observer=observer)
        return observer

    def emit(self, rec: dict[str, Any]) -> None:
        self.log.info("record", chat_record=rec)

    def test_buffered_until_the_timer(self):
        """Records are held in memory until the flush timer fires, then written together; no
        timer is left running while nothing waits."""
        self.observer()
        self.emit(record(1))
        self.emit(record(2))
        self.assertEqual(lines_in(self.dir), [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0.5)
        self.assertEqual([json.loads(line)["request_id"] for line in lines_in(self.dir)], ["r1", "r2"])
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no timer while idle

    def test_big_buffer_written_at_once(self):
        """Once the buffer passes flush_bytes it is written at once, without waiting for the
        timer, so memory stays bounded under load."""
        self.observer(flush_bytes=1000)
        self.emit(record(1, pad="x" * 600))
        self.assertEqual(lines_in(self.dir), [])
        self.emit(record(2, pad="x" * 600))
        self.assertEqual(len(lines_in(self.dir)), 2)

    def test_writes_run_off_the_reactor(self):
        """The observer only queues a job: nothing touches the disk until the
        runner (a thread in the service) runs it, and one job at a time."""
        manual = Manual()
        observer = self.observer(run=manual)
        self.emit(record(1))
        self.clock.advance(0.5)
        self.assertEqual((len(manual.jobs), lines_in(self.dir)), (1, []))
        self.emit(record(2))
        flushed = observer.flush()
        self.assertEqual(len(manual.jobs), 1)  # the second batch waits for the first
        manual.run_one()
        self.assertNoResult(flushed)
        self.assertEqual(len(manual.jobs), 1)
        manual.run_one()
        self.successResultOf(flushed)
        self.assertEqual(len(lines_in(self.dir)), 2)

    def test_other_namespaces_ignored(self):
        """Events from other namespaces, or without a chat record, are not written to the
        record files."""
        observer = self.observer()
        Logger(namespace="twisted_forward.access", observer=observer).info("x", chat_record=record(1))
        self.log.info("no record here")
        self.successResultOf(observer.flush())
        self.assertEqual(lines_in(self.dir), [])

    def test_failed_write_kept_and_retried(self):
        """A failed write keeps its records pending (flush still answers instead of hanging)
        and the retry timer writes them once the disk works again."""
        os.makedirs(self.dir)
        blocker = os.path.join(self.dir, "file-not-dir")
        with open(blocker, "w"):
            pass
        self.files.directory = blocker  # cannot hold files: writes fail
        observer = self.observer()
        self.emit(record(1))
        self.successResultOf(observer.flush())  # told, not left hanging
        self.assertEqual(observer.pending, 1)
        os.unlink(blocker)  # the disk is back: the retry timer writes it
        self.clock.advance(0.5)
        self.assertEqual(observer.pending, 0)
        self.assertEqual(len(lines_in(blocker)), 1)

    def test_close_does_not_hang_on_a_broken_disk(self):
        """close() finishes on a disk that cannot be written, dropping what cannot be saved,
        and leaves no timer: shutdown never hangs on the recorder."""
        os.makedirs(self.dir)
        self.files.directory = os.path.join(self.dir, "file-not-dir")
        with open(self.files.directory, "w"):
            pass
        observer = self.observer()
        self.emit(record(1))
        self.successResultOf(observer.close())
        self.assertEqual((observer.pending, self.clock.getDelayedCalls()), (0, []))

    def test_close_writes_everything_then_late_lines_at_once(self):
        """close() waits for every buffered record to be written, a record arriving during
        the close is written too, and one arriving after it is written at once."""
        manual = Manual()
        observer = self.observer(run=manual)
        for n in range(3):
            self.emit(record(n))
        closed = observer.close()
        self.assertNoResult(closed)
        manual.run_one()  # the write
        self.emit(record(3))  # arrives while the file is being closed
        manual.run_one()  # the close
        self.successResultOf(closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(lines_in(self.dir)), 4)
        self.emit(record(4))  # after close: written at once
        self.assertEqual(len(lines_in(self.dir)), 5)


def info(path: str = "/v1/chat/completions", body: Any = b"{}", **kw: Any) -> ExchangeInfo:
    if isinstance(body, bytes):
        body = RequestBody(io.BytesIO(body))
    fields = dict(request_id="id-1", route="/", method="POST", path=path, client="10.0.0.9",
                  key_label="team-a", started=100.0, body=body)
    fields.update(kw)
    return ExchangeInfo(**fields)


class RecorderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(100)
        self.events: list[dict] = []
        self.recorder = ChatRecorder(self.clock, [self.events.append])

    def test_one_event_per_exchange_on_the_chat_namespace(self):
        """One exchange gives exactly one event on twisted_forward.chat (a second end() adds
        nothing) carrying its time, duration, client, key label, model, status, outcome,
        request messages and assembled answer."""
        body = json.dumps({"model": "m", "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        tap = self.recorder.begin(info(body=body))
        tap.response(200, Headers({b"content-type": [b"text/event-stream"]}))
        for piece in chat_chunks("Hi back"):
            tap.data(piece)
        self.clock.advance(1.25)
        tap.end("complete")
        tap.end("complete")
        [event] = self.events
        self.assertEqual(event["log_namespace"], "twisted_forward.chat")
        rec = event["chat_record"]
        self.assertEqual(rec["time"], "1970-01-01T00:01:40.000Z")
        self.assertEqual(rec["duration"], 1.25)
        self.assertEqual(
            {k: rec[k] for k in ("request_id", "client", "key_label", "model", "stream",
                                 "status", "outcome", "client_left", "finish_reason")},
            {"request_id": "id-1", "client": "10.0.0.9", "key_label": "team-a", "model": "m",
             "stream": True, "status": 200, "outcome": "complete", "client_left": False,
             "finish_reason": "stop"},
        )
        self.assertEqual(rec["messages"], [{"role": "user", "content": "hi"}])
        self.assertEqual(rec["choices"][0]["content"], "Hi back")

    def test_not_recorded(self):
        """Exchanges that are not recorded kinds (GET, /v1/models) get no tap at all."""
        self.assertIsNone(self.recorder.begin(info(path="/v1/models")))
        self.assertIsNone(self.recorder.begin(info(method="GET")))

    def test_proxy_error_recorded(self):
        """An exchange the proxy ended with an error is recorded with its status, outcome
        proxy_error and an empty answer."""
        tap = self.recorder.begin(info(body=b'{"model": "m", "messages": []}'))
        tap.response(504, Headers())
        tap.end("proxy_error")
        rec = self.events[0]["chat_record"]
        self.assertEqual((rec["status"], rec["outcome"], rec["choices"], rec["format"]),
                         (504, "proxy_error", [], "empty"))

    def test_client_left_before_the_answer(self):
        """A client that left before any answer is recorded with no status and client_left
        true."""
        tap = self.recorder.begin(info(body=b'{"model": "m", "messages": []}'))
        tap.end("client_left")
        rec = self.events[0]["chat_record"]
        self.assertEqual((rec["status"], rec["client_left"]), (None, True))

    def test_tap_never_raises(self):
        """A request body that cannot be read, or answer data before its head, is logged as
        an error and noted in the record, never raised into the proxy's exchange."""
        class Gone(RequestBody):
            def head(self, size: int) -> bytes:
                raise OSError("gone")

        self.assertIsNone(self.recorder.begin(info(body=Gone(None))))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        tap = self.recorder.begin(info())
        tap.data(b"before any head")
        tap.response(200, None)  # type: ignore[arg-type]  # a broken caller, on purpose
        tap.data(b"x")
        tap.end("complete")
        rec = self.events[0]["chat_record"]
        self.assertIn("the recorder failed to decode the answer", rec["problems"])
        self.assertEqual(rec["response_bytes"], len(b"before any head") + 1)
        self.flushLoggedErrors(AttributeError)

    def test_emit_failure_contained(self):
        """A failure while emitting a record is logged, not raised into the exchange that
        ended."""
        recorder = ChatRecorder(self.clock, [])
        self.patch(recorder, "emit", lambda rec: 1 / 0)
        tap = recorder.begin(info())
        tap.end("complete")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_open_chat_log_refuses_unwritable_dir(self):
        """open_chat_log raises OSError for a LOG_DIR that is a file, so start-up can report
        it instead of losing records later."""
        path = self.mktemp()
        with open(path, "w"):
            pass
        self.assertRaises(OSError, chatlog.open_chat_log, path, self.clock)


class ExportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        files = RecordFiles(self.dir)
        recs = [
            ("2025-05-31", dict(model="gpt-4o", key_label="team-a", kind="chat")),
            ("2025-06-01", dict(model="gpt-4o-mini", key_label="team-b", kind="chat")),
            ("2025-06-01", dict(model="text-embedding-3-small", key_label="team-a", kind="embeddings")),
            ("2025-06-02", dict(model="gpt-4o", key_label="team-b", kind="chat")),
        ]
        batch = [(day, encode_record(record(n, day, **fields))) for n, (day, fields) in enumerate(recs)]
        files.append(batch[:2])
        files.append([("2025-06-01", b'{"torn": \n')])
        files.append(batch[2:])
        files.close()

    def run_export(self, *args: str) -> tuple[list[dict], list[str]]:
        options = ExportOptions()
        options.parseOptions(["--log-dir", self.dir, *args])
        out = io.BytesIO()
        count, bad = export(options, out)
        text = out.getvalue().decode("utf-8")
        if options["format"] == "json":
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines()]
        self.assertEqual(count, len(records))
        return records, bad

    def ids(self, *args: str) -> list[str]:
        return [r["request_id"] for r in self.run_export(*args)[0]]

    def test_everything_in_order_torn_line_reported(self):
        """Export reads every file in order and reports a torn line by file and line number
        instead of failing or skipping silently."""
        records, bad = self.run_export()
        self.assertEqual([r["request_id"] for r in records], ["r0", "r1", "r2", "r3"])
        self.assertEqual(bad, [os.path.join(self.dir, "chat_2025-06-01.jsonl") + ":2"])

    def test_filters(self):
        """--since and --until (days or times, inclusive), --model (with * patterns,
        repeatable), --key-label and --kind select exactly the matching records."""
        self.assertEqual(self.ids("--since", "2025-06-01"), ["r1", "r2", "r3"])
        self.assertEqual(self.ids("--until", "2025-06-01"), ["r0", "r1", "r2"])
        self.assertEqual(self.ids("--since", "2025-06-01", "--until", "2025-06-01"), ["r1", "r2"])
        self.assertEqual(self.ids("--since", "2025-06-01T10:00:00Z", "--until", "2025-06-02T09:00"), ["r1", "r2"])
        self.assertEqual(self.ids("--model", "gpt-4o"), ["r0", "r3"])
        self.assertEqual(self.ids("--model", "gpt-4o*"), ["r0", "r1", "r3"])
        self.assertEqual(self.ids("-m", "gpt-4o", "-m", "text-*"), ["r0", "r2", "r3"])
        self.assertEqual(self.ids("--key-label", "team-a"), ["r0", "r2"])
        self.assertEqual(self.ids("--kind", "chat", "-k", "team-b"), ["r1", "r3"])

    def test_json_array(self):
        """--format json writes one JSON array of the selected records, an empty array when
        none match."""
        records, _ = self.run_export("--format", "json", "--model", "gpt-4o")
        self.assertEqual([r["request_id"] for r in records], ["r0", "r3"])
        records, _ = self.run_export("--format", "json", "--model", "none")
        self.assertEqual(records, [])

    def test_bad_options(self):
        """An unknown --format or an unparseable --since is a usage error."""
        for args in (["--format", "xml"], ["--since", "yesterday"]):
            options = ExportOptions()
            self.assertRaises(UsageError, options.parseOptions, args)

    def test_command_line(self):
        """python -m twisted_forward.chat export writes the selected records to -o and says
        how many on standard error; a missing folder exits 1 and bad usage exits 2."""
        out = os.path.abspath(self.mktemp() + ".json")
        process = subprocess.run(
            [sys.executable, "-m", "twisted_forward.chat", "export", "-d", self.dir,
             "--format", "json", "-o", out, "--key-label", "team-b"],
            cwd=ROOT, capture_output=True, timeout=60,
        )
        self.assertEqual(process.returncode, 0, process.stderr)
        self.assertIn(b"exported 2 record(s)", process.stderr)
        with open(out, "rb") as f:
            self.assertEqual([r["request_id"] for r in json.load(f)], ["r1", "r3"])
        self.assertEqual(main(["export", "-d", os.path.join(self.dir, "missing")]), 1)
        self.assertEqual(main(["export", "--format", "xml"]), 2)
        self.assertEqual(main([]), 2)
