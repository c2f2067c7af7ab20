"""
A smoke run of the benchmark harness: it starts its servers, drives every
measure with tiny counts, and writes a table.  Timings are not asserted; it
needs neither wrk nor openai-forward (their columns are left out).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from .processes import ROOT


class BenchSmokeTests(SynchronousTestCase):
    def run_bench(self, *extra: str) -> tuple[str, str]:
        out = os.path.abspath(self.mktemp())
        result = subprocess.run(
            [sys.executable, "-m", "bench", "--quick", "--no-openai-forward", "--no-wrk",
             "--out", out, *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=180,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        return result.stdout, out

    def test_quick_run_writes_a_table(self) -> None:
        """The headline run (unpinned, aiohttp upstream) produces every row,
        with nginx and the policies columns beside direct and the proxy, and
        a number for each of the proxy's measures."""
        table, out = self.run_bench()
        for row in (
            "| chat requests/s, 32 connections |",
            "| requests/s ÷ twisted-forward's (same run) |",
            "| added latency p50, one request at a time |",
            "| 20 concurrent SSE streams (3 events 10 ms apart) whole | 20/20 |",
            "| memory per open stream, 50 open |",
            "| memory growth, 4 MiB multipart upload to /v1/audio/transcriptions |",
            "| memory growth, 4 MiB application/octet-stream upload to /v1/audio/transcriptions |",
            "| memory growth, 8 MiB answer to a slow reader |",
        ):
            self.assertIn(row, table)
        self.assertIn("| measure | direct |", table)
        self.assertIn("| twisted-forward | twisted-forward, policies in memory |", table)
        self.assertIn("Python asyncio driver", table)
        self.assertIn("Upstream: aiohttp fake upstream.", table)
        self.assertIn("Not pinned", table)
        self.assertIn("load average", table)
        with open(os.path.join(out, "unpinned-aiohttp.md")) as f:
            self.assertEqual(f.read(), table)
        with open(os.path.join(out, "latest.json")) as f:
            values = json.load(f)["values"]
        # Every measure produced a number for the proxy.
        for measure in ("rps", "latency_p50_ms", "streams_p99_s", "open_stream_bytes",
                        "upload_growth", "raw_upload_growth", "slow_growth"):
            self.assertIsInstance(values[measure]["twisted-forward"], (int, float), measure)
        self.assertGreater(values["rps"]["twisted-forward"], 0)
        self.assertGreater(values["rps"]["tf-policies-memory"], 0)
        self.assertEqual(values["streams_whole"]["tf-policies-memory"], 20)
        self.assertEqual(values["open_streams"]["twisted-forward"], 50)
        self.assertTrue(values["upload_ok"]["twisted-forward"])
        self.assertTrue(values["raw_upload_ok"]["twisted-forward"])
        self.assertTrue(values["slow_ok"]["twisted-forward"])
        self.assertNotIn("openai-forward", values["rps"])
        if shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"):
            self.assertEqual(values["streams_whole"]["nginx"], 20)

    def test_pinned_raw_run(self) -> None:
        """The second table: pinned, against the raw upstream."""
        table, out = self.run_bench("--pin", "--upstream", "raw", "--only", "latency,rps",
                                    "--no-policies")
        self.assertIn("Upstream: raw fake upstream.", table)
        self.assertIn("| added latency p50, one request at a time |", table)
        if (os.cpu_count() or 1) >= 2:
            self.assertIn("Pinned:", table)
        self.assertTrue(os.path.exists(os.path.join(out, "pinned-raw.md")))

    def test_cpu_calls(self) -> None:
        """``python -m bench.cpu calls`` profiles the proxy for the measured
        requests only and reports calls per request, with the JSON parses
        counted (the figure the one-parse work is judged by)."""
        result = subprocess.run(
            [sys.executable, "-m", "bench.cpu", "calls", "--requests", "20", "--warmup", "5",
             "--policies", "--top", "5"],
            cwd=ROOT, capture_output=True, text=True, timeout=180,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("20 requests: ", result.stdout)
        self.assertIn("Python calls per request", result.stdout)
        self.assertIn("json.loads per request: ", result.stdout)
