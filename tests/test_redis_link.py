"""
REDIS_URL: the three URL forms, and a password that never shows.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.policies.settings import parse_redis_url as setting_parser
from twisted_forward.redis_link import RedisTarget, check_redis_url, parse_redis_url

SECRET = "s3cret-pass"


class ParseTests(SynchronousTestCase):
    """What each form of REDIS_URL means."""

    def test_tcp(self) -> None:
        """redis://user:password@host:port/db, every part optional but the host."""
        self.assertEqual(
            parse_redis_url(f"redis://app:{SECRET}@redis.internal:6380/2"),
            RedisTarget("redis", "redis.internal", 6380, "", 2, "app", SECRET),
        )
        self.assertEqual(parse_redis_url("redis://localhost"), RedisTarget("redis", "localhost"))

    def test_tls(self) -> None:
        """rediss:// is TLS, the password alone in the user info."""
        target = parse_redis_url(f"rediss://:{SECRET}@cache.example:6390")
        self.assertTrue(target.tls)
        self.assertEqual((target.host, target.port, target.password), ("cache.example", 6390, SECRET))
        self.assertIsNone(target.username)

    def test_unix(self) -> None:
        """unix:///path?db=N&password=…"""
        target = parse_redis_url(f"unix:///run/redis/redis.sock?db=3&password={SECRET}")
        self.assertEqual(
            (target.scheme, target.path, target.db, target.password),
            ("unix", "/run/redis/redis.sock", 3, SECRET),
        )
        self.assertFalse(target.tls)

    def test_the_password_never_shows(self) -> None:
        """Neither str() nor repr() of a target holds the password."""
        for url in (f"redis://u:{SECRET}@h:1/0", f"unix:///s?password={SECRET}"):
            target = parse_redis_url(url)
            self.assertNotIn(SECRET, str(target))
            self.assertNotIn(SECRET, repr(target))

    def test_refused(self) -> None:
        """Other schemes, no host, a bad database or port, unknown
        parameters: refused, and the message never repeats the password."""
        for url in (
            "http://localhost", f"redis://u:{SECRET}@/0", f"redis://u:{SECRET}@h/x",
            f"redis://u:{SECRET}@h:99999", "unix://", f"unix:///s?db=x&password={SECRET}",
            f"redis://h/0?timeout=1&password={SECRET}",
        ):
            with self.assertRaises(ValueError) as caught:
                parse_redis_url(url)
            self.assertNotIn(SECRET, str(caught.exception), url)

    def test_the_setting_keeps_the_url(self) -> None:
        """REDIS_URL's parser checks the URL and keeps it as given (the
        cache and the policies both read it)."""
        url = f"  redis://u:{SECRET}@h:1/0 "
        self.assertEqual(check_redis_url(url), url.strip())
        self.assertEqual(setting_parser(url), url.strip())
