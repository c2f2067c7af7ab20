"""
A smoke run of the benchmark harness: it starts its servers, drives every
measure with tiny counts, and writes a table.  Timings are not asserted; it
needs neither wrk nor openai-forward (their columns are left out).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchSmokeTests(SynchronousTestCase):
    def test_quick_run_writes_a_table(self) -> None:
        out = os.path.abspath(self.mktemp())
        result = subprocess.run(
            [sys.executable, "-m", "bench", "--quick", "--no-openai-forward", "--no-wrk",
             "--no-pin", "--out", out],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        table = result.stdout
        for row in (
            "| measure | direct | twisted-forward | openai-forward 0.8.1 | target | met |",
            "| chat requests/s, 32 connections |",
            "| added latency p50, one request at a time |",
            "| 20 concurrent SSE streams (3 events 10 ms apart) whole | 20/20 | 20/20 | – |",
            "| memory per open stream, 50 open |",
            "| memory growth, 4 MiB upload |",
            "| memory growth, 8 MiB answer to a slow reader |",
        ):
            self.assertIn(row, table)
        self.assertIn("Python asyncio driver", table)
        with open(os.path.join(out, "latest.md")) as f:
            self.assertEqual(f.read(), table)
        with open(os.path.join(out, "latest.json")) as f:
            values = json.load(f)["values"]
        # Every measure produced a number for the proxy.
        for measure in ("rps", "latency_p50_ms", "streams_p99_s", "open_stream_bytes",
                        "upload_growth", "slow_growth"):
            self.assertIsInstance(values[measure]["twisted-forward"], (int, float), measure)
        self.assertGreater(values["rps"]["twisted-forward"], 0)
        self.assertEqual(values["open_streams"]["twisted-forward"], 50)
        self.assertTrue(values["upload_ok"]["twisted-forward"])
        self.assertTrue(values["slow_ok"]["twisted-forward"])
        self.assertNotIn("openai-forward", values["rps"])
