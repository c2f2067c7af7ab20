"""
A chat page on another origin, in a real browser: Debian's headless Chromium
(driven by Playwright, as in :mod:`tests.test_admin_browser`) loads a small
HTML chat from a second loopback origin (a twisted.web static site on its own
port), whose script streams a chat through the real plugin with ``fetch()``
and a forward key.  The browser's preflight is answered by the proxy, the
stream's text appears on the page, and there is no console error.

Without Chromium or Playwright the test is skipped, except when the
environment variable CI is set: then it fails.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.web.server import Site
from twisted.web.static import File

from .harness import ProxyTestCase
from .test_admin_browser import WAIT_MS, launch, require_browser

FK = "fk-browser-page-0001"
REAL = "sk-browser-page-real-0001"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>chat</title><link rel="icon" href="data:,"></head>
<body>
<p>Status: <span id="status"></span> Done: <span id="done"></span></p>
<div id="out"></div>
<script>
const PROXY = %(proxy)s, KEY = %(key)s;
async function chat() {
  const res = await fetch(PROXY + "/v1/chat/completions", {
    method: "POST",
    headers: {"Authorization": "Bearer " + KEY, "Content-Type": "application/json"},
    body: JSON.stringify({model: "gpt-4o-mini", stream: true,
                          messages: [{role: "user", content: "Say hello"}]}),
  });
  document.getElementById("status").textContent = res.status;
  const reader = res.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") { document.getElementById("done").textContent = "yes"; continue; }
        const delta = JSON.parse(data).choices?.[0]?.delta?.content;
        if (delta) document.getElementById("out").textContent += delta;
      }
    }
  }
}
chat().catch(e => console.error("chat failed: " + e));
</script>
</body></html>
"""


def drive(page_url: str, folder: str) -> dict[str, Any]:
    """Open the chat page and wait for the streamed answer; runs in a thread."""
    from playwright.sync_api import sync_playwright

    seen: dict[str, Any] = {"console_errors": [], "page_errors": []}
    with sync_playwright() as p:
        context = launch(p, folder)
        try:
            page = context.new_page()
            page.on("console", lambda m: m.type == "error" and seen["console_errors"].append(
                m.text))
            page.on("pageerror", lambda e: seen["page_errors"].append(str(e)))
            page.goto(page_url)
            page.wait_for_function(
                "() => document.getElementById('done').textContent === 'yes'"
                " || document.getElementById('status').textContent !== ''",
                timeout=WAIT_MS,
            )
            try:
                page.wait_for_function(
                    "() => document.getElementById('done').textContent === 'yes'",
                    timeout=WAIT_MS,
                )
            except Exception as e:  # the assertions below say what went wrong
                seen["wait_error"] = str(e)
            seen["status"] = page.inner_text("#status")
            seen["text"] = page.inner_text("#out")
        finally:
            context.close()
    return seen


class CrossOriginPageTests(ProxyTestCase):
    """A chat page from another origin streams through the proxy."""

    timeout = 180

    def setUp(self) -> None:
        require_browser(self)
        return super().setUp()

    @defer.inlineCallbacks
    def test_page_streams_a_chat_through_the_proxy(self):
        """The page's fetch() with a forward key passes the browser's CORS
        checks (preflight answered by the proxy, never forwarded; the
        listed origin echoed on the stream), the streamed text is shown,
        and no console error is logged."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(folder, "www"))
        page_port = reactor.listenTCP(
            0, Site(File(os.path.join(folder, "www"))), interface="127.0.0.1"
        )
        self.addCleanup(page_port.stopListening)
        origin = f"http://127.0.0.1:{page_port.getHost().port}"
        base = yield self.start_proxy(
            OPENAI_API_KEY=REAL, FORWARD_KEY=FK, CORS_ORIGINS=f"{origin}, https://other.example"
        )
        with open(os.path.join(folder, "www", "chat.html"), "w") as f:
            f.write(PAGE % {"proxy": json.dumps(base), "key": json.dumps(FK)})

        seen = yield threads.deferToThread(drive, origin + "/chat.html", folder)

        self.assertEqual(seen["console_errors"], [])
        self.assertEqual(seen["page_errors"], [])
        self.assertNotIn("wait_error", seen)
        self.assertEqual(seen["status"], "200")
        self.assertEqual(seen["text"], self.fake.answer_text)
        # A request with Authorization is preflighted by the browser; only
        # the chat itself went upstream.
        self.assertEqual([s.method for s in self.fake.seen], [b"POST"])
        self.assertFalse(self.fake.seen[0].headers.hasHeader(b"origin"))
