"""
openai-forward 0.8.1's settings without a twin here: each honoured with its
0.8.1 meaning or refused in one line; unknown variables that look like ours
are warned about with the closest known name.
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.config import ConfigError, load_config
from twisted_forward.migration import ONLY_FALSE, REPLACED, REPLACED_IN_FILE, unknown_names

from .harness import ProxyTestCase
from .processes import assert_exit, child_env, spawn_twistd
from .test_reload import write_env

#: Every variable openai-forward 0.8.1 reads (its settings.py, config/,
#: content/, webui/ and __main__.py), as its wheel has them.
NAMES_081 = (
    "BENCHMARK_MODE", "CACHE_BACKEND", "CACHE_GENERAL", "CACHE_OPENAI",
    "CACHE_ROOT_PATH_OR_URL", "CACHE_ROUTES", "CHAT_COMPLETION_ROUTE", "COMPLETION_ROUTE",
    "CUSTOM_GENERAL_ROUTE", "DEFAULT_REQUEST_CACHING_VALUE", "DEFAULT_STREAM_RESPONSE",
    "EMBEDDING_ROUTE", "FORWARD_CONFIG", "FORWARD_KEY_CONFIG", "GLOBAL_RATE_LIMIT",
    "IP_BLACKLIST", "IP_WHITELIST", "ITER_CHUNK_TYPE", "LEVEL_MODELS", "LOG_CACHE_DB_INFO",
    "LOG_GENERAL", "LOG_OPENAI", "OPENAI_API_KEY_CONFIG", "OPENAI_FORWARD_HOST",
    "OPENAI_FORWARD_WEBUI", "PRINT_CHAT", "PROXY", "RATE_LIMIT_STRATEGY", "REQ_RATE_LIMIT",
    "REQ_RATE_LIMIT_BACKEND", "TIMEOUT", "TOKEN_RATE_LIMIT", "TZ", "WEBUI_LOG_PORT",
    "WEBUI_RESTART_PORT", "ssl_certfile", "ssl_keyfile",
)

GENERAL = json.dumps([{"base_url": "https://api.openai.com", "route": "/"},
                      {"base_url": "https://example.com", "route": "/g", "type": "general"}])


def load(**env: str):
    return load_config({}, env)


class NamesTests(SynchronousTestCase):
    """Each 0.8.1 name, on the configuration it makes."""

    def test_log_openai(self) -> None:
        """LOG_OPENAI=false turns the chat records off; LOG_CHAT, if given, wins."""
        self.assertFalse(load(LOG_OPENAI="false").log_chat)
        self.assertTrue(load(LOG_OPENAI="true").log_chat)
        self.assertTrue(load(LOG_OPENAI="false", LOG_CHAT="true").log_chat)

    def test_timeout_is_the_connect_timeout(self) -> None:
        """0.8.1's TIMEOUT was aiohttp's connect timeout."""
        self.assertEqual(load(TIMEOUT="3").connect_timeout, 3.0)
        self.assertEqual(load(TIMEOUT="3", CONNECT_TIMEOUT="4").connect_timeout, 4.0)
        with self.assertRaises(ConfigError) as caught:
            load(TIMEOUT="soon")
        self.assertEqual(str(caught.exception),
                         "TIMEOUT (--timeout): 'soon' is not a number of seconds")

    def test_print_chat(self) -> None:
        """The 0.8.1 setting PRINT_CHAT=true turns on printing chats to the log; unset, it
        is off."""
        self.assertTrue(load(PRINT_CHAT="true").print_chat)
        self.assertFalse(load().print_chat)

    def test_log_general(self) -> None:
        """false is how this proxy works; true with a general route is refused."""
        load(LOG_GENERAL="false", FORWARD_CONFIG=GENERAL)
        load(LOG_GENERAL="true")  # no general route: nothing to record
        with self.assertRaises(ConfigError) as caught:
            load(LOG_GENERAL="true", FORWARD_CONFIG=GENERAL)
        self.assertTrue(str(caught.exception).startswith(
            "LOG_GENERAL (--log-general): general routes are relayed as they are"))

    def test_benchmark_mode(self) -> None:
        """BENCHMARK_MODE=false is accepted, but BENCHMARK_MODE=true stops start-up with a
        line saying answering without the upstream is gone."""
        load(BENCHMARK_MODE="false")
        with self.assertRaises(ConfigError) as caught:
            load(BENCHMARK_MODE="true")
        self.assertTrue(str(caught.exception).startswith(
            "BENCHMARK_MODE (--benchmark-mode): answering without the upstream"))

    def test_replaced_names_are_refused(self) -> None:
        """Every 0.8.1 name with no meaning here stops start-up with one line
        naming its replacement, from the environment or the .env file; TZ
        only from the .env file (in the environment it is the system's)."""
        for name, why in REPLACED.items():
            for environ, env_file in (({name: "x"}, {}), ({}, {name: "x"})):
                with self.assertRaises(ConfigError) as caught:
                    load_config({}, environ, env_file)
                message = str(caught.exception)
                self.assertEqual(
                    message, f"{name}: an openai-forward 0.8.1 setting not read here: {why}")
                self.assertNotIn("\n", message)
        load_config({}, {"TZ": "Asia/Shanghai"}, {})
        with self.assertRaises(ConfigError) as caught:
            load_config({}, {}, {"TZ": "Asia/Shanghai"})
        self.assertIn("UTC", str(caught.exception))

    def test_only_false_names(self) -> None:
        """DEFAULT_STREAM_RESPONSE and LOG_CACHE_DB_INFO are accepted when
        false (what this proxy does) and refused in one line when true,
        not warned about as typos."""
        for name, why in ONLY_FALSE.items():
            load_config({}, {name: "false"}, {})
            load_config({}, {}, {name: "False"})
            self.assertEqual(unknown_names([], {name: "false"}, {}), [])
            for environ, env_file in (({name: "True"}, {}), ({}, {name: "true"})):
                with self.assertRaises(ConfigError) as caught:
                    load_config({}, environ, env_file)
                self.assertEqual(
                    str(caught.exception),
                    f"{name}: an openai-forward 0.8.1 setting not read here: {why}")

    def test_every_081_name_is_handled(self) -> None:
        """Each variable openai-forward 0.8.1 reads is a setting here, or
        refused (always, in the .env file, or unless false), and the
        README's migration table names it."""
        from twisted_forward.config import SETTINGS

        from .test_readme import readme_text

        handled = {s.env for s in SETTINGS} | set(REPLACED) | set(REPLACED_IN_FILE) | set(ONLY_FALSE)
        self.assertEqual([n for n in NAMES_081 if n not in handled], [])
        section = readme_text().split("\n## Coming from openai-forward\n", 1)[1].split("\n## ", 1)[0]
        self.assertEqual([n for n in NAMES_081 if f"`{n}`" not in section], [],
                         "0.8.1 names missing from README.md's migration table")

    def test_every_setting_has_its_typo_prefix(self) -> None:
        """Every setting named in more than one word starts with a prefix
        the typo warning watches, so a typo of it (LIMITS_STORE_TIMOUT) is
        warned about with the right name."""
        from twisted_forward.config import SETTINGS
        from twisted_forward.migration import FILE_ONLY_PREFIXES, PREFIXES

        unwatched = [s.env for s in SETTINGS
                     if "_" in s.env and not s.env.startswith(PREFIXES + FILE_ONLY_PREFIXES)]
        self.assertEqual(unwatched, [])
        found = unknown_names([s.env for s in SETTINGS], {"LIMITS_STORE_TIMOUT": "1"},
                              {"DATABASE_ULR": "postgresql://x"})
        self.assertEqual(found, [("LIMITS_STORE_TIMOUT", "the environment", "LIMITS_STORE_TIMEOUT"),
                                 ("DATABASE_ULR", "the .env file", "DATABASE_URL")])

    def test_unknown_names(self) -> None:
        """A typo of ours is named with the closest known name; the SDK's
        OPENAI_* in the environment are left alone."""
        found = unknown_names(
            ["FORWARD_KEY", "OPENAI_API_KEY"],
            {"FORWARD_KYE": "x", "OPENAI_ORG_ID": "o", "HOME": "/"},
            {"OPENAI_API_KYE": "y"},
        )
        self.assertEqual(found, [("FORWARD_KYE", "the environment", "FORWARD_KEY"),
                                 ("OPENAI_API_KYE", "the .env file", "OPENAI_API_KEY")])


class MigratedEnvTests(ProxyTestCase):
    """A 0.8.1 .env, with a real twistd."""

    timeout = 60

    @defer.inlineCallbacks
    def test_log_openai_false_print_chat_and_a_typo(self):
        """LOG_OPENAI=false: no chat record file; PRINT_CHAT=true: the chat
        is a log line; FORWARD_KYE: warned, with the name meant."""
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        write_env(os.path.join(cwd, ".env"), LOG_OPENAI="false", PRINT_CHAT="true",
                  LOG_GENERAL="false", TIMEOUT="5", FORWARD_KYE="fk-typo-typo-typo")
        env = child_env(OPENAI_API_KEY="sk-migration-test-key",
                        OPENAI_BASE_URL=f"http://127.0.0.1:{self.upstream_port}")
        del env["LOG_CHAT"]  # the .env's LOG_OPENAI=false must be what turns records off
        process = spawn_twistd(
            self, ["-n", "--pidfile=", "openai-forward", "--port", "tcp:0:interface=127.0.0.1"],
            env, cwd,
        )
        port = int((yield process.wait_for(r"ForwardSite starting on (\d+)")).group(1))
        response = yield self.client.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={b"content-type": [b"application/json"]},
        )
        yield response.content()
        self.assertEqual(response.code, 200)
        yield process.wait_for(r"chat \{.*" + self.fake.answer_text)
        yield self.pool.closeCachedConnections()
        process.signal("TERM")
        yield process.exited()
        assert_exit(self, process, 0)
        self.assertIn("unknown setting FORWARD_KYE in the .env file: ignored; did you mean "
                      "FORWARD_KEY?", process.output)
        self.assertFalse(os.path.exists(os.path.join(cwd, "Log")))
        self.assertNotIn("sk-migration-test-key", process.output)
