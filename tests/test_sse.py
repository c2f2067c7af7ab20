"""
The SSE decoder: the event-stream format rules, chunk boundaries anywhere,
and (with hypothesis) random streams split at random places.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.chat.record import ChoiceAssembler
from twisted_forward.chat.sse import Event, SSEDecoder

from .fake_upstream import chat_chunks


def decode(*chunks: bytes, decoder: SSEDecoder | None = None) -> list[Event]:
    decoder = decoder or SSEDecoder()
    events: list[Event] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (sorted, deduplicated)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


class FormatTests(SynchronousTestCase):
    """The rules of the event-stream format, one by one."""

    def test_one_event(self):
        """A data line ended by a blank line decodes to one event whose data is the line's
        value, type "message": the basic unit every chat stream is made of."""
        self.assertEqual(decode(b'data: {"a": 1}\n\n'), [Event('{"a": 1}')])

    def test_several_events_in_one_chunk(self):
        """Three events arriving in one network chunk decode to three events in order, none
        merged or dropped."""
        events = decode(b"data: one\n\ndata: two\n\ndata: three\n\n")
        self.assertEqual([e.data for e in events], ["one", "two", "three"])

    def test_event_split_at_every_offset(self):
        """A stream cut at every possible byte offset (inside CRLF, inside a field name,
        between events) decodes to the same events as when whole: TCP may split a stream
        anywhere."""
        stream = b"event: x\r\nid: 7\r\ndata: first\r\ndata: second\r\n\r\ndata: b\n\n"
        expected = [Event("first\nsecond", "x", "7"), Event("b", "message", "7")]
        for cut in range(1, len(stream)):
            with self.subTest(cut=cut):
                self.assertEqual(decode(stream[:cut], stream[cut:]), expected)

    def test_one_byte_at_a_time(self):
        """A real chat stream fed one byte per call decodes exactly as fed whole, so a slow
        upstream trickling bytes is recorded the same."""
        stream = b"".join(chat_chunks("one two three"))
        chunks = [stream[i : i + 1] for i in range(len(stream))]
        self.assertEqual(decode(*chunks), decode(stream))
        self.assertEqual(len(decode(stream)), 5)

    def test_line_endings(self):
        """LF, CRLF and lone CR each end a line, as the event-stream format allows;
        multi-line data is joined with LF."""
        for end in (b"\n", b"\r\n", b"\r"):
            with self.subTest(end=end):
                stream = b"data: a" + end + b"data: b" + end + end + b"data: c" + end + end
                self.assertEqual([e.data for e in decode(stream)], ["a\nb", "c"])

    def test_cr_then_lf_in_next_chunk_is_one_line_end(self):
        """A \\r ending one chunk and a \\n starting the next must not be
        read as an empty line (which would dispatch the event early)."""
        events = decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n")
        self.assertEqual([e.data for e in events], ["a\nb"])

    def test_lone_cr_ends_a_line(self):
        """A CR at the end of one chunk ends its line at once (an LF in the next chunk is
        not waited for) and a second CR dispatches the event."""
        decoder = SSEDecoder()
        self.assertEqual(decode(b"data: a\r", decoder=decoder), [])
        self.assertEqual([e.data for e in decode(b"\r", decoder=decoder)], ["a"])

    def test_comments_ignored(self):
        """Lines starting with a colon (keep-alive pings) are counted as comments and never
        become events or data."""
        decoder = SSEDecoder()
        events = decode(b": keep-alive\n\n: ping\ndata: x\n: mid\n\n", decoder=decoder)
        self.assertEqual([e.data for e in events], ["x"])
        self.assertEqual(decoder.comments, 3)

    def test_space_after_colon(self):
        """Only the one space after the colon is dropped: a second one is data, and a field
        without a colon has empty data."""
        events = decode(b"data:x\n\ndata:  two spaces\n\ndata\n\n")
        self.assertEqual([e.data for e in events], ["x", " two spaces", ""])

    def test_empty_data_line_is_an_event(self):
        """A bare "data:" line followed by a blank line is an event with empty data, not
        nothing."""
        self.assertEqual(decode(b"data:\n\n"), [Event("")])

    def test_event_without_data_not_dispatched(self):
        """An event block with no data line (only event: or id:) is not dispatched, though
        its id carries over to the next event."""
        self.assertEqual(decode(b"event: ping\n\nid: 3\n\ndata: y\n\n"), [Event("y", "message", "3")])

    def test_field_names_are_case_sensitive(self):
        """"Data:" and "DATA:" are unknown fields and ignored; only lowercase "data:"
        carries the event's data."""
        self.assertEqual(decode(b"Data: no\nDATA: no\ndata: yes\n\n"), [Event("yes")])

    def test_retry_and_id(self):
        """A numeric retry: field sets the reconnection delay and a non-numeric one is
        ignored; an id containing NUL is ignored, as the format requires."""
        decoder = SSEDecoder()
        decode(b"retry: 1500\nretry: soon\nid: a\0b\ndata: x\n\n", decoder=decoder)
        self.assertEqual(decoder.retry, 1500)
        self.assertEqual(decode(b"id: a\0b\ndata: x\n\n"), [Event("x", "message", None)])

    def test_done_stops_decoding(self):
        """After "data: [DONE]" nothing more is decoded; the bytes after it are counted as
        after_done, and close() reports no unfinished event."""
        decoder = SSEDecoder()
        events = decode(b"data: 1\n\ndata: [DONE]\n\ndata: 2\n\n", b"data: 3\n\n", decoder=decoder)
        self.assertEqual([e.data for e in events], ["1"])
        self.assertTrue(decoder.done)
        self.assertEqual(decoder.after_done, len(b"data: 2\n\ndata: 3\n\n"))
        self.assertFalse(decoder.close())

    def test_done_split_across_chunks(self):
        """"[DONE]" and its line end split over three chunks still mark the stream done."""
        decoder = SSEDecoder()
        decode(b"data: [DO", b"NE]\r", b"\n\r\n", decoder=decoder)
        self.assertTrue(decoder.done)

    def test_unfinished_event_at_close(self):
        """close() reports an unfinished event (data without its blank line) and reports
        none after a whole one: how a cut stream is told from a complete one."""
        decoder = SSEDecoder()
        self.assertEqual(decode(b"data: whole\n\ndata: half", decoder=decoder), [Event("whole")])
        self.assertTrue(decoder.close())
        decoder = SSEDecoder()
        decode(b"data: no blank line\n", decoder=decoder)
        self.assertTrue(decoder.close())
        decoder = SSEDecoder()
        decode(b"data: done\n\n", decoder=decoder)
        self.assertFalse(decoder.close())

    def test_utf8_split_inside_a_character(self):
        """UTF-8 split inside a character."""
        text = "héllo → 世界 🎉"
        stream = b"data: " + text.encode() + b"\n\n"
        for cut in range(6, len(stream) - 2):
            with self.subTest(cut=cut):
                self.assertEqual(decode(stream[:cut], stream[cut:]), [Event(text)])

    def test_invalid_utf8_replaced(self):
        """Invalid UTF-8 replaced."""
        self.assertEqual(decode(b"data: a\xffb\n\n"), [Event("a\ufffdb")])

    def test_bom_dropped_at_start_only(self):
        """A UTF-8 BOM is dropped at the stream's start, even split across chunks; later, or
        inside data, it is an ordinary character."""
        bom = b"\xef\xbb\xbf"
        self.assertEqual(decode(bom[:2], bom[2:] + b"data: x\n\n"), [Event("x")])
        # Later, a BOM is just a character: here it spoils a field name.
        self.assertEqual(decode(b"data: x\n\n" + bom + b"data: y\n\n"), [Event("x")])
        decoder = SSEDecoder()
        decode(bom, decoder=decoder)
        self.assertFalse(decoder.close())
        self.assertEqual(decode(b"data: " + bom + b"\n\n"), [Event("\ufeff")])

    def test_endless_line_stops_decoding_without_raising(self):
        """A line longer than max_event_bytes with no newline sets overflow and stops
        decoding without raising, so an endless line cannot grow memory."""
        decoder = SSEDecoder(max_event_bytes=1000)
        for _ in range(10):
            self.assertEqual(decoder.feed(b"x" * 200), [])
        self.assertTrue(decoder.overflow)
        self.assertEqual(decoder.feed(b"\n\ndata: later\n\n"), [])

    def test_endless_event_stops_decoding(self):
        """Many data lines that never end their event past max_event_bytes set overflow: an
        event is bounded as well as a line."""
        decoder = SSEDecoder(max_event_bytes=1000)
        decode(*[b"data: " + b"y" * 100 + b"\n"] * 20, decoder=decoder)
        self.assertTrue(decoder.overflow)

    def test_long_line_in_many_pieces_is_kept_whole(self):
        """A 50 kB data line fed in 7-byte pieces is one event with the whole line: pieces
        are joined, not truncated."""
        payload = "z" * 50_000
        stream = b"data: " + payload.encode() + b"\n\n"
        chunks = [stream[i : i + 7] for i in range(0, len(stream), 7)]
        self.assertEqual(decode(*chunks), [Event(payload)])


# ---------------------------------------------------------------- properties

_LINE_ENDS = st.sampled_from([b"\n", b"\r\n", b"\r"])
_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
    max_size=30,
)


@st.composite
def streams(draw):
    """A random event stream and the events it must decode to."""
    parts: list[bytes] = []
    expected: list[Event] = []
    last_id = None
    if draw(st.booleans()):
        parts.append(b"\xef\xbb\xbf")
    for _ in range(draw(st.integers(0, 8))):
        end = draw(_LINE_ENDS)
        if draw(st.integers(0, 4)) == 0:
            parts.append(b":" + draw(_TEXT).encode() + end)
        lines = draw(st.lists(_TEXT, min_size=1, max_size=3))
        event_type = draw(st.sampled_from([None, "message", "delta"]))
        if event_type is not None:
            parts.append(b"event: " + event_type.encode() + end)
        if draw(st.booleans()):
            last_id = draw(st.text(alphabet="abc123", max_size=4))
            parts.append(b"id: " + last_id.encode() + end)
        for line in lines:
            space = b" " if line.startswith(" ") or draw(st.booleans()) else b""
            parts.append(b"data:" + space + line.encode() + end)
        parts.append(end)
        data = "\n".join(lines)
        if data == "[DONE]":
            return b"".join(parts), expected
        expected.append(Event(data, event_type or "message", last_id))
    return b"".join(parts), expected


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(streams(), st.lists(st.integers(0, 2000), max_size=30))
    def test_random_streams_random_splits(self, stream_and_events, cuts):
        """For generated streams split at generated offsets, decoding gives the events the
        stream was built from and ends with nothing unfinished."""
        stream, expected = stream_and_events
        decoder = SSEDecoder()
        self.assertEqual(decode(*split_at(stream, cuts), decoder=decoder), expected)
        self.assertFalse(decoder.close())

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.text(max_size=12), min_size=1, max_size=20),
        _LINE_ENDS,
        st.lists(st.integers(0, 5000), max_size=40),
    )
    def test_real_shaped_chat_stream_reassembles(self, words, end, cuts):
        """An OpenAI-shaped stream, with any line ending, split anywhere,
        gives back exactly the text that was streamed."""
        events = []
        for i, word in enumerate(words):
            delta = {"content": word}
            if i == 0 and len(words) > 1:
                delta["role"] = "assistant"
            events.append(
                {"id": "c", "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            )
        events.append({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        stream = b"".join(
            b"data: " + json.dumps(e, ensure_ascii=False).encode() + end + end for e in events
        ) + b"data: [DONE]" + end + end
        decoder = SSEDecoder()
        assembler = ChoiceAssembler("chat")
        for chunk in split_at(stream, cuts):
            for event in decoder.feed(chunk):
                assembler.add(json.loads(event.data))
        self.assertTrue(decoder.done)
        [choice] = assembler.result()
        self.assertEqual(choice["content"], "".join(words))
        self.assertEqual(choice["role"], "assistant")
        self.assertEqual(choice["finish_reason"], "stop")
