"""
The README works as written: its quick start and its Python client example
run against the fake upstream, and its settings table lists exactly the
settings the code knows.

The README marks the code blocks these tests run with a comment on the line
before the block's fence: ``<!-- readme-test: NAME -->``.
"""

from __future__ import annotations

import os
import re
import shlex

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.config import SETTINGS

from .harness import ProxyTestCase
from .processes import ROOT

README = os.path.join(ROOT, "README.md")

#: Stands for the README's ``sk-...``: a key the secrets watch can look for.
REAL_KEY = "sk-readme-quick-start-real-key-0123456789"


def readme_text() -> str:
    """The README, as a newcomer reads it."""
    with open(README, encoding="utf-8") as f:
        return f.read()


def markdown_pages() -> list[tuple[str, str]]:
    """(path, text) of README.md and every page in docs/."""
    docs = os.path.join(os.path.dirname(README), "docs")
    pages = [README] + [
        os.path.join(docs, name) for name in sorted(os.listdir(docs)) if name.endswith(".md")
    ]
    out = []
    for page in pages:
        with open(page, encoding="utf-8") as f:
            out.append((page, f.read()))
    return out


def marked_block(name: str, text: str = "") -> str:
    """The code block right after ``<!-- readme-test: NAME -->``."""
    text = text or readme_text()
    match = re.search(
        r"<!-- readme-test: " + re.escape(name) + r" -->\n```[a-z]*\n(.*?)\n```", text, re.S
    )
    if match is None:
        raise AssertionError(f"README.md has no code block marked readme-test: {name}")
    return match.group(1)


def quick_start() -> tuple[dict[str, str], list[str]]:
    """The quick start's exported settings and its twistd command line."""
    env: dict[str, str] = {}
    twistd: list[str] = []
    for line in marked_block("quick-start").splitlines():
        words = shlex.split(line)
        if words[:1] == ["export"]:
            name, _, value = words[1].partition("=")
            env[name] = value
        elif words[:1] == ["twistd"]:
            twistd = words
    return env, twistd


class QuickStartTests(ProxyTestCase):
    """The quick start's settings and client example, against the fake upstream."""

    @defer.inlineCallbacks
    def start_quick_start(self):
        """Start the plugin as the quick start does (port 0 for its port)."""
        env, twistd = quick_start()
        self.assertEqual(env["OPENAI_API_KEY"], "sk-...", "the quick start's placeholder moved")
        env["OPENAI_API_KEY"] = REAL_KEY
        self.assertIn("--port", twistd)
        port = twistd[twistd.index("--port") + 1]
        self.readme_port = int(port.split(":")[1])
        log_dir = self.mktemp()
        yield self.start_service(
            re.sub(r"^tcp:\d+:", "tcp:0:", port), LOG_CHAT="true", LOG_DIR=log_dir, **env
        )
        self.base = f"http://127.0.0.1:{self.listening_port.getHost().port}"
        return env

    @defer.inlineCallbacks
    def test_quick_start_listens_on_loopback(self):
        """The quick start binds 127.0.0.1 only, not every interface."""
        yield self.start_quick_start()
        self.assertEqual(self.listening_port.getHost().host, "127.0.0.1")

    @defer.inlineCallbacks
    def test_quick_start_is_not_an_open_relay(self):
        """With the quick start's settings a request without the forward key gets 401."""
        yield self.start_quick_start()
        response = yield self.client.get(self.base + "/v1/models")
        yield response.content()
        self.assertEqual(response.code, 401)
        self.assertEqual(self.fake.seen, [])

    @defer.inlineCallbacks
    def test_python_client_example(self):
        """The README's Python example prints the answer, sent with the real key."""
        env = yield self.start_quick_start()
        code = marked_block("python-client")
        self.assertIn(f'api_key="{env["FORWARD_KEY"]}"', code)
        self.assertIn(f"127.0.0.1:{self.readme_port}", code)
        code = code.replace(f"127.0.0.1:{self.readme_port}", self.base[len("http://"):])
        printed: list[str] = []

        def capture(*args: object, end: str = "\n", **kwargs: object) -> None:
            printed.append(" ".join(map(str, args)) + end)

        def run() -> None:
            exec(compile(code, "README.md:python-client", "exec"), {"print": capture})

        yield deferToThread(run)
        self.assertEqual("".join(printed), self.fake.answer_text)
        [seen] = self.fake.seen
        self.assertEqual(seen.header(b"authorization"), b"Bearer " + REAL_KEY.encode())


def table_settings(text: str) -> dict[str, str]:
    """The README configuration table's rows: env name to option."""
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `([A-Z0-9_]+)` \| `--([a-z0-9-]+)` \|", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def heading_anchors(path: str) -> set[str]:
    """The anchors GitHub gives the headings of the Markdown file ``path``."""
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"^```.*?^```", "", f.read(), flags=re.S | re.M)
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        if anchor in seen:
            seen[anchor] += 1
            anchor = f"{anchor}-{seen[anchor]}"
        else:
            seen[anchor] = 0
        anchors.add(anchor)
    return anchors


class SettingsTableTests(SynchronousTestCase):
    """The README's configuration table against config.SETTINGS."""

    def test_table_lists_every_setting(self):
        """Every setting the code knows has a row, with its option."""
        rows = table_settings(readme_text())
        missing = [s.env for s in SETTINGS if s.env not in rows]
        self.assertEqual(missing, [], "settings missing from README.md's configuration table")
        wrong = [(s.env, rows[s.env], s.option) for s in SETTINGS if rows[s.env] != s.option]
        self.assertEqual(wrong, [], "README rows naming the wrong option")

    def test_table_lists_only_known_settings(self):
        """No row names a setting the code does not know."""
        known = {s.env for s in SETTINGS}
        extra = sorted(set(table_settings(readme_text())) - known)
        self.assertEqual(extra, [], "README.md's configuration table names unknown settings")

    def test_links_to_files_exist(self):
        """Every relative link in README.md and docs/ names a file that exists."""
        root = os.path.dirname(README)
        broken = []
        for page, text in markdown_pages():
            for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
                if re.match(r"[a-z]+:", target):
                    continue
                if not os.path.exists(os.path.join(os.path.dirname(page), target)):
                    broken.append((os.path.relpath(page, root), target))
        self.assertEqual(broken, [], "links to files that do not exist")

    def test_link_anchors_exist(self):
        """Every ``#anchor`` a link in README.md or docs/ names (in the same
        page or another) is a heading of that page, as GitHub makes anchors."""
        root = os.path.dirname(README)
        broken = []
        for page, text in markdown_pages():
            for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
                if re.match(r"[a-z]+:", target):
                    continue
                linked = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target else page
                if os.path.exists(linked) and anchor not in heading_anchors(linked):
                    broken.append((os.path.relpath(page, root), f"{target}#{anchor}"))
        self.assertEqual(broken, [], "links to headings that do not exist")

    def test_heading_anchors(self):
        """Anchors are made as GitHub makes them: lower case, punctuation
        dropped, spaces to hyphens, repeats numbered; code blocks skipped."""
        path = os.path.join(self.mktemp())
        with open(path, "w", encoding="utf-8") as f:
            f.write("# A b\n## More than one core: `--workers N`\n```sh\n# not a heading\n```\n## A b\n")
        self.assertEqual(
            heading_anchors(path), {"a-b", "more-than-one-core---workers-n", "a-b-1"}
        )

    def test_marked_block_found(self):
        """The block extractor finds a marked block and refuses a missing one."""
        text = "x\n<!-- readme-test: a -->\n```sh\necho 1\n```\n"
        self.assertEqual(marked_block("a", text), "echo 1")
        self.assertRaises(AssertionError, marked_block, "b", text)
