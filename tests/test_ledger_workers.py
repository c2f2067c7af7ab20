"""
``--workers 2`` writing one SQLite ledger: real supervisor and worker
processes (as tests/test_workers.py starts them), real requests, SIGTERM,
then the file is read.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

from twisted.internet import defer

from twisted_forward.ledger.sql import SQLITE_FILE

from .test_workers import WorkersTestCase


class LedgerWorkersTests(WorkersTestCase):
    """Two worker processes add to one ledger: nothing lost, nothing doubled."""

    timeout = 90

    @defer.inlineCallbacks
    def test_two_workers_one_ledger(self) -> Any:
        """60 chats spread over two workers are 60 requests and their tokens in
        the ledger once SIGTERM has stopped everything."""
        data_dir = os.path.abspath(os.path.join(self.workdir, "data"))
        supervisor = self.start_supervisor(
            2, DATA_DIR=data_dir, FORWARD_KEY="w:fk-workers-0123456789abc",
            OPENAI_API_KEY="sk-workers-default-0123456789")
        match = yield supervisor.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        port = int(match.group(1))
        yield supervisor.wait_for(r"worker 1 serving")
        yield supervisor.wait_for(r"worker 2 serving")
        yield self.serving_pids(port, set())
        count = 60

        @defer.inlineCallbacks
        def ask(i: int) -> Any:
            response = yield self.client.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=json.dumps({"model": "gpt-4o-mini",
                                 "messages": [{"role": "user", "content": f"q{i}"}]}).encode(),
                headers={b"content-type": b"application/json",
                         b"authorization": b"Bearer fk-workers-0123456789abc"},
            )
            yield response.content()
            return response.code

        codes = yield defer.gatherResults([ask(i) for i in range(count)])
        self.assertEqual(codes, [200] * count)
        yield self.stop_supervisor(supervisor)
        with sqlite3.connect(os.path.join(data_dir, SQLITE_FILE)) as db:
            rows = db.execute(
                "SELECT key_label, model, requests, errors, prompt_tokens, completion_tokens "
                "FROM usage_days").fetchall()
        self.assertEqual(rows, [("w", "gpt-4o-mini", count, 0, 5 * count, 3 * count)])
        self.assertIn("usage ledger: sqlite", supervisor.output)
