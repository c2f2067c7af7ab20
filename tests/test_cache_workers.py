"""
The LMDB cache under real twistd: shared by the workers of ``--workers 2``,
and kept across a restart of the whole process tree.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import defer

from .test_workers import WorkersTestCase


class LMDBWorkersTests(WorkersTestCase):
    """``twistd openai-forward --workers 2`` with CACHE_BACKEND=LMDB."""

    @defer.inlineCallbacks
    def run_proxy(self, root: str) -> Any:
        """Start twistd with two workers and the LMDB cache under ``root``;
        fires with the supervisor and the port once both workers serve."""
        supervisor = self.start_supervisor(
            2, CACHE_OPENAI="true", CACHE_BACKEND="LMDB", CACHE_ROOT_PATH_OR_URL=root,
        )
        match = yield supervisor.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        yield supervisor.wait_for(r"worker 1 serving")
        yield supervisor.wait_for(r"worker 2 serving")
        port = int(match.group(1))
        # Both workers take connections before the test asks anything.
        yield self.serving_pids(port, set())
        return supervisor, port

    @defer.inlineCallbacks
    def ask(self, port: int) -> Any:
        """One cacheable request on a new connection; fires with its
        x-cache value and body."""
        response = yield self.client.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps({"model": "m", "messages": [], "caching": True}).encode(),
            headers={b"content-type": b"application/json"},
        )
        body = yield response.content()
        return response.headers.getRawHeaders(b"x-cache")[0], body

    @defer.inlineCallbacks
    def until_hit(self, port: int, tries: int = 200) -> Any:
        """Ask until a hit comes back (the store writes after the answer
        went out); returns the misses seen."""
        misses = 0
        for _ in range(tries):
            result, _ = yield self.ask(port)
            if result == b"hit":
                return misses
            misses += 1
        self.fail(f"no hit after {tries} requests")

    @defer.inlineCallbacks
    def test_shared_by_workers_and_kept_across_restart(self) -> Any:
        """One answer goes upstream; every later request, on either worker
        (a new connection each) and after twistd restarts, is a hit."""
        root = os.path.abspath(os.path.join(self.workdir, "cache"))
        supervisor, port = yield self.run_proxy(root)
        first, stored = yield self.ask(port)
        self.assertEqual(first, b"miss")
        misses = 1 + (yield self.until_hit(port))
        for _ in range(10):
            result, body = yield self.ask(port)
            self.assertEqual((result, body), (b"hit", stored))
        yield self.stop_supervisor(supervisor)
        self.assertNotIn("Traceback", supervisor.output)

        supervisor, port = yield self.run_proxy(root)
        result, body = yield self.ask(port)
        self.assertEqual((result, body), (b"hit", stored))
        self.assertEqual(
            len([s for s in self.fake.seen if s.uri.endswith(b"/completions")]), misses
        )
        yield self.stop_supervisor(supervisor)
