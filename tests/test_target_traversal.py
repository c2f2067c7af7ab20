"""
Dot segments in every spelling an upstream might decode are refused:
``..%2f``, ``..%5c``, ``..\\``, ``..;/`` and their case variants, like the
plain and ``%2e`` forms; dots inside a segment stay allowed.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.target import BadTarget, split_target

from .test_proxy_unit import ProxyHarness

REFUSED = [
    b"/v1/..%2fadmin",
    b"/v1/..%2Fadmin",
    b"/v1/..%5cadmin",
    b"/v1/..%5Cadmin",
    b"/v1/..\\admin",
    b"/v1/..;/admin",
    b"/v1/..;jsessionid=1/admin",
    b"/v1/..%3b/admin",
    b"/v1/%2e%2e%2fadmin",
    b"/v1/.%2E%5Cadmin",
    b"/v1/files/x%2f..%2fy",
    b"/v1/files/x%5C..%5Cy",
    b"/v1/files/x\\..\\y",
    b"/v1/.%2f",
    b"/v1/.;/x",
    b"/..%2f",
    b"/v1/..%2f?q=1",
]

ALLOWED = [
    b"/v1/files/a..b",
    b"/v1/files/..abc",
    b"/v1/files/abc..",
    b"/v1/files/a%2fb",
    b"/v1/files/a;b",
    b"/v1/files/.well-known",
    b"/v1/x?q=..%2f",
]


class TraversalTests(SynchronousTestCase):
    def test_every_spelling_refused(self):
        """Each encoded, backslash or path-parameter dot segment is refused."""
        for target in REFUSED:
            with self.subTest(target=target):
                self.assertRaises(BadTarget, split_target, target)

    def test_dots_inside_segments_and_queries_allowed(self):
        """Dots that are not a whole segment, and anything in the query, pass."""
        for target in ALLOWED:
            with self.subTest(target=target):
                path, query = split_target(target)
                self.assertEqual(path + query, target)


class TraversalEndToEndTests(ProxyHarness):
    def test_refused_spellings_never_reach_the_upstream(self):
        """Through the real parser: 400, nothing upstream."""
        for target in REFUSED:
            channel, transport = self.get(target)
            self.assertEqual(self.status(transport), 400, target)
            self.assertEqual(self.error_code(transport), "invalid_request_target")
        self.assertEqual(self.upstream.calls, [])
