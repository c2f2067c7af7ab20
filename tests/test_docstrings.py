"""
Every test says what it checks: a docstring on every test method (Twisted's
rule), so a failure names the promise that broke, not just a function name.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

TESTS = os.path.dirname(os.path.abspath(__file__))


def undocumented(source: str) -> list[str]:
    """``Class.test_name`` of each test method in ``source`` with no docstring."""
    missing = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if (
                isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                and item.name.startswith("test")
                and not ast.get_docstring(item)
            ):
                missing.append(f"{node.name}.{item.name}")
    return missing


class DocstringTests(SynchronousTestCase):
    """The test suite's own rule."""

    def test_every_test_has_a_docstring(self):
        """No test method in tests/test_*.py lacks a docstring."""
        missing = []
        for name in sorted(os.listdir(TESTS)):
            if name.startswith("test_") and name.endswith(".py"):
                with open(os.path.join(TESTS, name), encoding="utf-8") as f:
                    missing += [f"{name}: {m}" for m in undocumented(f.read())]
        self.assertEqual(missing, [], "tests without a docstring")

    def test_checker_finds_a_missing_docstring(self):
        """The check names an undocumented test and passes a documented one."""
        source = (
            "class T:\n"
            "    def test_a(self):\n        pass\n"
            "    def test_b(self):\n        '''Says what.'''\n"
            "    def helper(self):\n        pass\n"
        )
        self.assertEqual(undocumented(source), ["T.test_a"])
