"""
Who may read the metrics, for every combination of METRICS, ADMIN_KEY and
METRICS_PORT, on the real plugin: the public port serves them only when asked
(the admin key, or METRICS=public), METRICS_PORT serves them open, and the
start-up log says where they are.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.config import ConfigError, load_config, metrics_placement

from .harness import ProxyTestCase, listeners

ADMIN = "admin-metrics-access-0123456789"
SIDE = "tcp:0:interface=127.0.0.1"

#: (METRICS, ADMIN_KEY set, METRICS_PORT set) -> (public port without a key,
#: public port with the admin key, METRICS_PORT, start-up line fragment).
#: 200: the metrics; 401/404: the proxy's own error (code given);
#: "forwarded": like any path; None: no such listener / not asked.
EXPECTED: dict[tuple[str, bool, bool], tuple[Any, Any, Any, str]] = {
    ("true", False, False): ("metrics_not_served", None, None, "not served"),
    ("true", True, False): ("invalid_admin_key", 200, None, "for the admin key only"),
    ("true", False, True): ("metrics_not_served", None, 200, "on METRICS_PORT"),
    ("true", True, True): ("metrics_not_served", "metrics_not_served", 200, "on METRICS_PORT"),
    ("public", False, False): (200, None, None, "open to every client"),
    ("public", True, False): (200, 200, None, "open to every client"),
    ("public", False, True): (200, None, 200, "on METRICS_PORT"),
    ("public", True, True): (200, 200, 200, "open to every client"),
    ("false", False, False): ("forwarded", None, None, "metrics: off"),
    ("false", True, False): ("forwarded", None, None, "metrics: off"),
    ("false", False, True): ("forwarded", None, None, "metrics: off"),
    ("false", True, True): ("forwarded", None, None, "metrics: off"),
}

_CODES = {"metrics_not_served": 404, "invalid_admin_key": 401}


class MetricsAccessTests(ProxyTestCase):
    """One real proxy per combination; each test checks every door."""

    @defer.inlineCallbacks
    def check(self, metrics: str, admin: bool, side: bool) -> Any:
        public, with_key, on_side, line = EXPECTED[(metrics, admin, side)]
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        env = {"METRICS": metrics}
        if admin:
            env["ADMIN_KEY"] = ADMIN
        if side:
            env["METRICS_PORT"] = SIDE
        yield self.start_proxy(**env)

        yield self.door(self.url("/metrics"), None, public)
        if with_key is not None:
            yield self.door(self.url("/metrics"), ADMIN, with_key)
        found = listeners(self.service)
        if on_side is None:
            self.assertEqual(len(found), 1, "no METRICS_PORT listener expected")
        else:
            self.assertEqual(len(found), 2)
            port = found[1].endpoint.port.getHost().port
            yield self.door(f"http://127.0.0.1:{port}/metrics", None, on_side)
        said = [formatEvent(e) for e in events if formatEvent(e).startswith("metrics: ")]
        self.assertEqual(len(said), 1, said)
        self.assertIn(line, said[0])
        self.assertNotIn(ADMIN, said[0])

    @defer.inlineCallbacks
    def door(self, url: str, key: Optional[str], expected: Any) -> Any:
        """GET ``url`` (with ``key`` as Bearer) and check the answer."""
        headers = {b"authorization": [b"Bearer " + key.encode()]} if key else {}
        before = len(self.fake.seen)
        response = yield self.client.get(url, headers=headers)
        body = yield response.content()
        if expected == "forwarded":
            self.assertEqual([s.uri for s in self.fake.seen[before:]], [b"/metrics"])
            return
        self.assertEqual(len(self.fake.seen), before, "never forwarded")
        if expected == 200:
            self.assertEqual(response.code, 200, body)
            self.assertIn(b"openai_forward_requests_total", body)
            return
        self.assertEqual(response.code, _CODES[expected], body)
        error = json.loads(body)["error"]
        self.assertEqual(error["code"], expected)
        self.assertNotIn(b"openai_forward_", body)

    for (_m, _a, _s) in EXPECTED:
        def _test(self: "MetricsAccessTests", m: str = _m, a: bool = _a, s: bool = _s) -> Any:
            return self.check(m, a, s)

        _test.__name__ = name = (
            f"test_metrics_{_m}_{'admin_key' if _a else 'no_admin_key'}_"
            f"{'metrics_port' if _s else 'no_metrics_port'}"
        )
        _test.__doc__ = (
            f"METRICS={_m}, ADMIN_KEY {'set' if _a else 'unset'}, METRICS_PORT "
            f"{'set' if _s else 'unset'}: {EXPECTED[(_m, _a, _s)]}."
        )
        locals()[name] = _test
    del _m, _a, _s, _test, name


class MetricsSettingTests(SynchronousTestCase):
    """The METRICS setting's values."""

    def test_values(self) -> None:
        """true/false spellings and public are accepted; anything else stops
        start-up naming METRICS."""
        for value, mode in (("true", "on"), ("1", "on"), ("off", "off"),
                            ("FALSE", "off"), ("Public", "public")):
            self.assertEqual(load_config({}, {"METRICS": value}).metrics, mode)
        with self.assertRaises(ConfigError) as caught:
            load_config({}, {"METRICS": "sometimes"})
        self.assertIn("METRICS (--metrics)", str(caught.exception))

    def test_default_says_how_to_turn_them_on(self) -> None:
        """With no METRICS_PORT and no ADMIN_KEY the start-up line names the
        three ways to serve them."""
        line = metrics_placement(load_config({}, {}))
        for way in ("METRICS_PORT", "ADMIN_KEY", "METRICS=public"):
            self.assertIn(way, line)
