"""
End-to-end: the real plugin service with chat records on, in front of the
fake upstream; the records are read back from the files on disk.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any, Optional

from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.web.server import NOT_DONE_YET

from twisted_forward.chat.files import read_records, record_files
from twisted_forward.tap import ProxyService
from twisted_forward.upstream import BytesProducer

from .fake_upstream import chat_chunks
from .harness import Collector, ProxyTestCase

JSON = {b"content-type": [b"application/json"]}


def chat_body(text: str, stream: bool = False, model: str = "gpt-4o-mini", **extra: Any) -> bytes:
    return json.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}], **extra}
    ).encode()


class ChatLogTestCase(ProxyTestCase):
    """Starts the proxy with LOG_CHAT on and reads its records back."""

    @defer.inlineCallbacks
    def start_recording(self, **env: str):
        self.log_dir = os.path.abspath(self.mktemp())
        yield self.start_proxy(LOG_CHAT="true", LOG_DIR=self.log_dir, **env)
        [service] = [s for s in self.service if isinstance(s, ProxyService)]
        self.recorder = service.recorder

    def next_records(self, count: int) -> defer.Deferred:
        """Fires once ``count`` more records have been emitted."""
        d: defer.Deferred = defer.Deferred()
        seen: list[dict] = []

        def observe(event: dict) -> None:
            seen.append(event["chat_record"])
            if len(seen) == count:
                self.recorder.publisher.removeObserver(observe)
                d.callback(seen)

        self.recorder.publisher.addObserver(observe)
        return d

    @defer.inlineCallbacks
    def records(self):
        """Every record on disk, once everything emitted so far is written."""
        yield self.recorder.flush()
        return list(read_records(record_files(self.log_dir)))

    @defer.inlineCallbacks
    def post(self, path: str, body: bytes, headers: Optional[dict] = None):
        response = yield self.client.post(self.url(path), data=body, headers={**JSON, **(headers or {})})
        content = yield response.content()
        return response, content


class RecordedExchangeTests(ChatLogTestCase):
    @defer.inlineCallbacks
    def test_streamed_and_plain_answers_beside_their_questions(self):
        """A plain and a streamed chat through the real plugin each give one record holding
        the question, the assembled answer, model, status, outcome, client, key label and
        route; the plain one has usage, the streamed one the bytes sent, and their ids
        differ."""
        yield self.start_recording()
        self.fake.answer_text = "A plain answer"
        yield self.post("/v1/chat/completions", chat_body("plain question"))
        self.fake.answer_text = "A streamed answer, word by word"
        response, body = yield self.post("/v1/chat/completions", chat_body("streamed question", True))
        self.assertEqual(body, b"".join(chat_chunks(self.fake.answer_text, "gpt-4o-mini")))
        plain, streamed = yield self.records()
        for rec, question, answer, stream in (
            (plain, "plain question", "A plain answer", False),
            (streamed, "streamed question", "A streamed answer, word by word", True),
        ):
            self.assertEqual(rec["messages"], [{"role": "user", "content": question}])
            self.assertEqual(rec["choices"], [
                {"index": 0, "role": "assistant", "content": answer, "finish_reason": "stop"}
            ])
            self.assertEqual(
                {k: rec[k] for k in ("kind", "model", "stream", "status", "outcome",
                                     "client_left", "client", "key_label", "route", "problems")},
                {"kind": "chat", "model": "gpt-4o-mini", "stream": stream, "status": 200,
                 "outcome": "complete", "client_left": False, "client": "127.0.0.1",
                 "key_label": "none", "route": "/", "problems": []},
            )
            self.assertGreaterEqual(rec["duration"], 0)
        self.assertEqual(plain["usage"]["total_tokens"], 8)
        self.assertEqual(streamed["response_bytes"], len(body))
        self.assertNotEqual(plain["request_id"], streamed["request_id"])

    @defer.inlineCallbacks
    def test_hundreds_of_concurrent_exchanges_one_record_each(self):
        """300 concurrent chats, half streamed, give exactly 300 records with distinct ids,
        each with its own question, stream flag and the whole answer: records are never
        mixed or lost under load."""
        yield self.start_recording()
        count = 300
        self.fake.answer_text = "the same answer for everyone"

        def one(i: int) -> defer.Deferred:
            d = self.client.post(
                self.url("/v1/chat/completions"),
                data=chat_body(f"question {i}", stream=i % 2 == 0),
                headers=JSON,
            )
            return d.addCallback(lambda r: r.content())

        bodies = yield defer.gatherResults([one(i) for i in range(count)])
        self.assertEqual(len(bodies), count)
        records = yield self.records()
        self.assertEqual(len(records), count)
        questions = sorted(r["messages"][0]["content"] for r in records)
        self.assertEqual(questions, sorted(f"question {i}" for i in range(count)))
        self.assertEqual(len({r["request_id"] for r in records}), count)
        for rec in records:
            i = int(rec["messages"][0]["content"].split()[1])
            self.assertEqual(rec["stream"], i % 2 == 0)
            self.assertEqual(rec["choices"][0]["content"], "the same answer for everyone")
            self.assertEqual(rec["outcome"], "complete")

    @defer.inlineCallbacks
    def test_client_gone_mid_stream(self):
        """What was relayed before the client left is recorded, flagged."""
        yield self.start_recording()
        self.fake.hold_at = 3
        recorded = self.next_records(1)
        response = yield self.client.post(
            self.url("/v1/chat/completions"), data=chat_body("long story", True),
            headers=JSON, unbuffered=True,
        )
        collector = Collector()
        response.deliverBody(collector)
        events = chat_chunks(self.fake.answer_text, "gpt-4o-mini")
        while len(collector.body) < len(b"".join(events[:3])):
            yield collector.got_data
        collector.transport.stopProducing()  # the client hangs up
        [rec] = yield recorded
        self.assertEqual(rec["outcome"], "client_left")
        self.assertTrue(rec["client_left"])
        self.assertEqual(rec["choices"][0]["content"], "Hello from")
        self.assertIsNone(rec["choices"][0]["finish_reason"])
        self.assertEqual(rec["response_bytes"], len(b"".join(events[:3])))
        self.assertFalse(rec["done"])
        [on_disk] = yield self.records()
        self.assertEqual(on_disk, rec)

    @defer.inlineCallbacks
    def test_broken_body_relayed_untouched_and_recorded_as_such(self):
        """A malformed event stream reaches the client byte for byte while its record lists
        the problems (cut mid-event, no [DONE], events not JSON) with an excerpt."""
        yield self.start_recording()
        garbage = [b"data: {not json\r\n\r\n", b"data: \xff\xfe\r", b"\n\r\n: c\n", b"data: {\"choi"]

        def override(request):
            request.setHeader(b"content-type", b"text/event-stream")
            for piece in garbage:
                request.write(piece)
            request.finish()
            return NOT_DONE_YET

        self.fake.override = override
        response, body = yield self.post("/v1/chat/completions", chat_body("q", True))
        self.assertEqual(body, b"".join(garbage))
        [rec] = yield self.records()
        self.assertEqual(rec["outcome"], "complete")
        self.assertEqual(rec["problems"], [
            "stream ended in the middle of an event",
            "stream ended without [DONE]",
            "2 event(s) not a JSON object",
        ])
        self.assertEqual(rec["excerpt"], "{not json")

    @defer.inlineCallbacks
    def test_non_json_answer_recorded_as_such(self):
        """An answer labelled JSON that is HTML reaches the client as sent and is recorded
        with "answer is not valid JSON" and an excerpt."""
        yield self.start_recording()
        self.fake.override = lambda request: (
            request.setHeader(b"content-type", b"application/json"), b"<html>oops</html>"
        )[1]
        response, body = yield self.post("/v1/chat/completions", chat_body("q"))
        self.assertEqual(body, b"<html>oops</html>")
        [rec] = yield self.records()
        self.assertEqual((rec["problems"], rec["excerpt"]), (["answer is not valid JSON"], "<html>oops</html>"))

    @defer.inlineCallbacks
    def test_completions_recorded(self):
        """A streamed legacy completion is recorded as kind completion with its prompt,
        parameters, assembled text and finish_reason."""
        yield self.start_recording()
        events = [
            b'data: {"id": "cmpl-1", "model": "babbage-002", "choices": [{"index": 0, "text": "Once"}]}\n\n',
            b'data: {"id": "cmpl-1", "choices": [{"index": 0, "text": " upon", "finish_reason": "length"}]}\n\n',
            b"data: [DONE]\n\n",
        ]

        def override(request):
            request.setHeader(b"content-type", b"text/event-stream")
            for event in events:
                request.write(event)
            request.finish()
            return NOT_DONE_YET

        self.fake.override = override
        yield self.post("/v1/completions", json.dumps(
            {"model": "babbage-002", "prompt": "Tell me a story", "stream": True, "max_tokens": 2}).encode())
        [rec] = yield self.records()
        self.assertEqual(
            {k: rec[k] for k in ("kind", "prompt", "params", "choices", "finish_reason", "stream")},
            {"kind": "completion", "prompt": "Tell me a story", "params": {"max_tokens": 2},
             "choices": [{"index": 0, "text": "Once upon", "finish_reason": "length"}],
             "finish_reason": "length", "stream": True},
        )

    @defer.inlineCallbacks
    def test_gzip_answer_relayed_verbatim_and_recorded(self):
        """A gzip answer reaches a client that accepts gzip still compressed, byte for byte,
        while the record holds the decoded answer and the compressed size."""
        import gzip

        from twisted.web.client import readBody
        from twisted.web.http_headers import Headers

        yield self.start_recording()
        packed = gzip.compress(json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "zipped answer"}}]}).encode())

        def override(request):
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-encoding", b"gzip")
            return packed

        self.fake.override = override
        response = yield self.agent.request(
            b"POST", self.url("/v1/chat/completions").encode(),
            Headers({b"accept-encoding": [b"gzip"], b"content-type": [b"application/json"]}),
            BytesProducer(chat_body("zip it")),
        )
        self.assertEqual((yield readBody(response)), packed)
        [rec] = yield self.records()
        self.assertEqual(rec["choices"][0]["content"], "zipped answer")
        self.assertEqual(rec["response_bytes"], len(packed))

    @defer.inlineCallbacks
    def test_proxy_timeout_recorded(self):
        """An upstream that never answers gives the client a 504, and the record keeps the
        question with status 504 and outcome proxy_error."""
        yield self.start_recording(READ_TIMEOUT="0.2")
        self.fake.override = lambda request: NOT_DONE_YET
        response, body = yield self.post("/v1/chat/completions", chat_body("slow"))
        self.assertEqual(response.code, 504)
        [rec] = yield self.records()
        self.assertEqual((rec["status"], rec["outcome"], rec["messages"][0]["content"]),
                         (504, "proxy_error", "slow"))

    @defer.inlineCallbacks
    def test_metadata_only_and_unrecorded_routes(self):
        """An embeddings exchange is recorded with usage and input count only, the vector
        and the input text never on disk; /v1/models and /v1/files leave no record."""
        yield self.start_recording()
        vector = [0.0123456789] * 64

        def override(request):
            request.setHeader(b"content-type", b"application/json")
            if request.path == b"/v1/embeddings":
                return json.dumps({
                    "object": "list", "model": "text-embedding-3-small",
                    "data": [{"object": "embedding", "index": 0, "embedding": vector}],
                    "usage": {"prompt_tokens": 4, "total_tokens": 4},
                }).encode()
            return b'{"object": "list", "data": []}'

        self.fake.override = override
        yield self.post("/v1/embeddings", json.dumps(
            {"model": "text-embedding-3-small", "input": "private sentence"}).encode())
        response = yield self.client.get(self.url("/v1/models"))
        yield response.content()
        yield self.post("/v1/files", b"{}")
        [rec] = yield self.records()
        self.assertEqual(rec["kind"], "embeddings")
        self.assertEqual(rec["usage"], {"prompt_tokens": 4, "total_tokens": 4})
        self.assertEqual(rec["params"], {"input_count": 1})
        with open(record_files(self.log_dir)[0], encoding="utf-8") as f:
            text = f.read()
        self.assertNotIn("0.0123456789", text)
        self.assertNotIn("private sentence", text)


class SecretTests(ChatLogTestCase):
    default_key = "sk-default-secret-0123456789"
    forward_key = "fk-forward-secret-0123456789"

    @defer.inlineCallbacks
    def test_no_key_in_any_log_file(self):
        """Keys never reach a record, even when the upstream echoes them or a
        user pastes one; the forward key's label does."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        yield self.start_recording(
            OPENAI_API_KEY=self.default_key, FORWARD_KEY=f"team-x:{self.forward_key}"
        )
        calls = []

        def override(request):
            calls.append(request)
            auth = (request.getHeader(b"authorization") or b"").decode()
            request.setHeader(b"content-type", b"application/json")
            if len(calls) == 2:
                request.setResponseCode(401)
                return json.dumps({"error": {"message": f"Incorrect key: {auth}", "type": "x"}}).encode()
            return json.dumps({"choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": f"you sent {auth}"}}]}).encode()

        self.fake.override = override
        bearer = {b"authorization": [f"Bearer {self.forward_key}".encode()]}
        yield self.post("/v1/chat/completions", chat_body(f"my key is {self.forward_key}"), bearer)
        response, body = yield self.post("/v1/chat/completions", chat_body("again"), bearer)
        self.assertEqual(response.code, 401)
        records = yield self.records()
        self.assertEqual([r["key_label"] for r in records], ["team-x", "team-x"])
        self.assertEqual(records[0]["messages"][0]["content"], "my key is ***")
        # The relay masked our key in the answer already (keeping its
        # length); the record holds no more of it than the client saw.
        self.assertRegex(records[0]["choices"][0]["content"], r"^you sent Bearer (sk-\*+|\*\*\*)$")
        self.assertEqual(records[1]["status"], 401)
        self.assertIn("Incorrect key", records[1]["error"]["message"])
        yield self.service.stopService()
        self.service.stopService = lambda: defer.succeed(None)  # stopped already
        for name in os.listdir(self.log_dir):
            with open(os.path.join(self.log_dir, name), "rb") as f:
                data = f.read()
            self.assertNotIn(b"secret-0123456789", data)
        text = json.dumps([{k: repr(v) for k, v in e.items()} for e in events])
        self.assertNotIn("secret-0123456789", text)


class LogChatOffTests(ChatLogTestCase):
    @defer.inlineCallbacks
    def test_log_chat_false_writes_nothing(self):
        """With LOG_CHAT=false (and no ledger) there is no recorder and, after plain and
        streamed chats and a stop, no log folder is created."""
        log_dir = os.path.abspath(self.mktemp())
        # With the ledger on, records are assembled (never written) for it:
        # tests/test_ledger_e2e.py checks that case writes no chat file.
        yield self.start_proxy(LOG_CHAT="false", LOG_DIR=log_dir, LEDGER="false")
        [service] = [s for s in self.service if isinstance(s, ProxyService)]
        self.assertIsNone(service.recorder)
        yield self.post("/v1/chat/completions", chat_body("q"))
        yield self.post("/v1/chat/completions", chat_body("q", True))
        yield self.service.stopService()
        self.service.stopService = lambda: defer.succeed(None)
        self.assertFalse(os.path.exists(log_dir))

    def test_unwritable_log_dir_stops_start_up(self):
        """A LOG_DIR that cannot be written stops start-up with SystemExit and a line naming
        LOG_DIR (--log-dir), instead of failing on the first chat."""
        from twisted.internet import reactor

        from twisted_forward.tap import Options, makeService

        not_a_dir = os.path.abspath(self.mktemp())
        with open(not_a_dir, "w"):
            pass
        options = Options()
        options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--env-file", os.devnull])
        errors = io.StringIO()
        self.patch(sys, "stderr", errors)
        with self.assertRaises(SystemExit):
            makeService(options, reactor, {"LOG_CHAT": "true", "LOG_DIR": not_a_dir})
        self.assertIn("LOG_DIR (--log-dir): cannot write chat records in", errors.getvalue())
