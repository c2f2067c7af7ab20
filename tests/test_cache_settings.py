"""
The cache's settings: openai-forward 0.8.1's names and meanings, and the
start-up refusals.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.cache.settings import DEFAULT_ROUTES
from twisted_forward.config import ConfigError, describe, load_config
from twisted_forward.tap import Options


class CacheSettingsTests(SynchronousTestCase):
    """CACHE_* in the environment, .env and options."""

    def test_defaults_are_openai_forwards(self) -> None:
        """Off, MEMORY, root ``.``, no default caching, the three routes."""
        cache = load_config({}, {}).cache
        self.assertFalse(cache.enabled)
        self.assertEqual(
            (cache.backend, cache.root, cache.default_caching, cache.routes),
            ("memory", ".", False, DEFAULT_ROUTES),
        )

    def test_openai_forward_env(self) -> None:
        """An openai-forward .env is read with its meaning (backend in any case,
        CACHE_ROUTES as a JSON list)."""
        cache = load_config({}, {}, {
            "CACHE_OPENAI": "True", "CACHE_BACKEND": "LMDB",
            "CACHE_ROOT_PATH_OR_URL": "/var/cache/of",
            "CACHE_ROUTES": '["/v1/chat/completions", "v1/embeddings/"]',
            "DEFAULT_REQUEST_CACHING_VALUE": "true",
        }).cache
        self.assertEqual(cache.backend, "lmdb")
        self.assertEqual(cache.routes, ("/v1/chat/completions", "/v1/embeddings"))
        self.assertTrue(cache.openai and cache.default_caching and not cache.general)

    def test_leveldb_is_refused_in_one_line(self) -> None:
        """LevelDB stops start-up with one line naming the alternatives."""
        e = self.assertRaises(ConfigError, load_config, {}, {"CACHE_BACKEND": "LevelDB"})
        self.assertNotIn("\n", str(e))
        for word in ("CACHE_BACKEND", "MEMORY", "LMDB", "REDIS"):
            self.assertIn(word, str(e))

    def test_redis_needs_a_url(self) -> None:
        """REDIS without REDIS_URL (or a URL in CACHE_ROOT_PATH_OR_URL) is
        refused; either URL is taken, and a password stays out of repr."""
        self.assertRaises(ConfigError, load_config, {},
                          {"CACHE_OPENAI": "true", "CACHE_BACKEND": "redis"})
        via_env = load_config({}, {"CACHE_OPENAI": "true", "CACHE_BACKEND": "redis",
                                   "REDIS_URL": "redis://:s3cret@localhost:6379/2"}).cache
        self.assertEqual(via_env.redis_url, "redis://:s3cret@localhost:6379/2")
        self.assertNotIn("s3cret", repr(via_env))
        via_root = load_config({}, {"CACHE_OPENAI": "true", "CACHE_BACKEND": "redis",
                                    "CACHE_ROOT_PATH_OR_URL": "unix:///run/redis.sock"}).cache
        self.assertEqual(via_root.redis_url, "unix:///run/redis.sock")
        self.assertRaises(ConfigError, load_config, {}, {"REDIS_URL": "http://x"})

    def test_bad_values_name_the_setting(self) -> None:
        """Bad values stop start-up naming the setting and its option."""
        for env, value in (("CACHE_TTL", "0"), ("CACHE_MAX_BYTES", "lots"),
                           ("CACHE_ROUTES", "[1]"), ("CACHE_REPLAY_INTERVAL", "-1"),
                           ("CACHE_SHARED", "maybe")):
            e = self.assertRaises(ConfigError, load_config, {}, {env: value})
            self.assertTrue(str(e).startswith(env + " (--"), str(e))
        e = self.assertRaises(ConfigError, load_config, {},
                              {"CACHE_MAX_BYTES": "1MiB", "CACHE_MAX_ENTRY_BYTES": "2MiB"})
        self.assertIn("CACHE_MAX_ENTRY_BYTES", str(e))

    def test_options_override(self) -> None:
        """Every cache setting is a twistd option too."""
        options = Options()
        options.parseOptions(["--cache-openai", "true", "--cache-backend", "lmdb",
                              "--cache-ttl", "60", "--cache-shared", "true"])
        cache = load_config(options.setting_values(), {"CACHE_BACKEND": "redis"}).cache
        self.assertEqual((cache.backend, cache.ttl, cache.shared), ("lmdb", 60.0, True))

    def test_described_at_start_up(self) -> None:
        """The start-up lines say the cache is on, where, and how partitioned."""
        lines = describe(load_config({}, {"CACHE_OPENAI": "true"}))
        self.assertTrue(any("cache: memory on openai routes" in line and "partitioned by key" in line
                            for line in lines), lines)
