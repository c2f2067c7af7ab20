"""
The cache's request examination, canonical keys and credential partitions.
"""

from __future__ import annotations

import io
import json

from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.cache.key import Partitions, cache_key, examine, read_prefix
from twisted_forward.config import ForwardKey
from twisted_forward.keys import CLIENT_KEY, DEFAULT_KEY, KeyDecision


def body(**fields: object) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


class ExamineTests(SynchronousTestCase):
    """Which bodies are cacheable, and what goes upstream instead."""

    def test_opt_in_field_is_removed(self) -> None:
        """``caching: true`` makes the request cacheable and is taken out of
        the body sent upstream; the rest of the body is kept."""
        examined = examine(body(caching=True), False, False)
        self.assertTrue(examined.cacheable)
        assert examined.body is not None
        sent = json.loads(examined.body)
        self.assertNotIn("caching", sent)
        self.assertEqual(sent["messages"], [{"role": "user", "content": "hi"}])

    def test_opt_out_field_is_removed_too(self) -> None:
        """``caching: false`` is a bypass, and the field still never goes upstream."""
        examined = examine(body(caching=False), True, False)
        self.assertEqual(examined.reason, "not_requested")
        assert examined.body is not None
        self.assertNotIn("caching", json.loads(examined.body))

    def test_default_decides_without_field(self) -> None:
        """Without the field, DEFAULT_REQUEST_CACHING_VALUE decides, and the
        body goes upstream byte for byte."""
        self.assertEqual(examine(body(), False, False).reason, "not_requested")
        examined = examine(body(), True, False)
        self.assertTrue(examined.cacheable)
        self.assertIsNone(examined.body)

    def test_canonical_ignores_order_and_identity_fields(self) -> None:
        """Key order, ``user``, ``stream_options`` and ``caching`` do not
        change the canonical body; ``stream`` does."""
        a = examine(b'{"model":"m","messages":[],"caching":true,"user":"u1"}', False, False)
        b = examine(
            b'{"messages": [], "stream_options": {"include_usage": true},'
            b' "user": "u2", "model": "m", "caching": true}',
            False, False,
        )
        c = examine(b'{"model":"m","messages":[],"caching":true,"stream":true}', False, False)
        self.assertEqual(a.canonical, b.canonical)
        self.assertNotEqual(a.canonical, c.canonical)
        self.assertTrue(c.stream)

    def test_nondeterministic_requests_bypass(self) -> None:
        """n > 1, temperature > 0 without a seed and tools bypass, unless the
        operator opted in; temperature 0, a seed, or no temperature are fine."""
        self.assertEqual(examine(body(caching=True, n=2), False, False).reason, "sampled")
        self.assertEqual(
            examine(body(caching=True, temperature=0.7), False, False).reason, "sampled"
        )
        self.assertTrue(examine(body(caching=True, temperature=0.7, seed=1), False, False).cacheable)
        self.assertTrue(examine(body(caching=True, temperature=0), False, False).cacheable)
        self.assertTrue(examine(body(caching=True), False, False).cacheable)
        self.assertEqual(
            examine(body(caching=True, tools=[{"type": "function"}]), False, False).reason, "tools"
        )
        self.assertTrue(examine(body(caching=True, n=3, tools=[{}]), False, True).cacheable)

    def test_not_json_and_too_large(self) -> None:
        """Bodies that are not a JSON object, or over the bound, bypass."""
        self.assertEqual(examine(b"--boundary\r\n", True, False).reason, "not_json")
        self.assertEqual(examine(b"[1, 2]", True, False).reason, "not_json")
        self.assertEqual(examine(b'{"a": NaN}', True, False).reason, "not_json")
        self.assertEqual(examine(None, True, False).reason, "too_large")

    def test_read_prefix_is_bounded(self) -> None:
        """Only ``limit + 1`` bytes are read, and the file is rewound."""

        class Counting(io.BytesIO):
            largest = 0

            def read(self, size: int = -1) -> bytes:  # type: ignore[override]  # BytesIO's size is Optional
                self.largest = max(self.largest, size)
                return super().read(size)

        content = Counting(b"x" * 5000)
        self.assertIsNone(read_prefix(content, 100))
        self.assertEqual(content.largest, 101)
        self.assertEqual(content.tell(), 0)
        self.assertEqual(read_prefix(io.BytesIO(b"{}"), 100), b"{}")
        self.assertEqual(read_prefix(None, 100), b"")


class PartitionTests(SynchronousTestCase):
    """Tenants never share a partition unless the operator says so."""

    keys = (ForwardKey("team-a", "fk-aaaaaaaaaaaa"), ForwardKey("team-b", "fk-bbbbbbbbbbbb"))

    def test_forward_keys_are_apart(self) -> None:
        """Two forward keys get two partitions, neither holding the key."""
        parts = Partitions(self.keys, shared=False)
        a = parts.of(KeyDecision("team-a", substituted=True))
        b = parts.of(KeyDecision("team-b", substituted=True))
        self.assertNotEqual(a, b)
        self.assertNotIn("aaaa", a)

    def test_partition_follows_the_key_not_its_position(self) -> None:
        """Reordering the forward keys (their default labels are positions)
        does not hand one key's partition to another."""
        first = Partitions((ForwardKey("fk#1", "fk-aaaa1111"), ForwardKey("fk#2", "fk-bbbb2222")), False)
        swapped = Partitions((ForwardKey("fk#1", "fk-bbbb2222"), ForwardKey("fk#2", "fk-aaaa1111")), False)
        decision = KeyDecision("fk#1", substituted=True)
        self.assertNotEqual(first.of(decision), swapped.of(decision))
        self.assertEqual(first.of(decision), swapped.of(KeyDecision("fk#2", substituted=True)))

    def test_client_keys_are_apart(self) -> None:
        """Two clients' own keys get two partitions; the key is not in it."""
        parts = Partitions((), shared=False)
        one = parts.of(KeyDecision(CLIENT_KEY, send=((b"authorization", b"sk-one-1234567890"),)))
        two = parts.of(KeyDecision(CLIENT_KEY, send=((b"authorization", b"sk-two-1234567890"),)))
        self.assertNotEqual(one, two)
        self.assertNotIn("1234567890", one)

    def test_shared_is_one_partition(self) -> None:
        """CACHE_SHARED puts everyone in one partition."""
        parts = Partitions(self.keys, shared=True)
        self.assertEqual(
            parts.of(KeyDecision("team-a", substituted=True)),
            parts.of(KeyDecision(CLIENT_KEY, send=((b"authorization", b"sk-x"),))),
        )
        self.assertEqual(parts.of(KeyDecision(DEFAULT_KEY, substituted=True)), "shared")

    def test_key_depends_on_every_part(self) -> None:
        """Partition, route, target and body each change the key."""
        base = cache_key("p", "/|u", b"/v1/chat/completions", b"{}")
        self.assertEqual(base, cache_key("p", "/|u", b"/v1/chat/completions", b"{}"))
        for other in (
            cache_key("q", "/|u", b"/v1/chat/completions", b"{}"),
            cache_key("p", "/x|u", b"/v1/chat/completions", b"{}"),
            cache_key("p", "/|u", b"/v1/completions", b"{}"),
            cache_key("p", "/|u", b"/v1/chat/completions", b"{ }"),
        ):
            self.assertNotEqual(base, other)
