"""
End-to-end with a real ``twistd -n openai-forward`` process: every exchange
answered is on disk after SIGTERM, even right after a burst, and no key is in
any log file.
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.web.client import ResponseDone

from twisted_forward.chat.files import read_records, record_files

from .fake_upstream import chat_chunks
from .harness import Collector, ProxyTestCase
from .processes import ChildProcess, assert_exit, child_env, spawn_twistd

DEFAULT_KEY = "sk-sigterm-secret-abcdef0123"
FORWARD_KEY = "fk-sigterm-secret-abcdef0123"


class SigtermTests(ProxyTestCase):
    timeout = 120

    def spawn_twistd(self, workdir: str) -> ChildProcess:
        env = child_env(
            OPENAI_BASE_URL=f"http://127.0.0.1:{self.upstream_port}",
            OPENAI_API_KEY=DEFAULT_KEY,
            FORWARD_KEY=f"burst:{FORWARD_KEY}",
            LOG_CHAT="true",
            SHUTDOWN_GRACE="60",
        )
        return spawn_twistd(
            self,
            ["-n", "--pidfile=", "openai-forward",
             "--port", "tcp:0:interface=127.0.0.1", "--env-file", os.devnull],
            env, workdir,
        )

    @defer.inlineCallbacks
    def test_records_intact_after_sigterm_right_after_a_burst(self):
        """SIGTERM right after a burst of 40 plain and 20 streamed chats,
        with the streams mid-answer: every stream still ends whole, every
        exchange has exactly one complete record on disk, the process exits
        0 in order, and no key is in any record or log line."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        twistd = self.spawn_twistd(workdir)
        match = yield twistd.wait_for(rb"starting on (\d+)")
        base = f"http://127.0.0.1:{int(match.group(1))}"
        auth = {b"authorization": [f"Bearer {FORWARD_KEY}".encode()],
                b"content-type": [b"application/json"]}
        self.fake.hold_at = 2  # streams stay open until the test releases them
        self.fake.answer_text = "an answer that must survive shutdown"

        def body(i: int, stream: bool) -> bytes:
            return json.dumps({"model": "gpt-4o-mini", "stream": stream,
                               "messages": [{"role": "user", "content": f"burst {i}"}]}).encode()

        plain_count, stream_count = 40, 20
        plain = [
            self.client.post(base + "/v1/chat/completions", data=body(i, False), headers=auth)
            .addCallback(lambda r: r.content())
            for i in range(plain_count)
        ]
        streams = yield defer.gatherResults([
            self.client.post(base + "/v1/chat/completions", data=body(plain_count + i, True),
                             headers=auth, unbuffered=True)
            for i in range(stream_count)
        ])
        collectors = []
        for response in streams:
            collector = Collector()
            response.deliverBody(collector)
            collectors.append(collector)
        for collector in collectors:
            while not collector.chunks:  # (data may come with deliverBody)
                yield collector.got_data
        yield defer.gatherResults(plain)
        # Plain answers are in (their records likely still in memory) and
        # the streams are mid-answer: stop the proxy now.
        twistd.signal("TERM")
        yield twistd.wait_for(rb"draining \d+ open request")
        self.fake.release.callback(None)
        yield defer.gatherResults([c.done for c in collectors])
        yield twistd.exited()
        # An orderly shutdown exits 0 (not by re-raising SIGTERM).
        assert_exit(self, twistd, 0)
        self.assertIn("Server Shut Down", twistd.output)

        full = b"".join(chat_chunks(self.fake.answer_text, "gpt-4o-mini"))
        self.assertEqual([c.body for c in collectors], [full] * stream_count)
        # Each stream ended by its last chunk, not cut by the shutdown.
        self.assertEqual({type(c.reason.value) for c in collectors}, {ResponseDone})
        log_dir = os.path.join(workdir, "Log")  # the default LOG_DIR
        records = list(read_records(record_files(log_dir)))
        self.assertEqual(
            sorted(r["messages"][0]["content"] for r in records),
            sorted(f"burst {i}" for i in range(plain_count + stream_count)),
        )
        for rec in records:
            self.assertEqual(
                (rec["outcome"], rec["status"], rec["key_label"], rec["problems"]),
                ("complete", 200, "burst", []),
            )
            self.assertEqual(rec["choices"][0]["content"], self.fake.answer_text)
        self.assertEqual(sum(r["stream"] for r in records), stream_count)
        # No key in any log file: the records nor twistd's own log.
        for path in record_files(log_dir):
            with open(path, "rb") as f:
                self.assertNotIn(b"sigterm-secret", f.read())
        self.assertNotIn("sigterm-secret", twistd.output)
        self.assertIn("burst", twistd.output)  # the label is fine
