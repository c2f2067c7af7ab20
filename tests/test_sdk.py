"""
End-to-end with the official ``openai`` Python package as the client.

The SDK is blocking (or runs its own asyncio loop), so each call runs in a
reactor thread (``deferToThread``) while the reactor serves the real plugin
and the fake upstream.  ``max_retries=0`` keeps the outcomes deterministic.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
from typing import Any, Callable

import openai
from twisted.internet import defer, reactor
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.web.server import NOT_DONE_YET, Request

from .harness import ProxyTestCase

_MESSAGES = [{"role": "user", "content": "Say hello"}]
_VECTOR = [0.25, -0.5, 1.0]  # exact in float32


class SDKTestCase(ProxyTestCase):
    """Runs SDK code in a thread against the started proxy."""

    def sdk(self, api_key: str = "sk-client-own", **kwargs: Any) -> openai.OpenAI:
        """A sync client for the proxy; use it in a ``with`` so it closes."""
        kwargs.setdefault("timeout", 10)
        return openai.OpenAI(
            base_url=self.base + "/v1",
            api_key=api_key,
            max_retries=0,
            http_client=openai.DefaultHttpxClient(trust_env=False),
            **kwargs,
        )

    def in_thread(self, call: Callable[[openai.OpenAI], Any], **kwargs: Any) -> defer.Deferred:
        """Run ``call(client)`` in a thread with a fresh, then closed, client."""

        def run() -> Any:
            with self.sdk(**kwargs) as client:
                return call(client)

        return deferToThread(run)

    def from_thread(self, f: Callable[..., Any], *args: Any) -> Any:
        """Run ``f`` in the reactor thread and wait for it (from SDK code)."""
        return blockingCallFromThread(reactor, f, *args)

    def stall_upstream(self) -> None:
        """Make the fake upstream take every request and never answer."""
        self.fake.override = lambda request: NOT_DONE_YET


class SDKTests(SDKTestCase):
    @defer.inlineCallbacks
    def test_chat_with_forward_key(self):
        """The official openai SDK, given a forward key, gets the upstream's chat answer and
        usage through the proxy, while the upstream sees the real default key and the
        SDK's messages."""
        yield self.start_proxy(FORWARD_KEY="fk-sdk-key-1", OPENAI_API_KEY="sk-real-default")
        completion = yield self.in_thread(
            lambda c: c.chat.completions.create(model="gpt-4o-mini", messages=_MESSAGES),
            api_key="fk-sdk-key-1",
        )
        self.assertEqual(completion.choices[0].message.content, self.fake.answer_text)
        self.assertEqual(completion.usage.total_tokens, 8)
        [seen] = self.fake.seen
        self.assertEqual(seen.header(b"authorization"), b"Bearer sk-real-default")
        self.assertEqual(json.loads(seen.body)["messages"], _MESSAGES)

    @defer.inlineCallbacks
    def test_streaming(self):
        """The SDK gets the first chunks while the upstream holds the rest."""
        yield self.start_proxy()
        self.fake.hold_at = 2

        def call(client: openai.OpenAI) -> tuple[list, bool]:
            stream = client.chat.completions.create(model="m", messages=_MESSAGES, stream=True)
            chunks = [next(stream), next(stream)]
            held = not self.from_thread(lambda: self.fake.release.called)
            self.from_thread(self.fake.release.callback, None)
            chunks.extend(stream)
            return chunks, held

        chunks, held = yield self.in_thread(call)
        self.assertTrue(held)
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        self.assertEqual(
            "".join(c.choices[0].delta.content or "" for c in chunks), self.fake.answer_text
        )
        self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")

    @defer.inlineCallbacks
    def test_async_streaming(self):
        """The async SDK receives a streamed chat chunk by chunk while the upstream is still
        holding the rest (nothing is buffered), then the whole answer."""
        yield self.start_proxy()
        self.fake.hold_at = 2

        async def main() -> tuple[list, bool]:
            async with openai.AsyncOpenAI(
                base_url=self.base + "/v1",
                api_key="sk-client-own",
                max_retries=0,
                timeout=10,
                http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
            ) as client:
                stream = await client.chat.completions.create(
                    model="m", messages=_MESSAGES, stream=True
                )
                chunks = [await stream.__anext__(), await stream.__anext__()]
                held = not self.from_thread(lambda: self.fake.release.called)
                self.from_thread(self.fake.release.callback, None)
                chunks.extend([c async for c in stream])
                return chunks, held

        chunks, held = yield deferToThread(lambda: asyncio.run(main()))
        self.assertTrue(held)
        self.assertEqual(
            "".join(c.choices[0].delta.content or "" for c in chunks), self.fake.answer_text
        )

    @defer.inlineCallbacks
    def test_embeddings(self):
        """The SDK asks for base64 vectors by default and decodes them."""
        yield self.start_proxy()

        def embeddings(request: Request) -> bytes:
            body = json.loads(self.fake.seen[-1].body)
            packed = struct.pack("<3f", *_VECTOR)
            vector = (
                base64.b64encode(packed).decode()
                if body.get("encoding_format") == "base64"
                else _VECTOR
            )
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(
                {
                    "object": "list",
                    "model": body["model"],
                    "data": [
                        {"object": "embedding", "index": i, "embedding": vector}
                        for i, _ in enumerate(body["input"])
                    ],
                    "usage": {"prompt_tokens": 4, "total_tokens": 4},
                }
            ).encode()

        self.fake.override = embeddings
        result = yield self.in_thread(
            lambda c: c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        )
        self.assertEqual([d.embedding for d in result.data], [_VECTOR, _VECTOR])
        self.assertEqual(result.usage.total_tokens, 4)
        [seen] = self.fake.seen
        self.assertEqual(seen.uri, b"/v1/embeddings")
        self.assertEqual(json.loads(seen.body)["encoding_format"], "base64")

    @defer.inlineCallbacks
    def test_models_list(self):
        """The SDK's models.list() works through the proxy and returns the upstream's
        models."""
        yield self.start_proxy()
        models = yield self.in_thread(lambda c: [m.id for m in c.models.list()])
        self.assertEqual(models, ["gpt-4o-mini"])

    @defer.inlineCallbacks
    def test_file_upload(self):
        """The SDK's multipart body reaches the upstream byte for byte."""
        yield self.start_proxy()
        payload = b'{"messages": []}\n' * 5000
        uploaded = yield self.in_thread(
            lambda c: c.files.create(file=("train.jsonl", payload), purpose="fine-tune")
        )
        self.assertTrue(uploaded.content_type.startswith("multipart/form-data; boundary="))
        body = base64.b64decode(uploaded.body_b64)
        self.assertIn(b'filename="train.jsonl"', body)
        self.assertIn(payload, body)
        self.assertIn(b'name="purpose"\r\n\r\nfine-tune', body)
        self.assertEqual(self.fake.seen[0].body, body)


class SDKErrorTests(SDKTestCase):
    """The proxy's own errors and relayed ones raise the SDK's typed errors."""

    @defer.inlineCallbacks
    def test_unknown_forward_key_is_authentication_error(self):
        """An unknown forward key makes the SDK raise AuthenticationError with status 401
        and code invalid_api_key, with no default key in the message and nothing sent
        upstream."""
        yield self.start_proxy(FORWARD_KEY="fk-sdk-key-1", OPENAI_API_KEY="sk-real-default")
        error = yield self.assertFailure(
            self.in_thread(lambda c: c.models.list(), api_key="fk-not-a-known-key"),
            openai.AuthenticationError,
        )
        self.assertEqual(error.status_code, 401)
        self.assertEqual(error.code, "invalid_api_key")
        self.assertNotIn("sk-real-default", str(error))
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_refused_ip_is_permission_denied(self):
        """A refused client address makes the SDK raise PermissionDeniedError with status
        403 and code ip_not_allowed."""
        yield self.start_proxy(IP_BLACKLIST="127.0.0.1")
        error = yield self.assertFailure(
            self.in_thread(lambda c: c.models.list()), openai.PermissionDeniedError
        )
        self.assertEqual(error.status_code, 403)
        self.assertEqual(error.code, "ip_not_allowed")
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_upstream_500_is_internal_server_error(self):
        """An upstream 500 reaches the SDK as InternalServerError carrying the upstream's
        own message."""
        yield self.start_proxy()

        def fail(request: Request) -> bytes:
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(
                {"error": {"message": "The server had an error", "type": "server_error",
                           "param": None, "code": None}}
            ).encode()

        self.fake.override = fail
        error = yield self.assertFailure(
            self.in_thread(lambda c: c.chat.completions.create(model="m", messages=_MESSAGES)),
            openai.InternalServerError,
        )
        self.assertEqual(error.status_code, 500)
        self.assertIn("The server had an error", error.message)

    @defer.inlineCallbacks
    def test_slow_upstream_is_a_504(self):
        """READ_TIMEOUT passes: the proxy answers 504 in OpenAI's shape."""
        yield self.start_proxy(READ_TIMEOUT="0.2")
        self.stall_upstream()
        error = yield self.assertFailure(
            self.in_thread(lambda c: c.chat.completions.create(model="m", messages=_MESSAGES)),
            openai.InternalServerError,
        )
        self.assertEqual(error.status_code, 504)
        self.assertEqual(error.code, "upstream_timeout")

    @defer.inlineCallbacks
    def test_unreachable_upstream_is_a_502(self):
        """An unreachable upstream makes the SDK raise InternalServerError with status 502
        and code upstream_unreachable, not a connection error."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        yield self.start_proxy(OPENAI_BASE_URL=f"http://127.0.0.1:{closed_port}")
        error = yield self.assertFailure(
            self.in_thread(lambda c: c.models.list()), openai.InternalServerError
        )
        self.assertEqual(error.status_code, 502)
        self.assertEqual(error.code, "upstream_unreachable")

    @defer.inlineCallbacks
    def test_client_timeout_is_api_timeout_error(self):
        """The SDK's own timeout gives APITimeoutError; the proxy lets the
        upstream request go and keeps serving."""
        yield self.start_proxy()
        self.stall_upstream()
        arrived = self.fake.arrived
        yield self.assertFailure(
            self.in_thread(
                lambda c: c.chat.completions.create(model="m", messages=_MESSAGES), timeout=1.0
            ),
            openai.APITimeoutError,
        )
        yield arrived
        # The stalled upstream request is given up once the SDK hangs up.
        yield self.fake_tracker.closed()
        self.fake.override = None
        models = yield self.in_thread(lambda c: [m.id for m in c.models.list()])
        self.assertEqual(models, ["gpt-4o-mini"])
