"""
Policy configuration: the rate syntax, KEY_POLICY and its file, the 0.8.1
names and their one-line errors; the price table; the body scanner; usage
reading and the streamed-usage stripper.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.config import ConfigError, load_config
from twisted_forward.keys import DefaultKeys
from twisted_forward.policies.body import facts_of, read_facts, top_level, with_usage_requested
from twisted_forward.policies.prices import Price, PriceTable, builtin_prices, parse_price
from twisted_forward.policies.rules import KeyPolicy, Rate, parse_rates
from twisted_forward.policies.usage import Usage, UsageStripper, UsageTap, usage_of

from .fake_upstream import chat_chunks

BASE = {"OPENAI_API_KEY": "sk-default-0123456789", "FORWARD_KEY": "alice:fk-alice-0123456789"}


def config(**env: str):
    return load_config({}, {**BASE, **env})


class RateSyntaxTests(SynchronousTestCase):
    """The limits library's rate strings."""

    def test_forms(self):
        """Plain, multiples, plurals, 'per', several separated by ';'."""
        self.assertEqual(parse_rates("5/minute"), (Rate(5, 60.0),))
        self.assertEqual(parse_rates("100/2minutes"), (Rate(100, 120.0),))
        self.assertEqual(parse_rates("10 per hour"), (Rate(10, 3600.0),))
        self.assertEqual(
            parse_rates("1/second; 100/day"), (Rate(1, 1.0), Rate(100, 86400.0))
        )
        self.assertEqual(parse_rates("inf"), ())

    def test_bad(self):
        """Garbage, zero and unknown units are refused, naming the part."""
        for text in ("5/fortnight", "five/minute", "0/minute", "5"):
            e = self.assertRaises(ValueError, parse_rates, text)
            self.assertIn("5" if "5" in text else text.split("/")[0], str(e))


class KeyPolicyConfigTests(SynchronousTestCase):
    """KEY_POLICY from the environment or a file; errors name the field."""

    def test_parsed(self):
        """Every field, for a label and '*'."""
        c = config(KEY_POLICY=json.dumps({
            "alice": {"models": ["gpt-4o*"], "rpm": 60, "tpm": 1000, "max_parallel": 2,
                      "tokens_per_day": 5, "tokens_per_month": 6, "usd_per_day": 1,
                      "usd_per_month": 2.5},
            "*": {"rpm": 1},
        }))
        alice = c.policy.policies.keys["alice"]
        self.assertEqual(alice.models, ("gpt-4o*",))
        self.assertEqual((alice.rpm, alice.usd_per_month), (60, 2.5))
        self.assertTrue(alice.allows("gpt-4o-mini"))
        self.assertFalse(alice.allows("o1"))
        self.assertEqual(c.policy.policies.policy_for("bob"), KeyPolicy(rpm=1))

    def test_errors_name_the_field(self):
        """Unknown field, negative number, unknown label, wrong type: one
        line naming the setting and the field."""
        cases = {
            '{"alice": {"rpmm": 1}}': "KEY_POLICY (--key-policy): alice.rpmm: unknown field",
            '{"alice": {"tpm": -1}}': "alice.tpm: must be a whole number >= 0",
            '{"carol": {"tpm": 1}}': "carol: no forward key has this label",
            '{"alice": {"models": "x", "usd_per_day": "1"}}': "alice.usd_per_day",
            '{"alice": []}': "alice: must be an object",
            "{": "not valid JSON",
        }
        for text, expected in cases.items():
            e = self.assertRaises(ConfigError, config, KEY_POLICY=text)
            self.assertIn(expected, str(e))
            self.assertNotIn("\n", str(e))

    def test_file_json_and_toml(self):
        """KEY_POLICY_FILE reads JSON, or TOML by its suffix; not both settings."""
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "p.json")
            with open(path, "w") as f:
                f.write('{"alice": {"rpm": 3}}')
            self.assertEqual(config(KEY_POLICY_FILE=path).policy.policies.keys["alice"].rpm, 3)
            e = self.assertRaises(ConfigError, config, KEY_POLICY_FILE=path, KEY_POLICY="{}")
            self.assertIn("not both", str(e))
            if sys.version_info >= (3, 11):
                path = os.path.join(d, "p.toml")
                with open(path, "w") as f:
                    f.write('[alice]\nrpm = 4\nmodels = ["gpt-4o-mini"]\n["*"]\ntpm = 9\n')
                c = config(KEY_POLICY_FILE=path)
                self.assertEqual(c.policy.policies.keys["alice"].rpm, 4)
                self.assertEqual(c.policy.policies.keys["*"].tpm, 9)
            e = self.assertRaises(ConfigError, config, KEY_POLICY_FILE=os.path.join(d, "none"))
            self.assertIn("KEY_POLICY_FILE (--key-policy-file): cannot read", str(e))

    def test_no_policy_inactive(self):
        """Without any policy setting nothing is checked."""
        self.assertFalse(config().policy.active)


class OpenAIForward08Tests(SynchronousTestCase):
    """openai-forward 0.8.1's names keep their meaning."""

    def test_levels(self):
        """Forward keys get levels and labels; default keys the levels they
        serve; plain OPENAI_API_KEY keys serve every level."""
        c = load_config({}, {
            "OPENAI_API_KEY": "sk-plain-0123456789",
            "OPENAI_API_KEY_CONFIG": '{"sk-one-0123456789": [1], "sk-two-0123456789": [1, 2]}',
            "FORWARD_KEY_CONFIG": '{"fk-level1-0123456789": 1, "two:fk-level2-0123456789": 2}',
            "LEVEL_MODELS": '{"1": ["gpt-4o-mini"], "2": ["o*"]}',
        })
        self.assertEqual(len(c.default_keys), 3)
        self.assertEqual(c.policy.key_levels, (None, frozenset({1}), frozenset({1, 2})))
        labels = [k.label for k in c.forward_keys]
        self.assertEqual(labels, ["fk#1", "two"])
        self.assertEqual(dict(c.policy.policies.levels), {"fk#1": 1, "two": 2})
        p = c.policy.policies
        self.assertTrue(p.level_allows(0, "anything"))
        self.assertTrue(p.level_allows(2, "o3"))
        self.assertFalse(p.level_allows(1, "o3"))
        keys = DefaultKeys(c.default_keys, lambda: 0.0, c.policy.key_levels)
        self.assertEqual({keys.order(2)[0] for _ in range(4)}, {0, 2})
        self.assertEqual(keys.order(0), [0])

    def test_rate_limits(self):
        """REQ_RATE_LIMIT rules by route and level; GLOBAL_RATE_LIMIT for
        the rest; moving-window strategy."""
        c = config(
            REQ_RATE_LIMIT='{"/v1/chat/completions": [{"level": 0, "limit": "100/2minutes"}]}',
            GLOBAL_RATE_LIMIT="30/minute",
            RATE_LIMIT_STRATEGY="moving-window",
        )
        p = c.policy.policies
        self.assertTrue(p.moving)
        self.assertEqual(
            p.request_rates(0, "/v1/chat/completions"),
            (("/v1/chat/completions", (Rate(100, 120.0),)),),
        )
        self.assertEqual(p.request_rates(0, "/v1/embeddings"), (("*", (Rate(30, 60.0),)),))

    def test_backend_is_redis_url(self):
        """REQ_RATE_LIMIT_BACKEND is REDIS_URL; memory:// is none."""
        self.assertEqual(
            config(REQ_RATE_LIMIT_BACKEND="redis://127.0.0.1:6379/0").policy.redis_url,
            "redis://127.0.0.1:6379/0",
        )
        self.assertIsNone(config(REQ_RATE_LIMIT_BACKEND="memory://").policy.redis_url)
        e = self.assertRaises(ConfigError, config, REDIS_URL="http://x")
        self.assertIn("REDIS_URL (--redis-url)", str(e))

    def test_refusals(self):
        """TOKEN_RATE_LIMIT is refused naming its replacement; bad levels,
        strategies and unserved levels stop start-up in one line."""
        cases = {
            "TOKEN_RATE_LIMIT": ('{"/v1/chat/completions": "60/second"}', 'limit tokens with "tpm" in KEY_POLICY'),
            "RATE_LIMIT_STRATEGY": ("sliding", "not fixed-window or moving-window"),
            "LEVEL_MODELS": ('{"x": []}', "level 'x' is not a whole number"),
            "REQ_RATE_LIMIT": ('{"/v1": [{"level": 1, "limit": "5/eon"}]}', "/v1: '5/eon'"),
        }
        for env, (value, expected) in cases.items():
            e = self.assertRaises(ConfigError, config, **{env: value})
            self.assertIn(env, str(e))
            self.assertIn(expected, str(e))
            self.assertNotIn("\n", str(e))

    def test_unserved_level(self):
        """A forward key whose level no default key serves stops start-up."""
        e = self.assertRaises(ConfigError, load_config, {}, {
            "OPENAI_API_KEY_CONFIG": '{"sk-one-0123456789": [1]}',
            "FORWARD_KEY_CONFIG": '{"fk-lvl3-0123456789": 3}',
        })
        self.assertIn("FORWARD_KEY_CONFIG (--forward-key-config): fk#1 has level 3", str(e))
        e = self.assertRaises(ConfigError, load_config, {}, {
            "OPENAI_API_KEY_CONFIG": '{"sk-one-0123456789": [1]}',
            "FORWARD_KEY": "fk-level0-0123456789",
        })
        self.assertIn("OPENAI_API_KEY_CONFIG (--api-key-config): fk#1 has level 0", str(e))


class PriceTests(SynchronousTestCase):
    """The price table and its lookup."""

    def test_builtin_snapshots_and_fallback(self):
        """Dated snapshots take their family's price, the longest name
        first; unknown models the fallback; costs per million tokens."""
        table = PriceTable(builtin_prices(), Price(1.0, 2.0, 1.0))
        self.assertEqual(table.price("gpt-4o-mini-2024-07-18"), table.price("gpt-4o-mini"))
        self.assertEqual(table.price("gpt-4o-2024-08-06").input, 2.5)
        self.assertIsNone(table.known("my-model"))
        self.assertEqual(table.price("my-model"), Price(1.0, 2.0, 1.0))
        self.assertAlmostEqual(table.cost_usd("gpt-4o", 1_000_000, 1_000_000, 1_000_000), 1.25 + 10)

    def test_parse_price(self):
        """UNKNOWN_MODEL_PRICE is 'input,output[,cached]'."""
        self.assertEqual(parse_price("3,4"), Price(3.0, 4.0, 3.0))
        self.assertRaises(ValueError, parse_price, "3")
        self.assertRaises(ValueError, parse_price, "-1,2")

    def test_prices_file_checked(self):
        """A PRICES_FILE that is not a table stops start-up."""
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write('{"m": {"input": "x"}}')
        self.addCleanup(os.unlink, f.name)
        e = self.assertRaises(ConfigError, config, PRICES_FILE=f.name)
        self.assertIn("PRICES_FILE (--prices-file): m: prices must be numbers", str(e))


class BodyTests(SynchronousTestCase):
    """The top-level scan of request bodies."""

    def test_members_in_any_order(self):
        """model after a large messages array with tricky strings."""
        body = json.dumps({
            "messages": [{"content": 'a "}{][,:" b \\ ' * 1000}],
            "max_completion_tokens": 7, "n": 2, "model": "gpt-4o", "stream": True,
        }).encode()
        facts = facts_of(body)
        self.assertEqual((facts.model, facts.max_output, facts.choices, facts.stream),
                         ("gpt-4o", 7, 2, True))
        self.assertEqual(facts.estimate(), (-(-len(body) // 4), 14))

    def test_spooled_file(self):
        """A body in a file is scanned through a memory map."""
        with tempfile.TemporaryFile() as f:
            f.write(b'{"messages": [], "model": "o3"}')
            f.flush()
            self.assertEqual(read_facts(f).model, "o3")

    def test_not_json(self):
        """Not an object, broken, or a member twice: unreadable when it
        starts like JSON; a duplicate model never passes silently."""
        self.assertIsNone(top_level(b"[1, 2]"))
        self.assertFalse(facts_of(b"[1]").unreadable)
        self.assertTrue(facts_of(b'{"model": "a"').unreadable)
        self.assertTrue(facts_of(b'{"model": "a", "model": "b"}').unreadable)

    def test_rewrite(self):
        """include_usage is added in front, or merged into stream_options;
        every other byte stays."""
        body = b'{"model": "m", "stream": true}'
        self.assertEqual(
            with_usage_requested(body, facts_of(body)),
            b'{"stream_options":{"include_usage":true},"model": "m", "stream": true}',
        )
        body = b'{"stream_options": {"include_obfuscation": false}, "stream": true}'
        self.assertEqual(
            with_usage_requested(body, facts_of(body)),
            b'{"stream_options": {"include_obfuscation":false,"include_usage":true}, "stream": true}',
        )


class UsageTests(SynchronousTestCase):
    """Usage read from answers; the stripper gives back the plain stream."""

    def test_usage_shapes(self):
        """Chat, embeddings and Responses API usage objects."""
        self.assertEqual(
            usage_of({"prompt_tokens": 5, "completion_tokens": 3,
                      "prompt_tokens_details": {"cached_tokens": 2}}),
            Usage(5, 3, 2),
        )
        self.assertEqual(usage_of({"prompt_tokens": 4, "total_tokens": 4}), Usage(4, 0))
        self.assertEqual(usage_of({"input_tokens": 6, "output_tokens": 1}), Usage(6, 1))
        self.assertIsNone(usage_of(None))

    def test_tap_json_and_stream(self):
        """A JSON answer's usage, and the last streamed one."""
        tap = UsageTap(False)
        tap.feed(b'{"usage": {"prompt_tokens": 1, ')
        tap.feed(b'"completion_tokens": 2}}')
        self.assertEqual(tap.end(), Usage(1, 2))
        tap = UsageTap(True)
        for event in chat_chunks("a b c", include_usage=True):
            tap.feed(event[:5])
            tap.feed(event[5:])
        self.assertEqual(tap.end(), Usage(5, 3))

    def test_tap_large_json_tail(self):
        """An answer too large to parse whole gives the usage at its end."""
        tap = UsageTap(False)
        tap.feed(b'{"data": [' + b"0.1, " * 600_000 + b'0.1], "usage": ')
        tap.feed(b'{"prompt_tokens": 9, "total_tokens": 9}}')
        self.assertEqual(tap.end(), Usage(9, 0))

    def test_stripper_every_split(self):
        """Whatever the chunking, the stripped stream is byte for byte the
        stream without usage; events without usage pass at once."""
        with_usage = b"".join(chat_chunks("one two three", include_usage=True))
        plain = b"".join(chat_chunks("one two three"))
        for size in (1, 2, 7, 64, len(with_usage)):
            s = UsageStripper()
            out = b"".join(s.feed(with_usage[i:i + size]) for i in range(0, len(with_usage), size))
            self.assertEqual(out + s.flush(), plain)
        crlf = plain.replace(b"\n", b"\r\n")
        self.assertEqual(UsageStripper().feed(crlf), crlf)

    def test_stripper_openai_compact(self):
        """OpenAI's compact serialisation: the member last or first."""
        s = UsageStripper()
        self.assertEqual(
            s.feed(b'data: {"id":"x","choices":[{"delta":{}}],"usage":null}\n\n'),
            b'data: {"id":"x","choices":[{"delta":{}}]}\n\n',
        )
        self.assertEqual(s.feed(b'data: {"usage":null,"id":"x"}\n\n'), b'data: {"id":"x"}\n\n')
        self.assertEqual(
            s.feed(b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":1}}\n\n'), b""
        )


class FastBodyFactsTests(SynchronousTestCase):
    """The C-parser fast path of facts_of gives the scanner's answer, and
    steps aside wherever the two could differ."""

    BODIES = [
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
        b'{"model": "gpt-4o", "stream": true, "max_tokens": 50, "n": 2, "messages": []}',
        b'{"model":"o1","max_completion_tokens":7,"max_tokens":9}',
        b'{"model":"m","n":true,"stream":"yes","max_tokens":-1}',
        b'{"model":"m","messages":[{"content":"the \\"model\\" field"}]}',
        b'{"model":"a","model":"b"}',
        b'{"mod\\u0065l":"escaped","model":"plain"}',
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}',
        b'{"model":"m"} trailing',
        b'[1, 2]',
        b'{"model":"' + b"x" * 5000 + b'"}',
        b'{"input":"text","model":"text-embedding-3-small"}',
    ]

    def scanned(self, body: bytes):
        """facts_of through the scanner only (a bytearray skips the fast path)."""
        return facts_of(bytearray(body), b"application/json", "/v1/chat/completions")

    def test_same_answer_as_the_scanner(self):
        """For every body, the facts equal the scanner's."""
        for body in self.BODIES:
            self.assertEqual(
                facts_of(body, b"application/json", "/v1/chat/completions"),
                self.scanned(body), body[:60],
            )

    def test_fast_path_taken_for_a_plain_chat_body(self):
        """A plain chat body is read by the C parser (no scan)."""
        from twisted_forward.policies import body as module

        self.assertIsNotNone(module._facts_fast(self.BODIES[0], len(self.BODIES[0]), None))

    def test_fast_path_steps_aside(self):
        """Duplicates, escaped names, stream_options, long models, non-objects
        and trailing bytes go to the scanner."""
        from twisted_forward.policies import body as module

        for body in self.BODIES[5:11]:
            self.assertIsNone(module._facts_fast(body, len(body), None), body[:60])
