"""Option parsing and configuration loading."""

from __future__ import annotations

import ipaddress
import os

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.config import (
    ConfigError,
    Route,
    UpstreamURL,
    load_config,
    parse_size,
)
from twisted_forward.tap import Options, load


def _load(args=(), env=None, env_file=None):
    options = Options()
    options.parseOptions(["--env-file", os.devnull, *args])
    return load_config(options.setting_values(), env or {}, env_file)


class OptionsTests(SynchronousTestCase):
    def test_port_number_means_tcp(self):
        """A bare --port number means TCP on all interfaces with a backlog of 1024."""
        options = Options()
        options.parseOptions(["--port", "9999"])
        self.assertEqual(options["endpoint"], "tcp:9999:backlog=1024")

    def test_port_default(self):
        """Without --port the proxy listens on TCP 8000, all interfaces, backlog 1024."""
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["endpoint"], "tcp:8000:backlog=1024")

    def test_port_endpoint_string_kept(self):
        """An endpoint string for --port is kept as written; TCP and SSL get backlog=1024
        unless they set their own, unix and systemd get nothing added."""
        for port, endpoint in (
            ("tcp:9999:interface=127.0.0.1", "tcp:9999:interface=127.0.0.1:backlog=1024"),
            ("tcp:9999:backlog=10", "tcp:9999:backlog=10"),
            ("ssl:443:privateKey=k.pem", "ssl:443:privateKey=k.pem:backlog=1024"),
            ("unix:/tmp/x.sock", "unix:/tmp/x.sock"),
            ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
        ):
            options = Options()
            options.parseOptions(["--port", port])
            self.assertEqual(options["endpoint"], endpoint)

    def test_port_out_of_range(self):
        """A port number above 65535 is a usage error at option parsing."""
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--port", "70000"])

    def test_every_setting_has_an_option(self):
        """A setting given as a twistd option (--read-timeout, --route-prefix) reaches the
        config, normalised (seconds as a number, the prefix with a leading slash)."""
        options = Options()
        options.parseOptions(["--read-timeout", "5", "--route-prefix", "openai/"])
        self.assertEqual(options["read-timeout"], "5")
        config = load(options, {})
        self.assertEqual(config.read_timeout, 5.0)
        self.assertEqual(config.routes[0].prefix, "/openai")


class LoadTests(SynchronousTestCase):
    def test_defaults(self):
        """With nothing set: one OpenAI route to https://api.openai.com, no keys, chat
        records on in ./Log, timeouts 10/600/300 s, a 512 MiB body cap and 64 KiB /
        100-line upstream head caps."""
        config = _load()
        self.assertEqual(
            config.routes, (Route("", UpstreamURL("https", "api.openai.com", ""), "openai"),)
        )
        self.assertEqual(config.default_keys, ())
        self.assertTrue(config.log_chat)
        self.assertEqual(config.log_dir, "Log")
        self.assertEqual(
            (config.connect_timeout, config.read_timeout, config.idle_timeout), (10, 600, 300)
        )
        self.assertEqual(config.max_request_body, 512 * 1024 * 1024)
        self.assertEqual((config.max_upstream_head, config.max_upstream_headers), (65536, 100))

    def test_precedence_options_env_dotenv(self):
        """A twistd option wins over the environment, which wins over the .env file; a
        setting only in .env is still read."""
        env_file = {"READ_TIMEOUT": "1", "IDLE_TIMEOUT": "2", "CONNECT_TIMEOUT": "3"}
        env = {"READ_TIMEOUT": "10", "IDLE_TIMEOUT": "20"}
        config = _load(["--read-timeout", "100"], env, env_file)
        self.assertEqual(config.read_timeout, 100)
        self.assertEqual(config.idle_timeout, 20)
        self.assertEqual(config.connect_timeout, 3)

    def test_dotenv_file_read(self):
        """--env-file names the .env file whose keys and route prefix are loaded."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("OPENAI_API_KEY=sk-a,sk-b\nROUTE_PREFIX=/v\n")
        options = Options()
        options.parseOptions(["--env-file", path])
        config = load(options, {})
        self.assertEqual(config.default_keys, ("sk-a", "sk-b"))
        self.assertEqual(config.routes[0].prefix, "/v")

    def test_lists_split_on_space_and_comma(self):
        """List settings split on spaces, commas or both, ignoring empty items, so keys and
        networks can be written either way."""
        config = _load(env={"OPENAI_API_KEY": " sk-a, sk-b  sk-c,", "IP_BLACKLIST": "10.0.0.0/8 ::1"})
        self.assertEqual(config.default_keys, ("sk-a", "sk-b", "sk-c"))
        self.assertEqual(
            config.ip_blacklist,
            (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1")),
        )

    def test_base_url_with_path(self):
        """OPENAI_BASE_URL with a port and a path keeps both, the trailing slash dropped."""
        config = _load(env={"OPENAI_BASE_URL": "https://example.com:8443/openai/"})
        self.assertEqual(config.routes[0].base, UpstreamURL("https", "example.com:8443", "/openai"))

    def test_forward_config(self):
        """FORWARD_CONFIG's JSON rows become routes in order, a bare route name gaining its
        slash and an IPv6 host kept bracketed."""
        config = _load(
            env={
                "FORWARD_CONFIG": '[{"base_url": "http://127.0.0.1:1", "route": "/", "type": "openai"},'
                ' {"base_url": "http://[::1]:2", "route": "gemini", "type": "general"}]'
            }
        )
        self.assertEqual(
            config.routes,
            (
                Route("", UpstreamURL("http", "127.0.0.1:1", ""), "openai"),
                Route("/gemini", UpstreamURL("http", "[::1]:2", ""), "general"),
            ),
        )

    def test_forward_key_labels(self):
        """Forward keys get their given label, else fk#<position> for short keys (a hash of
        one could be brute-forced) or fk#<8 hex of its SHA-256> for long ones; no key is
        in the config's repr."""
        long_key = "fk-" + "7d1c0b9e51a8e2f4c3b6a9d0"
        config = _load(
            env={"OPENAI_API_KEY": "sk-a", "FORWARD_KEY": f"alice:fk-alice-123, fk-anon-4567 {long_key}"}
        )
        import hashlib

        self.assertEqual(
            [k.label for k in config.forward_keys],
            # short keys by position: a hash prefix of one could be brute-forced
            ["alice", "fk#2", "fk#" + hashlib.sha256(long_key.encode()).hexdigest()[:8]],
        )
        self.assertNotIn("fk-anon", repr(config))
        self.assertNotIn("sk-a", repr(config))

    def test_bad_settings_name_the_setting(self):
        """Every bad value of every setting raises a ConfigError of one line starting with
        the setting's name, so start-up stops with a message an operator can act on."""
        cases = {
            "OPENAI_BASE_URL": ["ftp://x", "not a url", "http://", "https://u:p@h", "http://h:99999"],
            "READ_TIMEOUT": ["soon", "-1", "0", "inf"],
            "CONNECT_TIMEOUT": ["nan"],
            "IP_WHITELIST": ["10.0.0.300", "10.0.0.0/33", "localhost"],
            "TRUSTED_PROXIES": ["1.2.3"],
            "MAX_REQUEST_BODY": ["big", "0", "12 parsecs"],
            "MAX_UPSTREAM_HEAD": ["big", "0"],
            "MAX_UPSTREAM_HEADERS": ["many", "0", "-3", "1.5"],
            "LOG_CHAT": ["maybe"],
            "FORWARD_KEY": ["sk-notforward"],
            "FORWARD_CONFIG": ["{", "[]", '[{"route": "/"}]', '[{"base_url": "http://a", "type": "x"}]',
                               '[{"base_url": "http://a"}, {"base_url": "http://b", "route": "/"}]'],
            "ROUTE_PREFIX": ["/a/../b", "/a?b"],
            "OPENAI_API_KEY": ["fk-forward-in-wrong-place"],
        }
        for env_name, values in cases.items():
            for value in values:
                env = {env_name: value}
                if env_name == "FORWARD_KEY":
                    env["OPENAI_API_KEY"] = "sk-x"
                with self.assertRaises(ConfigError, msg=f"{env_name}={value!r}") as caught:
                    _load(env=env)
                self.assertTrue(str(caught.exception).startswith(env_name), str(caught.exception))
                self.assertNotIn("\n", str(caught.exception))

    def test_upstream_head_caps(self):
        """MAX_UPSTREAM_HEAD / MAX_UPSTREAM_HEADERS, from the environment or options."""
        config = _load(env={"MAX_UPSTREAM_HEAD": "16KiB", "MAX_UPSTREAM_HEADERS": "40"})
        self.assertEqual((config.max_upstream_head, config.max_upstream_headers), (16384, 40))
        config = _load(["--max-upstream-head", "1MiB", "--max-upstream-headers", "7"])
        self.assertEqual((config.max_upstream_head, config.max_upstream_headers), (1 << 20, 7))

    def test_forward_keys_need_default_keys(self):
        """FORWARD_KEY without OPENAI_API_KEY stops start-up: forward keys would have
        nothing to be swapped for."""
        self.assertRaises(ConfigError, _load, env={"FORWARD_KEY": "fk-12345678"})

    def test_sizes(self):
        """Sizes read binary units (MiB), decimal units (MB) and plain byte counts."""
        self.assertEqual(parse_size("512MiB"), 512 * 1024 * 1024)
        self.assertEqual(parse_size("10MB"), 10_000_000)
        self.assertEqual(parse_size("1048576"), 1048576)
