"""
What a chat record says: questions from request bodies, answers reassembled
from streamed or whole bodies, and bodies that make no sense recorded as such.
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any, Optional

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from twisted_forward.chat import record as chatrecord
from twisted_forward.chat.record import (
    AnswerReader,
    ChoiceAssembler,
    exchange_kind,
    multipart_fields,
    strip_media,
    summarize_request,
)

from .fake_upstream import chat_answer, chat_chunks, sse_event


def read(
    kind: str,
    chunks: list[bytes],
    ctype: Optional[bytes] = b"text/event-stream",
    status: int = 200,
    encoding: Optional[bytes] = None,
) -> dict[str, Any]:
    headers = Headers()
    if ctype is not None:
        headers.setRawHeaders(b"content-type", [ctype])
    if encoding is not None:
        headers.setRawHeaders(b"content-encoding", [encoding])
    reader = AnswerReader(kind)
    reader.head(status, headers)
    for chunk in chunks:
        reader.feed(chunk)
    result = reader.result()
    result["size"] = reader.size
    return result


def chunk(choices: list[dict], **extra: Any) -> bytes:
    return sse_event({"id": "c1", "object": "chat.completion.chunk", "model": "m",
                      "choices": choices, **extra})


DONE = b"data: [DONE]\n\n"


class KindTests(SynchronousTestCase):
    def test_recorded_paths(self):
        """Recorded paths."""
        for path, kind in [
            ("/v1/chat/completions", "chat"),
            ("/chat/completions", "chat"),
            ("/openai/deployments/gpt/chat/completions", "chat"),
            ("/v1/completions", "completion"),
            ("/v1/embeddings", "embeddings"),
            ("/v1/audio/transcriptions", "audio"),
            ("/v1/audio/speech", "audio"),
            ("/v1/images/generations", "images"),
            ("/v1/images/edits", "images"),
        ]:
            self.assertEqual(exchange_kind("POST", path), kind, path)

    def test_other_routes_not_recorded(self):
        """Other routes not recorded."""
        for method, path in [
            ("GET", "/v1/chat/completions"),  # the stored-completions list
            ("POST", "/v1/chat/completions/chatcmpl-1"),
            ("GET", "/v1/models"),
            ("POST", "/v1/files"),
            ("POST", "/v1/moderations"),
            ("POST", "/v1/chat/completionsx"),
        ]:
            self.assertIsNone(exchange_kind(method, path), path)


class StreamedChatTests(SynchronousTestCase):
    def test_fake_upstream_stream(self):
        """Fake upstream stream."""
        result = read("chat", chat_chunks("Hello there world"))
        self.assertEqual(result["format"], "sse")
        self.assertTrue(result["done"])
        self.assertEqual(
            result["choices"],
            [{"index": 0, "role": "assistant", "content": "Hello there world",
              "finish_reason": "stop"}],
        )
        self.assertEqual(result["problems"], [])

    def test_first_delta_without_role(self):
        """openai-forward crashed here: a stream whose first delta has no role."""
        result = read("chat", [
            chunk([{"index": 0, "delta": {"content": "Hi"}}]),
            chunk([{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}]),
            DONE,
        ])
        self.assertEqual(result["choices"][0]["content"], "Hi!")
        self.assertEqual(result["choices"][0]["role"], "assistant")

    def test_n_choices_kept_apart(self):
        """N choices kept apart."""
        events = []
        for word_a, word_b in [("A1", "B1"), (" A2", " B2"), (" A3", " B3")]:
            events.append(chunk([{"index": 1, "delta": {"content": word_b}}]))
            events.append(chunk([{"index": 0, "delta": {"content": word_a}}]))
        events.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        events.append(chunk([{"index": 1, "delta": {}, "finish_reason": "length"}]))
        result = read("chat", events + [DONE])
        self.assertEqual(
            [(c["index"], c["content"], c["finish_reason"]) for c in result["choices"]],
            [(0, "A1 A2 A3", "stop"), (1, "B1 B2 B3", "length")],
        )

    def test_tool_calls_streamed(self):
        """Tool calls streamed."""
        events = [
            chunk([{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [
                {"index": 0, "id": "call_a", "type": "function",
                 "function": {"name": "get_weather", "arguments": ""}}]}}]),
            chunk([{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": '{"city": '}}]}}]),
            chunk([{"index": 0, "delta": {"tool_calls": [
                {"index": 1, "id": "call_b", "type": "function",
                 "function": {"name": "get_time", "arguments": '{"tz"'}}]}}]),
            chunk([{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": '"Paris"}'}}]}}]),
            chunk([{"index": 0, "delta": {"tool_calls": [
                {"index": 1, "function": {"arguments": ': "CET"}'}}]}}]),
            chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
            DONE,
        ]
        [choice] = read("chat", events)["choices"]
        self.assertIsNone(choice["content"])
        self.assertEqual(choice["finish_reason"], "tool_calls")
        self.assertEqual(choice["tool_calls"], [
            {"id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function",
             "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
        ])

    def test_tool_calls_without_index_and_repeated_name(self):
        """Some servers send no index and repeat the name in every piece."""
        events = [
            chunk([{"delta": {"tool_calls": [
                {"id": "t1", "function": {"name": "f", "arguments": "{"}}]}}]),
            chunk([{"delta": {"tool_calls": [{"function": {"name": "f", "arguments": "}"}}]}}]),
            chunk([{"delta": {"tool_calls": [
                {"id": "t2", "function": {"name": "g", "arguments": "[]"}}]}}]),
            DONE,
        ]
        [choice] = read("chat", events)["choices"]
        self.assertEqual(
            [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in choice["tool_calls"]],
            [("t1", "f", "{}"), ("t2", "g", "[]")],
        )

    def test_legacy_function_call(self):
        """Legacy function call."""
        events = [
            chunk([{"index": 0, "delta": {"role": "assistant", "function_call": {"name": "lookup", "arguments": ""}}}]),
            chunk([{"index": 0, "delta": {"function_call": {"arguments": '{"q":'}}}]),
            chunk([{"index": 0, "delta": {"function_call": {"arguments": ' 1}'}}, "finish_reason": "function_call"}]),
            DONE,
        ]
        [choice] = read("chat", events)["choices"]
        self.assertEqual(choice["function_call"], {"name": "lookup", "arguments": '{"q": 1}'})

    def test_usage_chunk_refusal_reasoning_and_audio(self):
        """Usage chunk refusal reasoning and audio."""
        events = [
            chunk([{"index": 0, "delta": {"reasoning_content": "think "}}]),
            chunk([{"index": 0, "delta": {"reasoning_content": "more"}}]),
            chunk([{"index": 0, "delta": {"refusal": "No."}}]),
            chunk([{"index": 0, "delta": {"audio": {"id": "a", "data": "UklGRg==", "transcript": "said"}}}]),
            chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
            chunk([], usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
            DONE,
        ]
        result = read("chat", events)
        [choice] = result["choices"]
        self.assertEqual(choice["reasoning_content"], "think more")
        self.assertEqual(choice["refusal"], "No.")
        self.assertEqual(choice["audio_transcript"], "said")
        self.assertNotIn("UklGRg", json.dumps(result))
        self.assertEqual(result["usage"]["total_tokens"], 7)

    def test_error_event_mid_stream(self):
        """Error event mid stream."""
        events = [
            chunk([{"index": 0, "delta": {"content": "par"}}]),
            sse_event({"error": {"message": "overloaded", "type": "server_error"}}),
        ]
        result = read("chat", events)
        self.assertEqual(result["choices"][0]["content"], "par")
        self.assertEqual(result["error"]["message"], "overloaded")
        self.assertIn("stream ended without [DONE]", result["problems"])
        self.assertFalse(result["done"])

    def test_completion_stream(self):
        """Completion stream."""
        events = [
            sse_event({"id": "cmpl", "object": "text_completion", "model": "davinci",
                       "choices": [{"index": 0, "text": "Once", "finish_reason": None}]}),
            sse_event({"id": "cmpl", "choices": [{"index": 0, "text": " upon", "finish_reason": "length"}]}),
            DONE,
        ]
        result = read("completion", events)
        self.assertEqual(result["choices"], [{"index": 0, "text": "Once upon", "finish_reason": "length"}])
        self.assertEqual(result["response_model"], "davinci")

    def test_non_json_event_recorded_as_such(self):
        """Non JSON event recorded as such."""
        events = [
            chunk([{"index": 0, "delta": {"content": "ok"}}]),
            b"data: this is not json\n\n",
            b"data: [1, 2]\n\n",
            chunk([{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}]),
            DONE,
        ]
        result = read("chat", events)
        self.assertEqual(result["choices"][0]["content"], "ok!")
        self.assertEqual(result["problems"], ["2 event(s) not a JSON object"])
        self.assertEqual(result["excerpt"], "this is not json")

    def test_stream_cut_mid_event(self):
        """Stream cut mid event."""
        whole = chunk([{"index": 0, "delta": {"content": "Hel"}}])
        result = read("chat", [whole, b'data: {"choices": [{"delta": {"content": "lo'])
        self.assertEqual(result["choices"][0]["content"], "Hel")
        self.assertEqual(
            result["problems"],
            ["stream ended in the middle of an event", "stream ended without [DONE]"],
        )

    def test_gzip_stream_split_anywhere(self):
        """Gzip stream split anywhere."""
        plain = b"".join(chat_chunks("a gzipped stream"))
        packed = gzip.compress(plain)
        for step in (1, 7, 100):
            pieces = [packed[i : i + step] for i in range(0, len(packed), step)]
            result = read("chat", pieces, encoding=b"gzip")
            self.assertEqual(result["choices"][0]["content"], "a gzipped stream")
            self.assertEqual(result["size"], len(packed))

    def test_text_limit(self):
        """Text limit."""
        self.patch(chatrecord, "TEXT_LIMIT", 10)
        events = [chunk([{"index": 0, "delta": {"content": "12345"}}])] * 3 + [DONE]
        [choice] = read("chat", events)["choices"]
        self.assertEqual(choice["content"], "1234512345")
        self.assertTrue(choice["truncated"])


class WholeAnswerTests(SynchronousTestCase):
    def test_json_chat_answer(self):
        """JSON chat answer."""
        body = json.dumps(chat_answer("Plain answer", "gpt-x")).encode()
        result = read("chat", [body[:10], body[10:]], ctype=b"application/json; charset=utf-8")
        self.assertEqual(result["format"], "json")
        self.assertEqual(result["choices"], [
            {"index": 0, "role": "assistant", "content": "Plain answer", "finish_reason": "stop"}
        ])
        self.assertEqual(result["usage"]["total_tokens"], 8)
        self.assertEqual(result["response_model"], "gpt-x")

    def test_json_answer_with_tool_calls_and_n(self):
        """JSON answer with tool calls and n."""
        answer = {
            "id": "x", "model": "m",
            "choices": [
                {"index": 1, "message": {"role": "assistant", "content": "second"}, "finish_reason": "stop"},
                {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                 "finish_reason": "tool_calls"},
            ],
        }
        result = read("chat", [json.dumps(answer).encode()], ctype=b"application/json")
        self.assertEqual(result["choices"][0]["tool_calls"][0]["function"], {"name": "f", "arguments": "{}"})
        self.assertEqual(result["choices"][1]["content"], "second")

    def test_deflate_both_flavours(self):
        """Deflate both flavours."""
        body = json.dumps(chat_answer("deflated")).encode()
        for packed in (zlib.compress(body), zlib.compress(body)[2:-4]):  # zlib, raw
            result = read("chat", [packed], ctype=b"application/json", encoding=b"deflate")
            self.assertEqual(result["choices"][0]["content"], "deflated")

    def test_broken_gzip(self):
        """Broken gzip."""
        result = read("chat", [b"not gzip at all"], ctype=b"application/json", encoding=b"gzip")
        self.assertEqual(result["problems"], ["answer is not valid gzip data"])
        self.assertEqual(result["size"], 15)

    def test_unknown_encoding_noted(self):
        """Unknown encoding noted."""
        result = read("chat", [b"\x1b\x00brotli"], ctype=b"application/json", encoding=b"br")
        self.assertEqual(result["format"], "encoded")
        self.assertEqual(result["problems"], ["answer encoded as br: not decoded"])
        self.assertEqual(result["choices"], [])

    def test_broken_json_body(self):
        """Broken JSON body."""
        result = read("chat", [b'{"choices": [{"message": '], ctype=b"application/json")
        self.assertEqual(result["problems"], ["answer is not valid JSON"])
        self.assertEqual(result["excerpt"], '{"choices": [{"message": ')

    def test_sniffed_without_content_type(self):
        """Sniffed without content type."""
        body = json.dumps(chat_answer("sniffed")).encode()
        self.assertEqual(read("chat", [b"  ", body], ctype=None)["choices"][0]["content"], "sniffed")
        stream = chat_chunks("sniffed stream")
        result = read("chat", stream, ctype=b"text/plain")
        self.assertEqual(result["format"], "sse")
        self.assertEqual(result["choices"][0]["content"], "sniffed stream")
        result = read("chat", [b"<html>bad gateway</html>"], ctype=b"text/html", status=502)
        self.assertEqual((result["format"], result["excerpt"]), ("other", "<html>bad gateway</html>"))

    def test_error_answer_keeps_error_without_key(self):
        """Error answer keeps error without key."""
        body = json.dumps({"error": {
            "message": "Incorrect API key provided: sk-proj-abcdefghijklmnop1234.",
            "type": "invalid_request_error", "code": "invalid_api_key"}}).encode()
        result = read("chat", [body], ctype=b"application/json", status=401)
        self.assertEqual(result["error"]["code"], "invalid_api_key")
        self.assertNotIn("abcdefghijklmnop", json.dumps(result))
        self.assertIn("sk-***", result["error"]["message"])

    def test_empty_answer(self):
        """Empty answer."""
        result = read("chat", [], ctype=b"application/json", status=500)
        self.assertEqual((result["choices"], result["problems"]), ([], []))

    def test_too_large_answer(self):
        """Too large answer."""
        self.patch(chatrecord, "BODY_LIMIT", 100)
        body = json.dumps(chat_answer("x" * 200)).encode()
        result = read("chat", [body[:50], body[50:]], ctype=b"application/json")
        self.assertEqual(result["problems"], [f"answer of {len(body)} bytes too large to record"])
        self.assertEqual(result["usage"]["total_tokens"], 8)  # found in the tail

    def test_decompression_bounded(self):
        """Decompression bounded."""
        self.patch(chatrecord, "BODY_LIMIT", 1000)
        packed = gzip.compress(b"{" + b" " * 100_000 + b"}")
        result = read("chat", [packed], ctype=b"application/json", encoding=b"gzip")
        self.assertIn("decompressed answer too large to record", result["problems"])


class MetadataAnswerTests(SynchronousTestCase):
    def test_embeddings_usage_without_vectors(self):
        """Embeddings usage without vectors."""
        body = json.dumps({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": [0.123456] * 50} for i in range(3)],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 9, "total_tokens": 9},
        }).encode()
        result = read("embeddings", [body], ctype=b"application/json")
        self.assertEqual(result["usage"], {"prompt_tokens": 9, "total_tokens": 9})
        self.assertEqual(result["data_count"], 3)
        self.assertNotIn("0.123456", json.dumps(result))
        self.assertNotIn("choices", result)

    def test_large_embeddings_usage_from_tail(self):
        """Large embeddings usage from tail."""
        body = json.dumps({
            "data": [{"embedding": [0.5] * 1000} for _ in range(300)],
            "usage": {"prompt_tokens": 4000, "total_tokens": 4000},
        }).encode()
        self.assertGreater(len(body), chatrecord.METADATA_LIMIT)
        pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)]
        result = read("embeddings", pieces, ctype=b"application/json")
        self.assertEqual(result["usage"]["total_tokens"], 4000)
        self.assertEqual(result["problems"], [])

    def test_speech_is_bytes_only(self):
        """Speech is bytes only."""
        result = read("audio", [b"ID3\x00" * 1000], ctype=b"audio/mpeg")
        self.assertEqual((result["format"], result["size"], result["usage"]), ("binary", 4000, None))
        self.assertNotIn("excerpt", result)

    def test_image_stream_usage_only(self):
        """Image stream usage only."""
        events = [
            sse_event({"type": "image_generation.partial_image", "b64_json": "QUFB" * 100}),
            sse_event({"type": "image_generation.completed", "b64_json": "QkJC" * 100,
                       "usage": {"total_tokens": 50}}),
        ]
        result = read("images", events)
        self.assertEqual(result["usage"], {"total_tokens": 50})
        self.assertNotIn("QUFB", json.dumps(result))


class RequestTests(SynchronousTestCase):
    def test_chat_request(self):
        """Chat request."""
        image = "data:image/png;base64," + "iVBORw0KGgo" * 500
        body = json.dumps({
            "model": "gpt-4o", "stream": True, "temperature": 0.2,
            "stream_options": {"include_usage": True},
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": image}},
                ]},
            ],
        }).encode()
        out = summarize_request("chat", body)
        self.assertEqual((out["model"], out["stream"]), ("gpt-4o", True))
        self.assertEqual(out["params"], {"temperature": 0.2, "stream_options": {"include_usage": True}})
        self.assertEqual(out["messages"][0], {"role": "system", "content": "Be brief."})
        url = out["messages"][1]["content"][1]["image_url"]["url"]
        self.assertEqual(url, f"data:image/png;base64,… ({len(image)} characters omitted)")

    def test_completion_prompt(self):
        """Completion prompt."""
        out = summarize_request("completion", b'{"model": "m", "prompt": ["a", "b"], "max_tokens": 5}')
        self.assertEqual((out["prompt"], out["params"]), (["a", "b"], {"max_tokens": 5}))
        self.assertNotIn("messages", out)

    def test_request_not_json(self):
        """Request not JSON."""
        out = summarize_request("chat", b"model=gpt&messages=hi")
        self.assertEqual(out["problems"], ["request body is not JSON"])
        self.assertEqual(out["request_excerpt"], "model=gpt&messages=hi")
        self.assertEqual(summarize_request("chat", b"[1]")["problems"], ["request body is not a JSON object"])
        self.assertEqual(summarize_request("chat", b"")["problems"], ["request body is not JSON"])

    def test_embeddings_request_has_no_input(self):
        """Embeddings request has no input."""
        out = summarize_request("embeddings", json.dumps({
            "model": "e", "input": ["secret text one", "two"], "dimensions": 256}).encode())
        self.assertEqual(out["params"], {"dimensions": 256, "input_count": 2})
        self.assertNotIn("secret text", json.dumps(out))
        out = summarize_request("embeddings", b'{"model": "e", "input": [1, 2, 3]}')
        self.assertEqual(out["params"]["input_count"], 1)  # one tokenised input

    def test_large_embeddings_request_not_parsed(self):
        """Large embeddings request not parsed."""
        body = json.dumps({"input": ["text " * 100] * 3000, "model": "text-embedding-3-large"}).encode()
        self.assertGreater(len(body), chatrecord.METADATA_LIMIT)
        out = summarize_request("embeddings", body)
        self.assertEqual((out["model"], out["params"]), ("text-embedding-3-large", {}))

    def test_multipart_audio_request(self):
        """Multipart audio request."""
        audio = b"RIFF" + bytes(range(256)) * 40
        body = (
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nprivate words\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nfr\r\n"
            b"--XyZ--\r\n"
        )
        out = summarize_request("audio", body)
        self.assertEqual(out["model"], "whisper-1")
        self.assertEqual(out["params"], {"language": "fr"})
        self.assertEqual(multipart_fields(b"junk", {"model"}), {})

    def test_strip_media(self):
        """Strip media."""
        self.assertEqual(strip_media({"a": ["short", 1, None]}), {"a": ["short", 1, None]})
        self.assertTrue(strip_media("QUJD" * 400).startswith("… (base64, 1600 characters"))
        prose = "word " * 400
        self.assertEqual(strip_media(prose), prose)


class AssemblerTests(SynchronousTestCase):
    def test_ignores_junk_shapes(self):
        """Ignores junk shapes."""
        assembler = ChoiceAssembler("chat")
        for obj in ({"choices": "no"}, {"choices": [1, None]}, {"choices": [{"delta": "x"}]},
                    {"choices": [{"index": 0, "delta": {"content": 5}}]}):
            assembler.add(obj)
        self.assertEqual(assembler.result()[0]["content"], "5")
