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
        """POSTs to chat, completions, embeddings, audio and images paths (with /v1, without
        it, or Azure's deployments form) get their kind, so each exchange is recorded
        with the right reader."""
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
        """GETs, a stored completion's own path, models, files, moderations and a lookalike
        path get no kind: they are relayed but never recorded."""
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
        """A whole chat stream is recorded as format "sse", done, with the assistant's text
        joined and finish_reason "stop", and no problems."""
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
        """With n=2, interleaved deltas for two choices are assembled per index, each with
        its own finish_reason, and never mixed."""
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
        """Streamed tool calls are assembled per call index: id, type and name from the
        first delta, argument fragments joined in order even when two calls interleave."""
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
        """The legacy function_call delta is assembled into one name and its joined
        arguments."""
        events = [
            chunk([{"index": 0, "delta": {"role": "assistant", "function_call": {"name": "lookup", "arguments": ""}}}]),
            chunk([{"index": 0, "delta": {"function_call": {"arguments": '{"q":'}}}]),
            chunk([{"index": 0, "delta": {"function_call": {"arguments": ' 1}'}}, "finish_reason": "function_call"}]),
            DONE,
        ]
        [choice] = read("chat", events)["choices"]
        self.assertEqual(choice["function_call"], {"name": "lookup", "arguments": '{"q": 1}'})

    def test_usage_chunk_refusal_reasoning_and_audio(self):
        """Reasoning content, a refusal and an audio transcript are recorded, the audio data
        itself is not, and the final usage chunk gives the token counts."""
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
        """An error event in the middle of a stream is recorded with the text so far, and
        the record says the stream ended without [DONE] (not done)."""
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
        """A legacy completions stream is assembled from its text fields, with finish_reason
        and the model the upstream answered with."""
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
        """Events that are not JSON objects are skipped but counted as a problem with an
        excerpt; the surrounding text is still assembled."""
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
        """A stream cut inside an event keeps the text of whole events and records both
        problems: ended mid-event and without [DONE]."""
        whole = chunk([{"index": 0, "delta": {"content": "Hel"}}])
        result = read("chat", [whole, b'data: {"choices": [{"delta": {"content": "lo'])
        self.assertEqual(result["choices"][0]["content"], "Hel")
        self.assertEqual(
            result["problems"],
            ["stream ended in the middle of an event", "stream ended without [DONE]"],
        )

    def test_gzip_stream_split_anywhere(self):
        """A gzip-encoded stream split into 1-, 7- or 100-byte pieces is decoded and
        assembled the same, and the recorded size is the encoded size."""
        plain = b"".join(chat_chunks("a gzipped stream"))
        packed = gzip.compress(plain)
        for step in (1, 7, 100):
            pieces = [packed[i : i + step] for i in range(0, len(packed), step)]
            result = read("chat", pieces, encoding=b"gzip")
            self.assertEqual(result["choices"][0]["content"], "a gzipped stream")
            self.assertEqual(result["size"], len(packed))

    def test_text_limit(self):
        """Text past TEXT_LIMIT is cut there and the choice is marked truncated, so a huge
        answer cannot grow a record without bound."""
        self.patch(chatrecord, "TEXT_LIMIT", 10)
        events = [chunk([{"index": 0, "delta": {"content": "12345"}}])] * 3 + [DONE]
        [choice] = read("chat", events)["choices"]
        self.assertEqual(choice["content"], "1234512345")
        self.assertTrue(choice["truncated"])


class WholeAnswerTests(SynchronousTestCase):
    def test_json_chat_answer(self):
        """A non-streamed JSON chat answer, split across chunks, is recorded as format
        "json" with its message, usage and model."""
        body = json.dumps(chat_answer("Plain answer", "gpt-x")).encode()
        result = read("chat", [body[:10], body[10:]], ctype=b"application/json; charset=utf-8")
        self.assertEqual(result["format"], "json")
        self.assertEqual(result["choices"], [
            {"index": 0, "role": "assistant", "content": "Plain answer", "finish_reason": "stop"}
        ])
        self.assertEqual(result["usage"]["total_tokens"], 8)
        self.assertEqual(result["response_model"], "gpt-x")

    def test_json_answer_with_tool_calls_and_n(self):
        """A JSON answer with several choices is recorded in index order, whatever order
        they came in, with tool calls kept."""
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
        """A deflate-encoded answer is decoded both as zlib-wrapped and as raw deflate,
        since servers send either under that name."""
        body = json.dumps(chat_answer("deflated")).encode()
        for packed in (zlib.compress(body), zlib.compress(body)[2:-4]):  # zlib, raw
            result = read("chat", [packed], ctype=b"application/json", encoding=b"deflate")
            self.assertEqual(result["choices"][0]["content"], "deflated")

    def test_broken_gzip(self):
        """An answer labelled gzip that is not gzip is recorded with the problem and its
        size, without raising."""
        result = read("chat", [b"not gzip at all"], ctype=b"application/json", encoding=b"gzip")
        self.assertEqual(result["problems"], ["answer is not valid gzip data"])
        self.assertEqual(result["size"], 15)

    def test_unknown_encoding_noted(self):
        """An answer in an encoding the recorder does not decode (br) is recorded as
        "encoded" with a problem saying so, and no choices are guessed."""
        result = read("chat", [b"\x1b\x00brotli"], ctype=b"application/json", encoding=b"br")
        self.assertEqual(result["format"], "encoded")
        self.assertEqual(result["problems"], ["answer encoded as br: not decoded"])
        self.assertEqual(result["choices"], [])

    def test_broken_json_body(self):
        """A JSON answer that does not parse is recorded with "answer is not valid JSON" and
        an excerpt of the body."""
        result = read("chat", [b'{"choices": [{"message": '], ctype=b"application/json")
        self.assertEqual(result["problems"], ["answer is not valid JSON"])
        self.assertEqual(result["excerpt"], '{"choices": [{"message": ')

    def test_sniffed_without_content_type(self):
        """Without a usable content type the format is sniffed: a JSON answer (after
        whitespace) and an event stream are read as such, and HTML is recorded as "other"
        with an excerpt."""
        body = json.dumps(chat_answer("sniffed")).encode()
        self.assertEqual(read("chat", [b"  ", body], ctype=None)["choices"][0]["content"], "sniffed")
        stream = chat_chunks("sniffed stream")
        result = read("chat", stream, ctype=b"text/plain")
        self.assertEqual(result["format"], "sse")
        self.assertEqual(result["choices"][0]["content"], "sniffed stream")
        result = read("chat", [b"<html>bad gateway</html>"], ctype=b"text/html", status=502)
        self.assertEqual((result["format"], result["excerpt"]), ("other", "<html>bad gateway</html>"))

    def test_error_answer_keeps_error_without_key(self):
        """An upstream error answer is recorded with its code and message, but a key echoed
        in the message is masked to sk-***."""
        body = json.dumps({"error": {
            "message": "Incorrect API key provided: sk-proj-abcdefghijklmnop1234.",
            "type": "invalid_request_error", "code": "invalid_api_key"}}).encode()
        result = read("chat", [body], ctype=b"application/json", status=401)
        self.assertEqual(result["error"]["code"], "invalid_api_key")
        self.assertNotIn("abcdefghijklmnop", json.dumps(result))
        self.assertIn("sk-***", result["error"]["message"])

    def test_empty_answer(self):
        """An empty answer (a 500 with no body) is recorded with no choices and no problems,
        rather than failing."""
        result = read("chat", [], ctype=b"application/json", status=500)
        self.assertEqual((result["choices"], result["problems"]), ([], []))

    def test_too_large_answer(self):
        """An answer over BODY_LIMIT is not parsed whole but noted as too large to record,
        while usage is still found in its tail."""
        self.patch(chatrecord, "BODY_LIMIT", 100)
        body = json.dumps(chat_answer("x" * 200)).encode()
        result = read("chat", [body[:50], body[50:]], ctype=b"application/json")
        self.assertEqual(result["problems"], [f"answer of {len(body)} bytes too large to record"])
        self.assertEqual(result["usage"]["total_tokens"], 8)  # found in the tail

    def test_decompression_bounded(self):
        """A small gzip that inflates past BODY_LIMIT is noted as too large, not
        decompressed into memory: a gzip bomb cannot exhaust the recorder."""
        self.patch(chatrecord, "BODY_LIMIT", 1000)
        packed = gzip.compress(b"{" + b" " * 100_000 + b"}")
        result = read("chat", [packed], ctype=b"application/json", encoding=b"gzip")
        self.assertIn("decompressed answer too large to record", result["problems"])


class MetadataAnswerTests(SynchronousTestCase):
    def test_embeddings_usage_without_vectors(self):
        """An embeddings answer is recorded with its usage and vector count only: no vector
        values, and no choices."""
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
        """An embeddings answer larger than METADATA_LIMIT still has its usage recorded,
        read from the tail, with no problem noted."""
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
        """A speech answer (audio bytes) is recorded as binary with its size only: no
        excerpt of the audio."""
        result = read("audio", [b"ID3\x00" * 1000], ctype=b"audio/mpeg")
        self.assertEqual((result["format"], result["size"], result["usage"]), ("binary", 4000, None))
        self.assertNotIn("excerpt", result)

    def test_image_stream_usage_only(self):
        """An image-generation stream is recorded with its usage only, without the base64
        image data."""
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
        """A chat request is summarised with its model, stream flag, other parameters and
        messages, and an inline base64 image is replaced by a note of how many characters
        were left out."""
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
        """A completions request is summarised with its prompt and parameters, and no
        messages field."""
        out = summarize_request("completion", b'{"model": "m", "prompt": ["a", "b"], "max_tokens": 5}')
        self.assertEqual((out["prompt"], out["params"]), (["a", "b"], {"max_tokens": 5}))
        self.assertNotIn("messages", out)

    def test_request_not_json(self):
        """A request body that is not JSON, not an object, or empty is summarised with the
        matching problem and an excerpt instead of raising."""
        out = summarize_request("chat", b"model=gpt&messages=hi")
        self.assertEqual(out["problems"], ["request body is not JSON"])
        self.assertEqual(out["request_excerpt"], "model=gpt&messages=hi")
        self.assertEqual(summarize_request("chat", b"[1]")["problems"], ["request body is not a JSON object"])
        self.assertEqual(summarize_request("chat", b"")["problems"], ["request body is not JSON"])

    def test_embeddings_request_has_no_input(self):
        """An embeddings request is summarised with its parameters and how many inputs it
        had, never the input text; a token list counts as one input."""
        out = summarize_request("embeddings", json.dumps({
            "model": "e", "input": ["secret text one", "two"], "dimensions": 256}).encode())
        self.assertEqual(out["params"], {"dimensions": 256, "input_count": 2})
        self.assertNotIn("secret text", json.dumps(out))
        out = summarize_request("embeddings", b'{"model": "e", "input": [1, 2, 3]}')
        self.assertEqual(out["params"]["input_count"], 1)  # one tokenised input

    def test_large_embeddings_request_not_parsed(self):
        """An embeddings request over METADATA_LIMIT is not parsed: only its model is found,
        so a huge upload costs no JSON parse."""
        body = json.dumps({"input": ["text " * 100] * 3000, "model": "text-embedding-3-large"}).encode()
        self.assertGreater(len(body), chatrecord.METADATA_LIMIT)
        out = summarize_request("embeddings", body)
        self.assertEqual((out["model"], out["params"]), ("text-embedding-3-large", {}))

    def test_multipart_audio_request(self):
        """A multipart audio upload is summarised with its model and plain parameters, never
        the audio bytes nor the prompt text; junk yields no fields."""
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
        """strip_media keeps short values and prose as they are and replaces long base64
        runs with a note of their length."""
        self.assertEqual(strip_media({"a": ["short", 1, None]}), {"a": ["short", 1, None]})
        self.assertTrue(strip_media("QUJD" * 400).startswith("… (base64, 1600 characters"))
        prose = "word " * 400
        self.assertEqual(strip_media(prose), prose)


class AssemblerTests(SynchronousTestCase):
    def test_ignores_junk_shapes(self):
        """Chunks whose choices have the wrong shapes are skipped without raising, and a
        non-string content is kept as text."""
        assembler = ChoiceAssembler("chat")
        for obj in ({"choices": "no"}, {"choices": [1, None]}, {"choices": [{"delta": "x"}]},
                    {"choices": [{"index": 0, "delta": {"content": 5}}]}):
            assembler.add(obj)
        self.assertEqual(assembler.result()[0]["content"], "5")
