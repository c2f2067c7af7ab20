"""
End-to-end with a real ``twistd -n openai-forward`` process: every exchange
answered is on disk after SIGTERM, even right after a burst, and no key is in
any log file.
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone

from twisted_forward.chat.files import read_records, record_files

from .fake_upstream import chat_chunks
from .harness import Collector, ProxyTestCase
from .processes import ROOT
from .processes import ChildProcess as Twistd

DEFAULT_KEY = "sk-sigterm-secret-abcdef0123"
FORWARD_KEY = "fk-sigterm-secret-abcdef0123"


class SigtermTests(ProxyTestCase):
    timeout = 120

    def spawn_twistd(self, workdir: str) -> Twistd:
        env = {
            k: v for k, v in os.environ.items()
            if k not in ("OPENAI_API_KEY", "FORWARD_KEY", "LOG_DIR", "ROUTE_PREFIX",
                         "FORWARD_CONFIG", "OPENAI_BASE_URL", "PROXY", "IP_WHITELIST")
        }
        env.update(
            PYTHONPATH=ROOT,
            OPENAI_BASE_URL=f"http://127.0.0.1:{self.upstream_port}",
            OPENAI_API_KEY=DEFAULT_KEY,
            FORWARD_KEY=f"burst:{FORWARD_KEY}",
            LOG_CHAT="true",
            SHUTDOWN_GRACE="60",
        )
        process = Twistd()
        args = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "openai-forward",
            "--port", "tcp:0:interface=127.0.0.1", "--env-file", os.devnull,
        ]
        transport = reactor.spawnProcess(process, sys.executable, args, env=env, path=workdir)

        def stop():
            if process.exit_code is None and not process.ended.called:
                transport.signalProcess("KILL")
                return process.ended

        self.addCleanup(stop)
        return process

    @defer.inlineCallbacks
    def test_records_intact_after_sigterm_right_after_a_burst(self):
        """Records intact after SIGTERM right after a burst."""
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
        twistd.transport.signalProcess("TERM")
        yield twistd.wait_for(rb"draining \d+ open request")
        self.fake.release.callback(None)
        yield defer.gatherResults([c.done for c in collectors])
        ended = yield twistd.ended
        # An orderly shutdown exits 0 (not by re-raising SIGTERM).
        self.assertEqual(
            (type(ended), ended.exitCode),
            (ProcessDone, 0),
            twistd.output,
        )
        self.assertIn("Server Shut Down", twistd.output)

        full = b"".join(chat_chunks(self.fake.answer_text, "gpt-4o-mini"))
        self.assertEqual([c.body for c in collectors], [full] * stream_count)
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
