"""
A watch over every end-to-end test: no configured key (default, forward or admin)
and no password of a store URL (DATABASE_URL, REDIS_URL, the cache's Redis URL)
in any log event, in any byte the proxy sends to a client (answers, /metrics,
the admin page and API) or in any chat record it wrote to LOG_DIR; no forward key,
no admin key and no client-identifying header in any request the fake
upstream receives.

``tests/harness.py`` wraps ``ProxyTestCase.start_service`` with
:func:`watch_secrets`, so every test that starts the plugin is checked when
it ends, whatever it was testing.
"""

from __future__ import annotations

import functools
import glob
import os
from typing import Any, Callable, Iterable, Optional
from urllib.parse import unquote, urlsplit

from twisted.application.service import IServiceCollection
from twisted.internet import defer
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_forward.headers import CLIENT_IDENTIFYING
from twisted_forward.tap import ProxyService


def secret_patterns(secret: str) -> list[bytes]:
    """What counts as a leak of ``secret``: the key, or its part after the
    prefix (what an echo of the key with a masked prefix would show)."""
    key = secret.encode("utf-8")
    patterns = [key]
    if len(key) - 3 >= 8:
        patterns.append(key[3:])
    return patterns


def url_password(url: Optional[str]) -> Optional[str]:
    """The password in a store URL (``postgresql://u:pw@h/db``), if any."""
    if not url:
        return None
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


def chat_record_bytes(log_dir: Optional[str]) -> bytes:
    """Everything the proxy wrote to its chat record files."""
    if not log_dir or not os.path.isdir(log_dir):
        return b""
    out = []
    for name in sorted(glob.glob(os.path.join(log_dir, "**", "*"), recursive=True)):
        if os.path.isfile(name):
            with open(name, "rb") as f:
                out.append(f.read())
    return b"\n".join(out)


def describe_event(event: LogEvent) -> str:
    """Everything of a log event an observer could write: its text, its
    fields, and a failure's traceback."""
    parts = [formatEvent(event), repr(event)]
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        parts.append(failure.getTraceback())
    return "\n".join(parts)


@implementer(ILogObserver)
class SecretsWatch:
    """Collects what one test's proxy logged, sent, and had forwarded."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []
        self.written: list[bytes] = []
        self.default_keys: tuple[str, ...] = ()
        self.forward_keys: tuple[str, ...] = ()
        self.admin_key: Optional[str] = None
        self.passwords: tuple[tuple[str, str], ...] = ()
        self.log_dir: Optional[str] = None
        globalLogPublisher.addObserver(self)

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def attach(self, test: Any) -> None:
        """Learn the test proxy's keys and tap the bytes it writes."""
        [service] = [
            s for s in IServiceCollection(test.service) if isinstance(s, ProxyService)
        ]
        self.default_keys = tuple(service.config.default_keys)
        self.forward_keys = tuple(k.key for k in service.config.forward_keys)
        self.admin_key = service.config.admin_key
        config = service.config
        urls = [
            ("DATABASE_URL", getattr(config, "database_url", None)),
            ("REDIS_URL", getattr(getattr(config, "policy", None), "redis_url", None)),
            ("the cache's Redis URL", getattr(getattr(config, "cache", None), "redis_url", None)),
        ]
        self.passwords = tuple(
            (name, password) for name, password in
            ((name, url_password(url)) for name, url in urls) if password
        )
        self.log_dir = config.log_dir if getattr(config, "log_chat", True) else None
        written = self.written

        def tap(transport: Any) -> None:
            # What the proxy writes to a client, seen on the real transport:
            # a ProtocolWrapper in between would hide the TCP transport from
            # the proxy (its send_now and producers), so the end-to-end tests
            # would no longer run what production runs.
            write, write_sequence = transport.write, transport.writeSequence

            def tapped_write(data: bytes) -> Any:
                written.append(bytes(data))
                return write(data)

            def tapped_write_sequence(seq: Iterable[bytes]) -> Any:
                seq = list(seq)
                written.extend(bytes(d) for d in seq)
                return write_sequence(seq)

            transport.write = tapped_write
            transport.writeSequence = tapped_write_sequence

        test.proxy_tracker.on_connect.append(tap)

    def leaks(self, test: Any) -> list[str]:
        """Where a secret or an identifying header showed up; empty if nowhere."""
        found = []
        secrets = [("default key", i, s) for i, s in enumerate(self.default_keys)]
        secrets += [("forward key", i, s) for i, s in enumerate(self.forward_keys)]
        if self.admin_key:
            secrets.append(("admin key", 0, self.admin_key))
        records = chat_record_bytes(self.log_dir)
        # Case-blind: Twisted writes header names title-cased, so a key
        # echoed in a header name goes out as "Sk-Abc…".
        sent = b"".join(self.written).lower()
        logged = [(e, describe_event(e)) for e in self.events]
        for kind, index, secret in secrets:
            for pattern in secret_patterns(secret):
                if pattern.lower() in sent:
                    found.append(f"{kind} #{index} in the bytes sent to a client")
                if pattern in records:
                    found.append(f"{kind} #{index} in a chat record")
                text = pattern.decode("utf-8")
                for event, description in logged:
                    if text in description:
                        found.append(
                            f"{kind} #{index} in a log event ({event.get('log_format')!r})"
                        )
        # A password is looked for whole (a short one would match anything).
        for name, password in self.passwords:
            if len(password) < 8:
                continue
            raw = password.encode("utf-8")
            if raw.lower() in sent:
                found.append(f"{name}'s password in the bytes sent to a client")
            if raw in records:
                found.append(f"{name}'s password in a chat record")
            for event, description in logged:
                if password in description:
                    found.append(f"{name}'s password in a log event ({event.get('log_format')!r})")
        fake = getattr(test, "fake", None)
        for seen in getattr(fake, "seen", ()):
            for name, values in seen.headers.getAllRawHeaders():
                if name.lower() in CLIENT_IDENTIFYING | {b"cookie", b"cookie2"}:
                    found.append(f"header {name!r} reached the upstream")
                for index, key in enumerate(self.forward_keys):
                    if any(key.encode("utf-8") in v for v in values):
                        found.append(f"forward key #{index} reached the upstream")
                if self.admin_key and any(self.admin_key.encode("utf-8") in v for v in values):
                    found.append("the admin key reached the upstream")
        return found

    def check(self, test: Any) -> None:
        """Fail ``test`` if anything leaked."""
        globalLogPublisher.removeObserver(self)
        found = self.leaks(test)
        if found:
            test.fail("secrets watch: " + "; ".join(sorted(set(found))))


def watch_secrets(start_service: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``ProxyTestCase.start_service`` so the test is watched."""

    @functools.wraps(start_service)
    @defer.inlineCallbacks
    def start_watched(test: Any, *args: Any, **kwargs: Any) -> Any:
        watch = SecretsWatch()
        test.secrets_watch = watch
        # Added before start_service adds its own cleanup, so it runs after
        # the proxy stopped: shutdown's log lines are checked too.
        test.addCleanup(watch.check, test)
        listening = yield start_service(test, *args, **kwargs)
        watch.attach(test)
        return listening

    return start_watched
