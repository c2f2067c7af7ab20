"""
Every test says what it checks: a docstring on every test method (Twisted's
rule), so a failure names the promise that broke, not just a function name.

A docstring that only restates the method's name ("Foo bar." on
``test_foo_bar``) says nothing the name did not: it is refused too.
"""

from __future__ import annotations

import ast
import os
import re

from twisted.trial.unittest import SynchronousTestCase

TESTS = os.path.dirname(os.path.abspath(__file__))

#: Words that carry no claim: a docstring of these and the name's words
#: only restates the name.
_FILLER = frozenset(
    "a an the and or of to is are in on it its be by as for with that this "
    "test tests tested testing check checks checked works work verify verifies "
    "ensure ensures".split()
)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower())) - _FILLER


def restates_its_name(name: str, docstring: str) -> bool:
    """Whether ``docstring`` says nothing beyond the test's ``name``: all its
    words (but filler) are the name's, or it has fewer than three words."""
    if len(re.findall(r"\w+", docstring)) < 3:
        return True
    return _words(docstring) <= _words(name.replace("_", " "))


def _test_methods(source: str) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test"):
                found.append((f"{node.name}.{item.name}", item))
    return found


def undocumented(source: str) -> list[str]:
    """``Class.test_name`` of each test method in ``source`` with no docstring."""
    return [name for name, item in _test_methods(source) if not ast.get_docstring(item)]


def restating(source: str) -> list[str]:
    """``Class.test_name`` of each test method in ``source`` whose
    docstring only restates its name."""
    return [
        name for name, item in _test_methods(source)
        if ast.get_docstring(item) and restates_its_name(item.name, ast.get_docstring(item) or "")
    ]


def test_sources() -> dict[str, str]:
    """The text of every tests/test_*.py, by file name."""
    sources = {}
    for name in sorted(os.listdir(TESTS)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(TESTS, name), encoding="utf-8") as f:
                sources[name] = f.read()
    return sources


class DocstringTests(SynchronousTestCase):
    """The test suite's own rule."""

    def test_every_test_has_a_docstring(self):
        """No test method in tests/test_*.py lacks a docstring."""
        missing = []
        for name, source in test_sources().items():
            missing += [f"{name}: {m}" for m in undocumented(source)]
        self.assertEqual(missing, [], "tests without a docstring")

    def test_no_docstring_restates_its_name(self):
        """No test's docstring only restates its name: each says what
        behaviour it proves, so a failure reads as a broken promise."""
        found = []
        for name, source in test_sources().items():
            found += [f"{name}: {test}" for test in restating(source)]
        self.assertEqual(
            found, [],
            "docstrings that only restate the test's name: say what behaviour the test "
            "proves and why it matters",
        )

    def test_checker_finds_a_missing_docstring(self):
        """The check names an undocumented test and passes a documented one."""
        source = (
            "class T:\n"
            "    def test_a(self):\n        pass\n"
            "    def test_b(self):\n        '''Says what.'''\n"
            "    def helper(self):\n        pass\n"
        )
        self.assertEqual(undocumented(source), ["T.test_a"])

    def test_checker_finds_a_restating_docstring(self):
        """The check refuses "Foo bar." on test_foo_bar, filler words around
        the name's ("Test that foo works."), and one or two words; it passes
        a docstring that adds a claim, however short, and ignores helpers."""
        source = (
            "class T:\n"
            "    def test_foo_bar(self):\n        '''Foo bar.'''\n"
            "    def test_foo(self):\n        '''Test that foo works.'''\n"
            "    def test_x(self):\n        '''Plain.'''\n"
            "    def test_port_default(self):\n"
            "        '''Without --port: TCP 8000 on all interfaces.'''\n"
            "    def helper_foo(self):\n        '''Foo.'''\n"
        )
        self.assertEqual(restating(source), ["T.test_foo_bar", "T.test_foo", "T.test_x"])
