"""
The access line's upstream field, the open-relay warning's condition, and
``twistd openai-forward --version``.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.logger import globalLogPublisher

from .harness import ProxyTestCase
from .test_startup import TWISTD, run


class AccessLineTests(ProxyTestCase):
    """What operators read in the log."""

    def capture(self) -> list[dict]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    @defer.inlineCallbacks
    def test_no_upstream_is_a_dash(self):
        """A health check never went upstream: ``upstream=-``, not
        ``upstream=Nonems``; a forwarded request has its milliseconds."""
        events = self.capture()
        yield self.start_proxy()
        for path in ("/healthz", "/v1/models"):
            response = yield self.client.get(self.url(path))
            yield response.content()
        lines = [e["line"] for e in events if e.get("log_namespace") == "twisted_forward.access"]
        [health] = [line for line in lines if " /healthz " in line]
        [models] = [line for line in lines if " /v1/models " in line]
        self.assertIn(" upstream=- ", health)
        self.assertRegex(models, r" upstream=\d+(\.\d+)?ms ")

    @defer.inlineCallbacks
    def test_open_relay_warning_only_when_open(self):
        """IP_WHITELIST restricts who can spend the keys: no warning then."""
        events = self.capture()
        yield self.start_proxy(OPENAI_API_KEY="sk-access-line-test", IP_WHITELIST="127.0.0.1")
        texts = [str(e.get("log_format", "")) for e in events]
        self.assertFalse([t for t in texts if "anyone who can reach" in t])

    @defer.inlineCallbacks
    def test_version(self):
        """``twistd openai-forward --version`` names twisted-forward's version."""
        from twisted_forward import __version__

        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        code, process = yield run(self, [*TWISTD, "openai-forward", "--version"], cwd)
        self.assertEqual(code, 0, process.errors)
        self.assertTrue(process.output.decode().startswith(f"twisted-forward {__version__} "))
