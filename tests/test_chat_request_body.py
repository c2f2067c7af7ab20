"""
The chat recorder reads no more of a request body than its record needs:
small bodies whole, large ones only their first and last bytes; what a
record says of a body too large to parse.
"""

from __future__ import annotations

import io
import json
import tracemalloc
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from twisted_forward.chat.record import PEEK, REQUEST_LIMIT, strip_media
from twisted_forward.chat.recorder import ChatRecorder, ExchangeInfo, RequestBody

MiB = 1024 * 1024


class CountingFile(io.RawIOBase):
    """A large file made up on the fly that counts the bytes read from it."""

    def __init__(self, prefix: bytes, size: int, suffix: bytes = b"") -> None:
        self.prefix, self.size, self.suffix = prefix, size, suffix
        self.pos = 0
        self.read_bytes = 0

    def _byte_range(self, start: int, end: int) -> bytes:
        out = bytearray()
        for i in range(start, end):
            if i < len(self.prefix):
                out.append(self.prefix[i])
            elif i >= self.size - len(self.suffix):
                out.append(self.suffix[i - (self.size - len(self.suffix))])
            else:
                out.append(ord("a"))
        return bytes(out)

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        data = self._byte_range(self.pos, end) if end - self.pos < 4 * MiB else (
            b"a" * (end - self.pos))
        self.read_bytes += len(data)
        self.pos = end
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos


@implementer(ILogObserver)
class Records:
    """The chat records emitted (a log observer on the recorder's publisher)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def __call__(self, event: dict) -> None:
        if "chat_record" in event:
            self.records.append(event["chat_record"])


class BoundedBodyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.records = Records()
        self.recorder = ChatRecorder(MemoryReactorClock(), [self.records])

    def record_of(self, path: str, content: Any) -> dict[str, Any]:
        tap = self.recorder.begin(ExchangeInfo(
            request_id="r", route="/", method="POST", path=path, client="c",
            key_label="-", started=0.0, body=RequestBody(content)))
        tap.end("complete")
        return self.records.records[-1]

    def test_large_chat_body_read_only_at_its_ends(self):
        """A 300 MiB chat body: at most two peeks are read, the model and
        stream flag still recorded, with a note why there are no messages."""
        size = 300 * MiB
        content = CountingFile(b'{"model": "gpt-4o", "stream": true, "messages": [{"content": "',
                               size, b'"}]}')
        rec = self.record_of("/v1/chat/completions", content)
        self.assertLessEqual(content.read_bytes, 2 * PEEK)
        self.assertEqual((rec["model"], rec["stream"]), ("gpt-4o", True))
        self.assertNotIn("messages", rec)
        self.assertIn(f"request body of {size} bytes too large to record (over {REQUEST_LIMIT})",
                      rec["problems"])
        self.assertEqual(content.tell(), 0)  # left where it was: the exchange sends it next

    def test_chat_body_under_the_limit_recorded_whole(self):
        """A 3 MiB chat body (an inline image, say) is read and recorded."""
        image = "data:image/png;base64," + "A" * (3 * MiB)
        body = json.dumps({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}]})
        content = io.BytesIO(body.encode())
        rec = self.record_of("/v1/chat/completions", content)
        url = rec["messages"][0]["content"][0]["image_url"]["url"]
        self.assertTrue(url.startswith("data:image/png;base64,…"), url[:60])

    def test_large_image_chat_recorded_without_holding_the_image(self):
        """A 20 MiB chat request that is mostly an inline image: read in
        pieces, the image left out, the messages recorded as strip_media
        would give them."""
        image = "data:image/jpeg;base64," + "B" * (20 * MiB)
        audio = "QUJD" * 4000
        messages = [
            {"role": "system", "content": 'Say "hi" \\ é'},
            {"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
            ]},
        ]
        body = json.dumps({"model": "gpt-4o", "messages": messages}).encode()
        content = io.BytesIO(body)
        tracemalloc.start()
        try:
            rec = self.record_of("/v1/chat/completions", content)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 2 * MiB)  # pieces of 256 KiB, never the image
        self.assertEqual(rec["model"], "gpt-4o")
        self.assertEqual(rec["messages"], strip_media(messages))
        self.assertEqual(rec["problems"], [])
        parts = rec["messages"][1]["content"]
        self.assertEqual(parts[1]["image_url"]["url"],
                         f"data:image/jpeg;base64,… ({len(image)} characters omitted)")
        self.assertEqual(content.tell(), 0)

    def test_large_chat_of_plain_text_not_kept(self):
        """A 10 MiB chat request of plain text cannot be shrunk: recorded
        from its ends, with the note."""
        text = "word " * (2 * MiB)
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})
        rec = self.record_of("/v1/chat/completions", io.BytesIO(body.encode()))
        self.assertNotIn("messages", rec)
        self.assertEqual(rec["model"], "m")
        self.assertTrue(rec["problems"][0].startswith("request body of"))

    def test_raw_audio_upload_read_only_at_its_ends(self):
        """A 100 MiB raw audio body: two peeks read, nothing more."""
        content = CountingFile(b"RIFF", 100 * MiB)
        rec = self.record_of("/v1/audio/transcriptions", content)
        self.assertLessEqual(content.read_bytes, 2 * PEEK)
        self.assertEqual(rec["kind"], "audio")
        self.assertIsNone(rec["model"])

    def test_multipart_fields_after_the_file_found_in_the_tail(self):
        """A multipart upload with its model after a large file part: the
        field is taken from the last bytes."""
        boundary = b"--xyzzy"
        head = (boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.wav"'
                b"\r\nContent-Type: audio/wav\r\n\r\nRIFF")
        tail = (b"\r\n" + boundary + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
                b"whisper-1\r\n" + boundary + b'\r\nContent-Disposition: form-data; '
                b'name="language"\r\n\r\nde\r\n' + boundary + b"--\r\n")
        content = CountingFile(head, 50 * MiB, tail)
        rec = self.record_of("/v1/audio/transcriptions", content)
        self.assertLessEqual(content.read_bytes, 2 * PEEK)
        self.assertEqual((rec["model"], rec["params"]), ("whisper-1", {"language": "de"}))
