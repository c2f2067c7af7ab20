"""
CI's type check and lint pass, and the type checker's escape hatches stay
few and explained.

mypy runs in CI over the package (``.ci/run``, configured in
pyproject.toml).  A ``# type: ignore`` silences it on one line, so each one
must name the error code it silences and say why, on the same line::

    port.doRead = doRead  # type: ignore[method-assign]  # on this instance only

mypy itself rejects an ignore without a code (``ignore-without-code``) and
one that silences nothing (``warn_unused_ignores``), but only in the files
it checks; these tests cover every Python file of the repository, and the
reason, which mypy does not ask for.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import tokenize
from typing import Iterator

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .processes import ROOT

#: Directories that hold no code of ours (virtualenvs, build output).
SKIPPED_DIRS = frozenset({".git", "build", "dist", "node_modules", "__pycache__"})

#: A well-formed ignore: ``# type: ignore[code, code]  # reason``.
_WELL_FORMED = re.compile(
    r"#\s*type:\s*ignore\[[a-z][a-z-]*(?:\s*,\s*[a-z][a-z-]*)*\]\s+#\s*\S.*$"
)
_IGNORE = re.compile(r"#\s*type:\s*ignore\b")


def python_files(root: str = ROOT) -> Iterator[str]:
    """Every Python file of the repository (not virtualenvs or build output)."""
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d for d in dirs
            if d not in SKIPPED_DIRS and not d.startswith(".venv") and not d.startswith(".")
            and not d.endswith(".egg-info")
        )
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(directory, name)


def bad_ignores(source: str) -> list[tuple[int, str]]:
    """The ``# type: ignore`` comments in ``source`` without an error code
    or without a reason after it, as ``(line number, line)``.

    Comments only (found with :mod:`tokenize`): the words in a string or a
    docstring are not an ignore.
    """
    bad = []
    lines = source.splitlines()
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    for token in tokens:
        found = _IGNORE.search(token.string) if token.type == tokenize.COMMENT else None
        if found is None:
            continue
        # A comment token runs to the end of its line: the ignore and the
        # reason after it are one token.
        if not _WELL_FORMED.match(token.string[found.start():]):
            row = token.start[0]
            bad.append((row, lines[row - 1].strip()))
    return bad


class IgnoreCommentTests(SynchronousTestCase):
    """Every ``# type: ignore`` names its error code and says why."""

    def test_repository(self) -> None:
        """No Python file of the repository has an ignore without a code or
        without a reason on the same line."""
        found = []
        for path in python_files():
            with open(path, encoding="utf-8") as f:
                source = f.read()
            for row, line in bad_ignores(source):
                found.append(f"{os.path.relpath(path, ROOT)}:{row}: {line}")
        self.assertEqual(
            found, [],
            "write '# type: ignore[code]  # why' (or fix the type):\n" + "\n".join(found),
        )

    def test_files_found(self) -> None:
        """The walk sees the package, the tests and the plugin (a walk that
        found nothing would pass the check above)."""
        found = {os.path.relpath(p, ROOT) for p in python_files()}
        for expected in (
            os.path.join("twisted_forward", "site.py"),
            os.path.join("tests", "test_tooling.py"),
            os.path.join("twisted", "plugins", "openai_forward.py"),
        ):
            self.assertIn(expected, found)
        self.assertFalse([p for p in found if p.startswith(".venv")])

    def test_well_formed(self) -> None:
        """A code and a reason pass; several codes too."""
        self.assertEqual(bad_ignores(
            "x = f()  # type: ignore[attr-defined]  # zope adds it at runtime\n"
            "y = g()  # type: ignore[arg-type, union-attr]  # a stand-in\n"
        ), [])

    def test_no_code(self) -> None:
        """A bare ignore is refused, with or without a reason."""
        self.assertEqual(
            [row for row, _ in bad_ignores(
                "x = f()  # type: ignore\n"
                "y = g()  # type: ignore  # a reason\n"
                "z = h()  #type:ignore\n"
            )],
            [1, 2, 3],
        )

    def test_no_reason(self) -> None:
        """An ignore with its code but no reason is refused, as is an empty
        reason."""
        self.assertEqual(
            bad_ignores(
                "x = f()  # type: ignore[attr-defined]\n"
                "y = g()  # type: ignore[attr-defined]  #\n"
            ),
            [(1, "x = f()  # type: ignore[attr-defined]"),
             (2, "y = g()  # type: ignore[attr-defined]  #")],
        )

    def test_strings_are_not_comments(self) -> None:
        """The words inside a string are not an ignore."""
        self.assertEqual(bad_ignores('s = "# type: ignore"\n'), [])


def ci_checks() -> list[str]:
    """The mypy and ruff commands ``.ci/run`` runs, as written there."""
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    return [
        line.strip() for line in ci.splitlines()
        if line.strip().startswith(("mypy", "ruff "))
    ]


class LintCommandTests(SynchronousTestCase):
    """CI's type check and lint: in the README, and passing."""

    def test_readme_shows_ci_checks(self) -> None:
        """Each mypy and ruff command .ci/run runs is in the README,
        verbatim, so a developer runs what CI will."""
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        commands = ci_checks()
        self.assertTrue(any(c.startswith("mypy") for c in commands), commands)
        self.assertTrue(any(c.startswith("ruff ") for c in commands), commands)
        self.assertEqual([c for c in commands if c not in readme], [])

    def run_check(self, tool: str) -> None:
        """Run .ci/run's ``tool`` command from the repository's root, as CI
        does; its findings are the failure message."""
        if importlib.util.find_spec(tool) is None:
            # Installed by the "test" extra; an old venv may lack it.
            if os.environ.get("CI"):
                self.fail(f"{tool} is not installed (pip install '.[test]')")
            raise SkipTest(f"{tool} is not installed: pip install '.[test]'")
        (command,) = [c for c in ci_checks() if c.split()[0] == tool]
        result = subprocess.run(
            [sys.executable, "-m", *shlex.split(command)],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        self.assertEqual(
            result.returncode, 0,
            f"`{command}` (as CI runs it) failed:\n{result.stdout}{result.stderr}",
        )

    def test_mypy(self) -> None:
        """mypy passes over the package and the plugin (fix the types; see
        docs/typing.md)."""
        self.run_check("mypy")

    def test_ruff(self) -> None:
        """ruff passes over the tree (``ruff check --fix .`` sorts imports)."""
        self.run_check("ruff")
