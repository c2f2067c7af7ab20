"""
The admin page in a real browser: Debian's headless Chromium, driven by
Playwright for Python (``executable_path=/usr/bin/chromium``: Playwright
never downloads a browser of its own), against the real plugin in front of
the fake upstream.

The browser runs in a thread (Playwright's sync API), while the reactor
serves the proxy in the test's own thread.  It logs in, watches a key's
spend appear after requests are sent, sees a live figure change, opens one
conversation, and meanwhile records every console error and every request
URL: none may leave 127.0.0.1.  A screenshot is saved in the test's temp
folder (and copied where ``TF_ADMIN_SCREENSHOT`` says, for the README).

Without Chromium or Playwright the test is skipped, except when the
environment variable CI is set: then it fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer, threads

from .test_admin_api import ADMIN, AdminTestCase

CHROMIUM = os.environ.get("TF_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--disable-default-apps",
    "--disable-sync",
    "--metrics-recording-only",
    "--no-default-browser-check",
]
#: Milliseconds the page gets for each thing it must show.
WAIT_MS = 30_000

PEOPLE = {
    "alice": "fk-alice-admin-test-1",
    "bob": "fk-bob-admin-test-22",
}


def missing() -> str:
    """Why the browser test cannot run here, or ``""``."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed (pip install playwright)"
    return ""


def post_chat(base: str, key: str, text: str, model: str, stream: bool) -> int:
    """One chat request through the proxy, from the browser's thread."""
    body = {"model": model, "stream": stream,
            "messages": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": text}]}
    request = urllib.request.Request(
        base + "/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"authorization": "Bearer " + key, "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()
        return response.status


def require_browser(test: Any) -> None:
    """Skip ``test`` when Chromium or Playwright is missing, but fail it when
    CI is set: CI must really run the browser tests."""
    why = missing()
    if why:
        if os.environ.get("CI"):
            test.fail(f"CI is set and the browser test cannot run: {why}")
        test.skipTest(why)


def launch(playwright: Any, folder: str) -> Any:
    """Debian's headless Chromium with a fresh profile in ``folder``; the
    caller closes the context it returns."""
    return playwright.chromium.launch_persistent_context(
        tempfile.mkdtemp(prefix="profile-", dir=folder),
        executable_path=CHROMIUM,
        headless=True,
        args=FLAGS,
        viewport={"width": 1360, "height": 1500},
        service_workers="block",
    )


def drive(base: str, folder: str) -> dict[str, Any]:
    """Everything the browser does; runs in a thread.  Returns what it saw."""
    from playwright.sync_api import sync_playwright

    seen: dict[str, Any] = {"urls": [], "console_errors": [], "page_errors": []}
    with sync_playwright() as p:
        context = launch(p, folder)
        try:
            context.on("request", lambda r: seen["urls"].append(r.url))
            page = context.new_page()
            page.on("console", lambda m: m.type == "error" and seen["console_errors"].append(
                m.text))
            page.on("pageerror", lambda e: seen["page_errors"].append(str(e)))

            # Log in.
            page.goto(base + "/_admin/")
            page.wait_for_selector("#admin-key", state="visible", timeout=WAIT_MS)
            page.fill("#admin-key", ADMIN)
            page.click("#login-button")
            page.wait_for_selector("#app", state="visible", timeout=WAIT_MS)
            page.wait_for_function(
                "() => document.getElementById('live-requests-total').textContent !== '–'",
                timeout=WAIT_MS,
            )
            seen["requests_before"] = page.inner_text("#live-requests-total")
            seen["alice_row_before"] = page.query_selector(
                '#usage-table tbody tr[data-name="alice"]') is not None

            # Traffic.
            statuses = [
                post_chat(base, PEOPLE["alice"], "What is the capital of France?",
                          "gpt-4o-mini", False),
                post_chat(base, PEOPLE["alice"], "Name three penguin species.",
                          "gpt-4o-mini", True),
                post_chat(base, PEOPLE["alice"], "Write a haiku about proxies.",
                          "gpt-4o", False),
                post_chat(base, PEOPLE["bob"], "How many legs does an owl have?",
                          "gpt-4o-mini", False),
            ]
            seen["statuses"] = statuses

            # A live figure moves.
            page.wait_for_function(
                "before => document.getElementById('live-requests-total').textContent "
                "!== before", arg=seen["requests_before"], timeout=WAIT_MS,
            )
            seen["requests_after"] = page.inner_text("#live-requests-total")

            # Alice's spend appears (the table refreshes itself).
            page.wait_for_function(
                """() => {
                    const row = document.querySelector('#usage-table tbody tr[data-name="alice"]');
                    return row && row.querySelector('td.requests').textContent === '3'
                        && row.querySelector('td.cost_usd').textContent !== '$0';
                }""",
                timeout=WAIT_MS,
            )
            row = page.query_selector('#usage-table tbody tr[data-name="alice"]')
            seen["alice_spend"] = row.query_selector("td.cost_usd").inner_text()
            seen["alice_tokens"] = row.query_selector("td.total_tokens").inner_text()
            seen["bars"] = page.inner_text("#bars-key")

            # Default-key health and limits remaining (refreshed by itself).
            page.wait_for_selector('#default-keys-table tr[data-key="default#0"]',
                                   timeout=WAIT_MS)
            page.wait_for_function(
                "() => document.getElementById('forward-keys-table').textContent"
                ".includes('rpm 57 of 60')", timeout=WAIT_MS,
            )
            seen["health"] = page.inner_text("#default-keys-table")
            seen["limits"] = page.inner_text("#forward-keys-table")

            # Search the exchanges and open one conversation.
            page.fill("#exchanges-q", "penguin")
            page.click("#exchanges-form button[type=submit]")
            page.wait_for_function(
                "() => document.querySelectorAll('#exchanges-table tbody tr.exchange')"
                ".length === 1", timeout=WAIT_MS,
            )
            page.click("#exchanges-table tbody tr.exchange")
            page.wait_for_selector("#conversation", state="visible", timeout=WAIT_MS)
            page.wait_for_function(
                "() => document.getElementById('conversation-messages').textContent"
                ".includes('Hello from the fake upstream')", timeout=WAIT_MS,
            )
            seen["conversation"] = page.inner_text("#conversation")

            # The live chart has drawn the requests, then the picture.
            page.wait_for_function(
                "() => !/^\\(peak 0(\\.0)?\\)$/.test(document.getElementById('rps-max').textContent)",
                timeout=WAIT_MS,
            )
            shot = os.path.join(folder, "admin.png")
            page.screenshot(path=shot, full_page=True)
            seen["screenshot"] = shot
            seen["session_key_kept"] = page.evaluate(
                "() => sessionStorage.getItem('twisted-forward-admin-key') !== null")
            seen["local_storage_empty"] = page.evaluate("() => localStorage.length === 0")
            seen["cookies"] = context.cookies()
        finally:
            context.close()
    return seen


class BrowserTests(AdminTestCase):
    """The admin page, in headless Chromium."""

    timeout = 240

    def setUp(self) -> None:
        require_browser(self)
        return super().setUp()

    @defer.inlineCallbacks
    def test_login_spend_live_conversation_offline(self):
        """Logs in, sees alice's spend appear after her requests, a live
        figure change, opens the one conversation a search finds; no console
        error, no request to anywhere but the proxy, no secret on the page."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        yield self.start_admin(
            LOG_CHAT="true", LOG_DIR=os.path.join(folder, "Log"),
            DATA_DIR=os.path.join(folder, "data"),
            KEY_POLICY=json.dumps({"alice": {"rpm": 60, "usd_per_day": 2}}),
            # A moving window: no minute turns between the requests and the look.
            RATE_LIMIT_STRATEGY="moving-window",
        )
        seen = yield threads.deferToThread(drive, self.base, folder)

        self.assertEqual(seen["statuses"], [200, 200, 200, 200])
        self.assertEqual(seen["console_errors"], [])
        self.assertEqual(seen["page_errors"], [])
        hosts = {urlsplit(url).hostname for url in seen["urls"]}
        self.assertTrue(seen["urls"])
        self.assertLessEqual(hosts, {"127.0.0.1", "localhost"}, seen["urls"])
        self.assertFalse(seen["alice_row_before"])
        self.assertNotEqual(seen["requests_after"], seen["requests_before"])
        self.assertRegex(seen["alice_spend"], r"^\$0\.0*[1-9]")
        self.assertIn("alice", seen["bars"])
        self.assertIn("default#0", seen["health"])
        self.assertIn("ok", seen["health"])
        self.assertIn("rpm", seen["limits"])
        self.assertIn("Name three penguin species.", seen["conversation"])
        self.assertIn("Answer briefly.", seen["conversation"])
        self.assertTrue(seen["session_key_kept"])
        self.assertTrue(seen["local_storage_empty"])
        self.assertEqual(seen["cookies"], [])
        self.assertTrue(os.path.getsize(seen["screenshot"]) > 10_000)
        for secret in [ADMIN] + list(PEOPLE.values()):
            for text in (seen["conversation"], seen["limits"], seen["health"], seen["bars"]):
                self.assertNotIn(secret, text)
        copy_to = os.environ.get("TF_ADMIN_SCREENSHOT")
        if copy_to:
            shutil.copyfile(seen["screenshot"], copy_to)
