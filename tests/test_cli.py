"""The ``twisted-forward`` command line: usage, chat show/tail/export, --version."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import date, datetime, timezone

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_forward import __version__
from twisted_forward.chat.files import file_name
from twisted_forward.chat.views import TailOptions, tail
from twisted_forward.cli import main
from twisted_forward.ledger import UsageEntry, report, sql
from twisted_forward.ledger.batching import BatchingLedger
from twisted_forward.ledger.database import DirectDatabase
from twisted_forward.ledger.report import parse_day

from .processes import ROOT

TODAY = date(2026, 12, 2)


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def run(*argv: str) -> tuple[int, str, str]:
    """Run the command line in-process; (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


class ParseDayTests(SynchronousTestCase):
    """The forms a day can take on the command line."""

    def test_forms(self) -> None:
        """Nd counts today as the first of N days; dates and names work; junk is
        refused with a ValueError that says why (the command line and the admin
        API each turn it into their own error)."""
        self.assertEqual(parse_day("1d", TODAY), TODAY)
        self.assertEqual(parse_day("7d", TODAY), date(2026, 11, 26))
        self.assertEqual(parse_day("yesterday", TODAY), date(2026, 12, 1))
        self.assertEqual(parse_day("2026-01-31", TODAY), date(2026, 1, 31))
        for bad in ("0d", "-3d", "last week", "2026-13-01"):
            self.assertRaises(ValueError, parse_day, bad, TODAY)


class UsageCommandTests(SynchronousTestCase):
    """``twisted-forward usage`` reads a SQLite ledger with no server running."""

    def setUp(self) -> None:
        self.patch(report, "utc_today", lambda: TODAY)
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir)
        clock = Clock()
        ledger = BatchingLedger(clock, DirectDatabase(
            sql.sqlite_dialect(os.path.join(self.data_dir, sql.SQLITE_FILE))))
        ledger.startService()
        for when, key, model, prompt in (
            ("2026-11-20T10:00:00", "old", "gpt-4o", 1000),
            ("2026-12-01T23:59:59", "alice", "gpt-4o", 100),
            ("2026-12-02T00:00:00", "alice", "gpt-4o-mini", 10),
            ("2026-12-02T08:00:00", "bob", "gpt-4o", 1),
        ):
            ledger.record(UsageEntry(at(when), key, model, prompt_tokens=prompt,
                                     completion_tokens=1, cost_usd=prompt / 1000, ttfb=0.5))
        self.successResultOf(ledger.stopService())

    def test_table_by_key(self) -> None:
        """The default: the last 7 days by key, with a total line."""
        status, out, err = run("usage", "--data-dir", self.data_dir, "--env-file", os.devnull)
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[0].split()[:4], ["key", "requests", "errors", "prompt"])
        self.assertEqual([line.split()[0] for line in lines[1:]], ["alice", "bob", "total"])
        self.assertEqual(lines[1].split()[1:4], ["2", "0", "110"])
        self.assertIn("0.1100", lines[1])
        self.assertEqual(lines[3].split()[1], "3")

    def test_csv_by_day(self) -> None:
        """--csv --by day: one row a day, the API's column names."""
        status, out, _ = run("usage", "--data-dir", self.data_dir, "--env-file", os.devnull,
                             "--since", "2026-11-01", "--by", "day", "--csv")
        self.assertEqual(status, 0)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(",")[:3], ["day", "requests", "errors"])
        self.assertEqual([line.split(",")[:2] for line in lines[1:]],
                         [["2026-11-20", "1"], ["2026-12-01", "1"], ["2026-12-02", "2"]])

    def test_filters(self) -> None:
        """--key and --model narrow the rows; --until bounds the days."""
        status, out, _ = run("usage", "--data-dir", self.data_dir, "--env-file", os.devnull,
                             "--key", "alice", "--by", "model", "--until", "yesterday", "--csv")
        self.assertEqual(status, 0)
        self.assertEqual([line.split(",")[:2] for line in out.splitlines()[1:]],
                         [["gpt-4o", "1"]])

    def test_settings_from_environment(self) -> None:
        """DATA_DIR comes from the environment as the proxy reads it."""
        options = report.UsageOptions()
        options.parseOptions(["--env-file", os.devnull, "--csv"])
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(report.run_usage(options, out, err, {"DATA_DIR": self.data_dir}), 0)
        self.assertIn("alice", out.getvalue())

    def test_errors(self) -> None:
        """A missing ledger or a bad option: a one-line error and a failing status."""
        status, _, err = run("usage", "--data-dir", self.mktemp(), "--env-file", os.devnull)
        self.assertEqual(status, 1)
        self.assertIn("no ledger at", err)
        status, _, err = run("usage", "--by", "colour")
        self.assertEqual(status, 2)
        self.assertIn("--by must be one of", err)
        status, _, err = run("usage", "--since", "today", "--until", "yesterday")
        self.assertEqual(status, 2)

    def test_empty_period(self) -> None:
        """A period with no usage says so and succeeds."""
        status, out, err = run("usage", "--data-dir", self.data_dir, "--env-file", os.devnull,
                               "--since", "2020-01-01", "--until", "2020-01-02")
        self.assertEqual((status, out), (0, ""))
        self.assertIn("no usage", err)


def record(n: int, **extra: object) -> dict:
    base = {
        "time": f"2026-12-02T10:00:0{n}.000Z", "request_id": f"req-{n}", "kind": "chat",
        "key_label": "alice" if n % 2 else "bob", "model": "gpt-4o-mini", "status": 200,
        "outcome": "complete", "duration": 1.25,
        "messages": [{"role": "system", "content": "Be terse."},
                     {"role": "user", "content": [{"type": "text", "text": f"question {n}"},
                                                  {"type": "image_url", "image_url": {}}]}],
        "choices": [{"index": 0, "role": "assistant", "content": f"answer {n}",
                     "finish_reason": "stop"}],
        "finish_reason": "stop", "usage": {"prompt_tokens": 7, "completion_tokens": 3},
    }
    base.update(extra)
    return base


class ChatViewTests(SynchronousTestCase):
    """``chat show`` and ``chat tail`` make the records readable."""

    def setUp(self) -> None:
        self.log_dir = self.mktemp()
        os.makedirs(self.log_dir)
        self.path = os.path.join(self.log_dir, file_name("2026-12-02"))
        with open(self.path, "w") as f:
            for n in range(1, 4):
                f.write(json.dumps(record(n)) + "\n")

    def test_show_one(self) -> None:
        """A conversation by request id: heading, roles, media named, answer, tokens."""
        status, out, _ = run("chat", "show", "-d", self.log_dir, "--request-id", "req-2")
        self.assertEqual(status, 0)
        self.assertIn("gpt-4o-mini  key=bob  200 complete", out)
        self.assertIn("system: Be terse.\nuser: question 2\n[image_url]\nassistant: answer 2",
                      out)
        self.assertIn("[finish: stop · tokens 7+3]", out)
        self.assertNotIn("question 1", out)

    def test_show_latest_filtered(self) -> None:
        """The latest N matching records, oldest first; none matching fails."""
        status, out, _ = run("chat", "show", "-d", self.log_dir, "-n", "2", "-k", "alice")
        self.assertEqual(status, 0)
        self.assertEqual(out.count("── "), 2)
        self.assertLess(out.index("question 1"), out.index("question 3"))
        status, _, err = run("chat", "show", "-d", self.log_dir, "-k", "nobody")
        self.assertEqual(status, 1)

    def test_tail(self) -> None:
        """One line per record, the last N."""
        status, out, _ = run("chat", "tail", "-d", self.log_dir, "-n", "2")
        self.assertEqual(status, 0)
        lines = out.splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn("bob  gpt-4o-mini  200  complete  7+3  1.25s", lines[0])
        self.assertIn("'question 2 [image_url]' → 'answer 2'", lines[0])

    def test_tail_follow(self) -> None:
        """--follow prints whole new lines as they are written, not a half-written one."""
        options = TailOptions()
        options.parseOptions(["-d", self.log_dir, "-n", "0", "--follow"])
        out = io.StringIO()
        writes = [json.dumps(record(4)) + "\n" + json.dumps(record(5))[:10], ""]

        def sleep(seconds: float) -> None:
            with open(self.path, "a") as f:
                f.write(writes.pop(0))

        self.assertEqual(tail(options, out, sleep, rounds=2), 1)
        self.assertIn("answer 4", out.getvalue())
        self.assertNotIn("answer 5", out.getvalue())

    def test_export_still_there(self) -> None:
        """``chat export`` is the chat-record export."""
        out = self.mktemp()
        status, _, _ = run("chat", "export", "-d", self.log_dir, "-o", out, "-k", "bob")
        self.assertEqual(status, 0)
        with open(out) as f:
            self.assertEqual([json.loads(line)["request_id"] for line in f], ["req-2"])


class ConsoleScriptTests(SynchronousTestCase):
    """The installed entry point runs as a program."""

    def test_version(self) -> None:
        """--version prints twisted-forward's version, in a real process."""
        result = subprocess.run(
            [sys.executable, "-m", "twisted_forward.cli", "--version"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, f"twisted-forward {__version__}\n")

    def test_no_command(self) -> None:
        """Without a command: usage text, status 2."""
        status, _, err = run()
        self.assertEqual(status, 2)
        self.assertIn("say what to do", err)
