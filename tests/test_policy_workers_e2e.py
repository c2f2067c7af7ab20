"""
``--workers 2`` with policies: real supervisor and worker processes, the
supervisor keeping the counters and the default keys' health for both.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet import defer
from twisted.web.server import Request

from .fake_upstream import chat_answer
from .processes import ChildProcess
from .test_workers import WorkersTestCase

ALICE = "fk-alice-0123456789"
DEAD = "sk-dead-0123456789"
LIVE = "sk-live-0123456789"
_ANSWERED = re.compile(r"\[worker-(\d+)[^\]]*\].* POST /v1/chat/completions (\d{3}) ")


class WorkersPolicyTests(WorkersTestCase):
    """The plugin with ``--workers 2`` as twistd runs it."""

    @defer.inlineCallbacks
    def start(self, **env: str) -> Any:
        """Start ``twistd openai-forward --workers 2``; fires with its base
        URL once both workers serve."""
        self.supervisor = supervisor = self.start_supervisor(2, **{
            "FORWARD_KEY": f"alice:{ALICE}",
            # Generous: a loaded test machine must not turn into an outage.
            "LIMITS_STORE_TIMEOUT": "5",
            **env,
        })
        self.addCleanup(self._stop, supervisor)
        match = yield supervisor.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        yield supervisor.wait_for(r"\[worker-1\] worker 1 serving")
        yield supervisor.wait_for(r"\[worker-2\] worker 2 serving")
        return f"http://127.0.0.1:{match.group(1)}"

    def _stop(self, supervisor: ChildProcess) -> Any:
        if supervisor.ended.called:
            return None
        return self.stop_supervisor(supervisor)

    @defer.inlineCallbacks
    def ask(self, base: str) -> Any:
        response = yield self.client.post(
            base + "/v1/chat/completions",
            data=json.dumps({"model": "gpt-4o-mini", "messages": []}).encode(),
            headers={b"authorization": [b"Bearer " + ALICE.encode()],
                     b"content-type": [b"application/json"]},
        )
        yield response.content()
        return response.code

    def answered(self) -> list[tuple[int, int]]:
        """(worker, status) of every chat answered, from the access log."""
        return [
            (int(m.group(1)), int(m.group(2)))
            for m in map(_ANSWERED.search, self.supervisor.lines) if m
        ]

    @defer.inlineCallbacks
    def test_limit_exact_across_workers(self) -> Any:
        """rpm 7 for alice: 20 requests at once on new connections, then one
        at a time until both workers have answered: exactly 7 succeed in
        all, and a worker refuses requests it never counted itself."""
        base = yield self.start(
            OPENAI_API_KEY=LIVE,
            KEY_POLICY=json.dumps({"alice": {"rpm": 7}}),
            RATE_LIMIT_STRATEGY="moving-window",
        )
        codes = yield defer.gatherResults([self.ask(base) for _ in range(20)])
        self.assertEqual(sorted(codes), [200] * 7 + [429] * 13, codes)
        for _ in range(200):
            if {worker for worker, _ in self.answered()} == {1, 2}:
                break
            self.assertEqual((yield self.ask(base)), 429)
        else:
            self.fail(f"one worker answered everything: {self.answered()}")
        chats = [s for s in self.fake.seen if s.uri == b"/v1/chat/completions"]
        self.assertEqual(len(chats), 7)
        # Every access log line is in once the processes are gone.
        yield self._stop(self.supervisor)
        answered = self.answered()
        self.assertEqual(sum(1 for _, status in answered if status == 200), 7, answered)

    @defer.inlineCallbacks
    def test_a_revoked_key_is_revoked_for_every_worker(self) -> Any:
        """The upstream refuses one default key (401 invalid_api_key): the
        worker that finds out tells the supervisor, which tells the other
        worker; once it has, the dead key is never sent upstream again,
        however many requests each worker serves."""
        sent_with: list[bytes] = []

        def upstream(request: Request) -> bytes:
            auth = request.getHeader(b"authorization") or b""
            sent_with.append(auth)
            request.setHeader(b"content-type", b"application/json")
            if auth.endswith(DEAD.encode()):
                request.setResponseCode(401)
                return json.dumps({"error": {
                    "message": "Incorrect API key provided", "type": "invalid_request_error",
                    "param": None, "code": "invalid_api_key",
                }}).encode()
            return json.dumps(chat_answer("hi", "gpt-4o-mini")).encode()

        self.fake.override = upstream
        base = yield self.start(OPENAI_API_KEY=f"{DEAD} {LIVE}")
        # The first request finds the dead key (each worker starts with it).
        self.assertEqual((yield self.ask(base)), 200)
        found = yield self.supervisor.wait_for(
            r"\[worker-(\d)[^\]]*\] the upstream refused default key")
        other = 3 - int(found.group(1))
        yield self.supervisor.wait_for(
            rf"\[worker-{other}[^\]]*\] default key \S+ leaves the rotation "
            r"\(learnt from the shared store\)")
        # Now both workers serve: requests go in batches at once on new
        # connections (one at a time, the kernel may give every connection
        # to the same worker), until each worker has answered twice.
        for _ in range(25):
            codes = yield defer.gatherResults([self.ask(base) for _ in range(6)])
            self.assertEqual(codes, [200] * 6)
            served = [worker for worker, _ in self.answered()]
            if served.count(1) >= 2 and served.count(2) >= 2:
                break
        else:
            self.fail(f"both workers did not answer: {self.answered()}")
        dead = [a for a in sent_with if a.endswith(DEAD.encode())]
        self.assertEqual(len(dead), 1, sent_with)
        self.assertIn("leaves the rotation", self.supervisor.output)
