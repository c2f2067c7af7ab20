"""
The key rules, the forward-key lookup and the masks, without a network.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from twisted_forward import keys
from twisted_forward.config import ForwardKey, load_config, parse_forward_keys
from twisted_forward.headers import upstream_request_headers
from twisted_forward.keys import (
    CLIENT_KEY,
    DEFAULT_KEY,
    NO_KEY,
    DefaultKeys,
    ForwardKeys,
    KeyRules,
    SecretMask,
    key_refused,
    looks_keyed,
    parse_credential,
    scrub,
)

DEFAULT = "sk-default-key-0123456789"
ALICE = "fk-alice-0123456789"
BOB = "fk-bob-9876543210"


def rules(default=(DEFAULT,), forward=("alice:" + ALICE, BOB)) -> KeyRules:
    return KeyRules(
        DefaultKeys(default, lambda: 0.0),
        ForwardKeys(parse_forward_keys(" ".join(forward))),
    )


def headers(**values: str) -> Headers:
    """Headers from keyword arguments: api_key= is the api-key header."""
    h = Headers()
    for name, value in values.items():
        h.addRawHeader(name.replace("_", "-").encode(), value.encode("latin-1"))
    return h


def upstream(rules: KeyRules, decision: keys.KeyDecision, client: Headers) -> Headers:
    """The headers the proxy would send upstream (first default key in turn)."""
    credentials = decision.send
    if decision.substituted:
        credentials = (rules.default.credential(rules.default.order()[0], decision.carrier),)
    return upstream_request_headers(client, credentials)


class ForwardKeyTests(SynchronousTestCase):
    """A forward key is swapped for a default key in the header it came in."""

    def test_matching_forward_key_substituted(self):
        """A configured forward key in Authorization is accepted with its label and replaced
        upstream by "Bearer <default key>": the client never holds the real key."""
        r = rules()
        client = headers(authorization="Bearer " + ALICE)
        decision = r.decide(client)
        self.assertIsNone(decision.refusal)
        self.assertTrue(decision.substituted)
        self.assertEqual(decision.label, "alice")
        sent = upstream(r, decision, client)
        self.assertEqual(sent.getRawHeaders(b"authorization"), [b"Bearer " + DEFAULT.encode()])

    def test_unlabelled_short_key_gets_position_label(self):
        """A hash prefix of a short key could be brute-forced: position."""
        decision = rules().decide(headers(authorization="Bearer " + BOB))
        self.assertEqual(decision.label, "fk#2")
        self.assertNotIn(BOB[3:], decision.label)

    def test_scheme_case_and_whitespace(self):
        """The Bearer scheme is matched case-blind with any spaces or tabs around the key,
        as HTTP allows, so a forward key is recognised however a client spells the
        header."""
        for value in ("bearer " + ALICE, "BEARER  " + ALICE, "Bearer\t" + ALICE, " Bearer " + ALICE + " "):
            decision = rules().decide(headers(authorization=value))
            self.assertEqual(decision.label, "alice", value)

    def test_api_key_headers_carry_forward_keys(self):
        """A forward key in api-key or x-api-key (Azure- and Anthropic-style) is swapped for
        the default key in that same header, and no Authorization header is added."""
        for name in ("api-key", "x-api-key"):
            r = rules()
            client = Headers({name.encode(): [ALICE.encode()]})
            decision = r.decide(client)
            self.assertEqual((decision.label, decision.carrier), ("alice", name.encode()))
            sent = upstream(r, decision, client)
            self.assertEqual(sent.getRawHeaders(name.encode()), [DEFAULT.encode()])
            self.assertIsNone(sent.getRawHeaders(b"authorization"))

    def test_unknown_forward_key_refused(self):
        """An fk- key that is not configured, or differs by one character (longer or
        shorter), is refused with "Incorrect forward key provided." in any header, and
        nothing is substituted."""
        for client in (
            headers(authorization="Bearer fk-not-a-configured-key"),
            headers(authorization="Bearer " + ALICE + "x"),
            headers(authorization="Bearer " + ALICE[:-1]),
            headers(api_key="fk-not-a-configured-key"),
            headers(x_api_key="fk-not-a-configured-key"),
        ):
            decision = rules().decide(client)
            self.assertEqual(decision.refusal, "Incorrect forward key provided.")
            self.assertFalse(decision.substituted)

    def test_forward_key_without_forward_keys_configured_refused(self):
        """An fk- key is refused when no forward keys are configured, rather than passed
        upstream as if it were the client's own key."""
        decision = rules(forward=()).decide(headers(authorization="Bearer " + ALICE))
        self.assertIsNotNone(decision.refusal)

    def test_forward_key_in_other_forms_refused(self):
        """A forward key the rules cannot take is refused, not forwarded as
        if it were the client's own key."""
        for client in (
            headers(authorization=ALICE),
            headers(authorization="Basic " + ALICE),
            headers(authorization="Token " + ALICE),
            headers(authorization="Bearer " + ALICE + " extra"),
            headers(authorization="Bearer FK-" + ALICE[3:]),
            headers(authorization="Bearer sk-own " + ALICE),
            headers(api_key="Bearer " + ALICE),
            headers(x_api_key=ALICE + " " + ALICE),
        ):
            decision = rules().decide(client)
            self.assertIsNotNone(decision.refusal, client)
            self.assertEqual(decision.send, ())

    def test_forward_key_beside_another_credential_refused(self):
        """A forward key sent together with another credential in another header is refused:
        the proxy will not guess which one to replace."""
        for client in (
            headers(authorization="Bearer " + ALICE, api_key="sk-own"),
            headers(authorization="Bearer sk-own", x_api_key=ALICE),
            headers(api_key=ALICE, x_api_key=BOB),
        ):
            self.assertEqual(
                rules().decide(client).refusal, "Send a forward key alone, in one header."
            )

    def test_several_headers_refused(self):
        """Two Authorization header lines are refused ("Send one authorization header, not
        several.") instead of one being chosen."""
        h = Headers({b"authorization": [b"Bearer " + ALICE.encode(), b"Bearer sk-own"]})
        self.assertEqual(
            rules().decide(h).refusal, "Send one authorization header, not several."
        )


class ClientKeyTests(SynchronousTestCase):
    """A client's own key goes upstream untouched, in its own header."""

    def test_own_key_untouched(self):
        """A client's own credential (Bearer sk- in any case, Basic, a bare key) goes
        upstream byte for byte in Authorization and is labelled as the client's own."""
        for value in ("Bearer sk-client-own", "bearer  sk-client-own", "Basic dXNlcjpwYXNz", "sk-bare"):
            r = rules()
            client = headers(authorization=value)
            decision = r.decide(client)
            self.assertEqual((decision.label, decision.substituted), (CLIENT_KEY, False))
            sent = upstream(r, decision, client)
            self.assertEqual(sent.getRawHeaders(b"authorization"), [value.encode()])

    def test_own_keys_in_every_header_untouched(self):
        """A client's own keys in Authorization, api-key and x-api-key all go upstream
        unchanged, each in its own header."""
        r = rules()
        client = headers(authorization="Bearer sk-a", api_key="azure-key", x_api_key="sk-ant-b")
        decision = r.decide(client)
        self.assertEqual(decision.label, CLIENT_KEY)
        sent = upstream(r, decision, client)
        self.assertEqual(sent.getRawHeaders(b"authorization"), [b"Bearer sk-a"])
        self.assertEqual(sent.getRawHeaders(b"api-key"), [b"azure-key"])
        self.assertEqual(sent.getRawHeaders(b"x-api-key"), [b"sk-ant-b"])

    def test_decision_repr_holds_no_key(self):
        """A decision's repr does not contain the client's key (it may end up in a log or
        traceback), though the decision still carries it to send upstream."""
        decision = rules().decide(headers(authorization="Bearer sk-client-secret"))
        self.assertNotIn("sk-client-secret", repr(decision))
        self.assertEqual(decision.authorization, b"Bearer sk-client-secret")


class NoKeyTests(SynchronousTestCase):
    """Keyless requests: refused with forward keys, else a default key."""

    def keyless(self):
        return (
            Headers(),
            headers(authorization=""),
            headers(authorization="Bearer"),
            headers(authorization="Bearer   "),
            headers(api_key=" "),
        )

    def test_refused_when_forward_keys_set(self):
        """With forward keys configured, a request with no key (or an empty one) is refused
        with a message asking for a forward key."""
        for client in self.keyless():
            decision = rules().decide(client)
            self.assertEqual(
                decision.refusal, "This proxy needs an API key (a forward key fk-…)."
            )

    def test_default_key_when_only_default_keys(self):
        """With default keys but no forward keys, a keyless request goes upstream with
        "Bearer <default key>", and the rules report that the proxy is an open relay."""
        for client in self.keyless():
            r = rules(forward=())
            decision = r.decide(client)
            self.assertEqual((decision.label, decision.substituted), (DEFAULT_KEY, True))
            sent = upstream(r, decision, client)
            self.assertEqual(sent.getRawHeaders(b"authorization"), [b"Bearer " + DEFAULT.encode()])
            self.assertTrue(r.open_relay)

    def test_nothing_when_no_keys(self):
        """With no keys configured at all, a keyless request is neither refused nor given a
        key: no credential header goes upstream and it is not an open relay."""
        r = rules(default=(), forward=())
        decision = r.decide(Headers())
        self.assertEqual((decision.label, decision.substituted, decision.refusal), (NO_KEY, False, None))
        self.assertEqual(list(upstream(r, decision, Headers()).getAllRawHeaders()), [])
        self.assertFalse(r.open_relay)

    def test_open_relay_only_without_forward_keys(self):
        """The rules count as an open relay only when default keys are configured without
        forward keys (what the start-up warning is based on)."""
        self.assertFalse(rules().open_relay)
        self.assertTrue(rules(forward=()).open_relay)


class ParseCredentialTests(SynchronousTestCase):
    def test_table(self):
        """How each header value is classified: empty or scheme alone is none, Bearer fk- is
        a forward key, a bare fk- in Authorization or Bearer in api-key is bad, anything
        else is the client's own."""
        A = b"authorization"
        for header, value, expected in [
            (A, b"", ("none", b"")),
            (A, b"Bearer", ("none", b"")),
            (A, b"Bearer fk-x1234567", ("forward", b"fk-x1234567")),
            (A, b"Bearer sk-x", ("own", b"Bearer sk-x")),
            (A, b"fk-x1234567", ("bad", b"")),
            (A, b"Digest username=fk-x", ("own", b"Digest username=fk-x")),
            (b"api-key", b"fk-x1234567", ("forward", b"fk-x1234567")),
            (b"api-key", b"Bearer fk-x1234567", ("bad", b"")),
            (b"x-api-key", b"0123abcd", ("own", b"0123abcd")),
        ]:
            self.assertEqual(parse_credential(header, value), expected, value)


class ConstantTimeLookupTests(SynchronousTestCase):
    """Forward keys are compared as fixed-length digests, every one of them,
    whatever the candidate and wherever it matches."""

    def setUp(self):
        self.calls: list[tuple[bytes, bytes]] = []
        real = hmac.compare_digest

        def spy(a, b):
            self.calls.append((a, b))
            return real(a, b)

        self.patch(keys.hmac, "compare_digest", spy)
        self.keys = [ForwardKey(f"k{i}", f"fk-key-number-{i:04d}") for i in range(5)]
        self.forward = ForwardKeys(self.keys)

    def test_every_key_compared_on_hit_and_miss(self):
        """A lookup compares the SHA-256 digest of the candidate with every configured key's
        digest, on a hit, a miss, an empty or a 5000-byte candidate alike: timing does
        not reveal which key matched or how far."""
        for candidate, label in [
            (self.keys[0].key, "k0"),
            (self.keys[4].key, "k4"),
            ("fk-key-number-0000x", None),
            ("fk-", None),
            ("fk-" + "a" * 5000, None),
        ]:
            del self.calls[:]
            self.assertEqual(self.forward.lookup(candidate.encode()), label)
            self.assertEqual(len(self.calls), len(self.keys))
            for a, b in self.calls:
                self.assertEqual((len(a), len(b)), (32, 32))
                self.assertEqual(a, hashlib.sha256(candidate.encode()).digest())

    def test_keys_not_kept(self):
        """The lookup table keeps digests only: no forward key, nor its hex form, is in its
        state or repr."""
        state = repr(vars(self.forward))
        for k in self.keys:
            self.assertNotIn(k.key, state)
            self.assertNotIn(k.key.encode().hex(), state)
        self.assertNotIn("fk-key", repr(self.forward))


class ScrubTests(SynchronousTestCase):
    def test_key_shapes_masked(self):
        """scrub masks sk- and fk- key shapes in any case (also after an underscore) down to
        their prefix, and leaves words that merely contain "sk-" and too-short tails
        alone."""
        for text, expected in [
            (b"Incorrect API key provided: sk-proj-abc****************wxyz. You can",
             b"Incorrect API key provided: sk-*** You can"),
            (b'{"key": "fk-alice-0123"}', b'{"key": "fk-***"}'),
            (b"Bearer sk-a1b2c3 and SK-A1B2C3", b"Bearer sk-*** and SK-***"),
            (b"x_sk-abcdef", b"x_sk-***"),
            (b"task-abcdef risk-free", b"task-abcdef risk-free"),
            (b"sk-ab", b"sk-ab"),
        ]:
            self.assertEqual(scrub(text), expected)

    def test_looks_keyed_agrees_with_scrub(self):
        """looks_keyed says yes exactly when scrub changes the bytes: key
        shapes in every case of ``sk``/``fk`` (its quick ``k-`` search
        must not miss ``sK-`` or ``FK-``), and no for words, short tails,
        answer headers and the ``x-ratelimit-*`` lines."""
        for text in [
            b"Bearer sk-a1b2c3", b"SK-A1B2C3", b"sK-abcdef", b"Fk-abcdef", b"FK-ABC.DEF",
            b"x_sk-abcdef", b"task-abcdef risk-free", b"sk-ab", b"", b"k-", b"K-abcdef",
            b"Content-Type\napplication/json\nX-Ratelimit-Remaining-Tokens\n99",
            b"X-Request-Id\nreq_123\nOpenai-Processing-Ms\n12",
        ]:
            self.assertEqual(looks_keyed(text), scrub(text) != text, text)


    def test_scrub_skips_data_without_a_key_prefix_and_misses_no_case(self):
        """Data without ``k-``/``K-`` comes back as the very same object (no
        pattern search, no copy), while every case of ``sk-``/``fk-``, the
        ones the quick test must not let through, is still masked; the
        chat record's strings follow the same rule."""
        from twisted_forward.chat.record import _scrub_value

        plain = b'{"role": "assistant", "content": "risk free task list"}'
        self.assertIs(scrub(plain), plain)
        for prefix in (b"sk", b"sK", b"Sk", b"SK", b"fk", b"fK", b"Fk", b"FK"):
            self.assertEqual(scrub(b"key " + prefix + b"-abcdef!"), b"key " + prefix + b"-***!")
            text = "key " + prefix.decode() + "-abcdef!"
            self.assertEqual(_scrub_value({"m": [text]}), {"m": ["key " + prefix.decode() + "-***!"]})
        words = "no keys here, ümlaut"
        self.assertIs(_scrub_value(words), words)


class SecretMaskTests(SynchronousTestCase):
    secret = b"sk-default-key-0123456789"

    def masked(self, chunks, secrets=None) -> tuple[bytes, list[bytes]]:
        mask = SecretMask(secrets or [self.secret])
        out = [mask.feed(c) for c in chunks]
        out.append(mask.flush())
        return b"".join(out), out

    def test_same_length_mask(self):
        """Every occurrence of a configured secret in a body is replaced by a mask of the
        same length, so Content-Length and offsets stay right, and no tail of the secret
        survives."""
        body = b'{"echo": "Bearer ' + self.secret + b'", "again": "' + self.secret + b'"}'
        result, _ = self.masked([body])
        self.assertEqual(len(result), len(body))
        self.assertNotIn(self.secret, result)
        self.assertNotIn(self.secret[3:], result)
        self.assertEqual(result.count(b"sk-" + b"*" * (len(self.secret) - 3)), 2)

    def test_split_at_every_point(self):
        """A secret split across two chunks at any point is still masked, and the output
        keeps the input's length."""
        body = b"data: {\"k\": \"" + self.secret + b"\"}\n\n"
        for cut in range(1, len(body)):
            result, _ = self.masked([body[:cut], body[cut:]])
            self.assertNotIn(self.secret[3:10], result, cut)
            self.assertEqual(len(result), len(body))

    def test_byte_by_byte(self):
        """A body fed one byte at a time is masked exactly as whole, and a trailing prefix
        of the secret that never completes is let through at the end."""
        body = b"xx" + self.secret + b"yy" + self.secret[:5]
        result, _ = self.masked([bytes([b]) for b in body])
        self.assertEqual(result, b"xxsk-" + b"*" * 22 + b"yy" + self.secret[:5])

    def test_sse_events_not_held(self):
        """Whole SSE events with no secret prefix at their end are passed on at once, not
        held back: masking does not delay a stream."""
        events = [b"data: {\"x\": \"is sk\"}\n\n", b"data: [DONE]\n\n"]
        _, out = self.masked(events)
        self.assertEqual(out[:2], events)

    def test_possible_start_held_until_known(self):
        """Bytes that may begin a secret are held until the next bytes show they do not,
        then released unchanged; nothing is lost at flush."""
        mask = SecretMask([self.secret])
        self.assertEqual(mask.feed(b"abc sk-def"), b"abc ")
        self.assertEqual(mask.feed(b"ault"), b"")
        self.assertEqual(mask.feed(b"!"), b"sk-default!")
        self.assertEqual(mask.flush(), b"")

    def test_short_secret_wholly_masked(self):
        """A secret without a known prefix is masked in full, every character."""
        result, _ = self.masked([b"key=abcd1234;"], [b"abcd1234"])
        self.assertEqual(result, b"key=********;")

    def test_several_secrets(self):
        """Several configured secrets are all masked in one body."""
        other = b"azure0123456789abcdef"
        result, _ = self.masked([b"1 " + self.secret + b" 2 " + other], [self.secret, other])
        self.assertNotIn(self.secret, result)
        self.assertNotIn(b"0123456789abcdef", result)

    def test_no_secrets_passes_everything(self):
        """With no secrets configured, bytes that look like a key prefix pass at once
        instead of being held."""
        mask = SecretMask([])
        self.assertEqual(mask.feed(b"sk-"), b"sk-")


class ConfigReprTests(SynchronousTestCase):
    def test_no_key_in_config_repr(self):
        """Neither the config's repr nor the key rules' repr contains a default or forward
        key, nor their tails: printing them in a log or traceback leaks nothing."""
        config = load_config(
            {}, {"OPENAI_API_KEY": DEFAULT, "FORWARD_KEY": "alice:" + ALICE + " " + BOB}
        )
        text = repr(config) + repr(rules())
        for secret in (DEFAULT, ALICE, BOB):
            self.assertNotIn(secret, text)
            self.assertNotIn(secret[3:], text)




class CredentialHeadersTests(SynchronousTestCase):
    def test_only_the_decision_credentials_go_upstream(self):
        """Upstream request headers carry only the credential the decision chose: the
        client's other credential headers are dropped, unrelated headers are kept."""
        client = Headers(
            {b"authorization": [b"Bearer fk-x"], b"api-key": [b"fk-y"], b"x-api-key": [b"z"],
             b"x-other": [b"kept"]}
        )
        sent = upstream_request_headers(client, ((b"api-key", b"sk-chosen"),))
        self.assertEqual(
            sorted((n.lower(), v) for n, v in sent.getAllRawHeaders()),
            [(b"api-key", [b"sk-chosen"]), (b"x-other", [b"kept"])],
        )


class ErrorBodyTests(SynchronousTestCase):
    def test_key_shapes_masked_in_proxy_errors(self):
        """An error body the proxy makes masks sk- and fk- key shapes in its message, so an
        upstream echo of a key is not passed on."""
        from twisted_forward.errors import error_body

        body = error_body(502, "upstream_error", "echo of sk-proj-abcdef and fk-alice-1234")
        self.assertEqual(
            json.loads(body)["error"]["message"], "echo of sk-*** and fk-***"
        )


class KeyRefusedTests(SynchronousTestCase):
    """Which 401 bodies say the key itself is dead (and so revoke it)."""

    def test_dead_key_codes(self):
        """``invalid_api_key`` and ``account_deactivated`` revoke."""
        for code in ("invalid_api_key", "account_deactivated"):
            body = json.dumps({"error": {"message": "x", "code": code}}).encode()
            self.assertTrue(key_refused(body), code)

    def test_request_caused_codes(self):
        """Codes caused by the request, or none at all, do not."""
        for code in ("mismatched_organization", "no_organization", "ip_not_authorized", None, 401):
            body = json.dumps({"error": {"message": "invalid_api_key", "code": code}}).encode()
            self.assertFalse(key_refused(body), code)

    def test_not_openai_shaped(self):
        """Bodies that are not an OpenAI error never revoke."""
        for body in (b"", b"invalid_api_key", b"[]", b'{"error": "invalid_api_key"}',
                     b'{"code": "invalid_api_key"}', b"\xff\xfe"):
            self.assertFalse(key_refused(body), body)


class AccountHeadersTests(SynchronousTestCase):
    """OpenAI-Organization / OpenAI-Project go upstream with the client's own
    key only."""

    def test_dropped_with_a_default_key(self):
        """With a default key the operator's account is not the client's to choose."""
        client = Headers({b"OpenAI-Organization": [b"org-x"], b"OpenAI-Project": [b"proj_x"]})
        out = upstream_request_headers(client, [(b"authorization", b"Bearer k")], default_key=True)
        self.assertFalse(out.hasHeader(b"openai-organization"))
        self.assertFalse(out.hasHeader(b"openai-project"))

    def test_kept_with_the_clients_own_key(self):
        """With the client's own key they are the client's."""
        client = Headers({b"OpenAI-Organization": [b"org-x"], b"OpenAI-Project": [b"proj_x"]})
        out = upstream_request_headers(client, [(b"authorization", b"Bearer sk-own")])
        self.assertEqual(out.getRawHeaders(b"openai-organization"), [b"org-x"])
        self.assertEqual(out.getRawHeaders(b"openai-project"), [b"proj_x"])
