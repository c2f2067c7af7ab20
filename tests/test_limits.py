"""
The connection caps: counting, the per-address share, the exemptions, the
defaults from the descriptor limit, and the settings.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.access import TrustedProxies
from twisted_forward.config import ConfigError, load_config
from twisted_forward.limits import (
    FD_RESERVE,
    ConnectionLimits,
    UpstreamSlots,
    default_caps,
    resolve_caps,
)


def tcp(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 40000)


class ConnectionLimitTests(SynchronousTestCase):
    def limits(self, total=None, per_client=None, trusted=()) -> ConnectionLimits:
        self.clock = MemoryReactorClock()
        networks = [ipaddress.ip_network(t) for t in trusted]
        return ConnectionLimits(total, per_client, TrustedProxies(networks), self.clock.seconds)

    def test_per_address_share(self):
        """Two from one address, then 429; another address is not affected;
        a closed connection frees its slot."""
        limits = self.limits(per_client=2)
        self.assertIsNone(limits.admit(tcp("198.51.100.1")))
        self.assertIsNone(limits.admit(tcp("198.51.100.1")))
        refusal = limits.admit(tcp("198.51.100.1"))
        self.assertEqual((refusal.status, refusal.code), (429, "too_many_connections"))
        self.assertIsNone(limits.admit(tcp("198.51.100.2")))
        limits.release(tcp("198.51.100.1"))
        self.assertIsNone(limits.admit(tcp("198.51.100.1")))
        self.assertEqual(limits.open, 3)

    def test_total(self):
        """Past the total every address gets 503; refusals are not counted."""
        limits = self.limits(total=2)
        limits.admit(tcp("198.51.100.1"))
        limits.admit(tcp("198.51.100.2"))
        refusal = limits.admit(tcp("198.51.100.3"))
        self.assertEqual((refusal.status, refusal.code), (503, "server_busy"))
        self.assertEqual(limits.open, 2)

    def test_trusted_proxy_and_unix_peers_exempt_from_the_share(self):
        """A trusted front proxy carries everyone's connections: no share
        for it, nor for unix-socket peers; the total still holds."""
        limits = self.limits(total=10, per_client=1, trusted=["10.0.0.0/8"])
        for _ in range(5):
            self.assertIsNone(limits.admit(tcp("10.1.2.3")))
            self.assertIsNone(limits.admit(UNIXAddress(b"/run/x.sock")))
        self.assertIsNotNone(limits.admit(tcp("10.1.2.3")))

    def test_mapped_ipv6_counted_as_ipv4(self):
        """``::ffff:198.51.100.1`` is the same client as ``198.51.100.1``."""
        from twisted.internet.address import IPv6Address

        limits = self.limits(per_client=1)
        limits.admit(tcp("198.51.100.1"))
        self.assertIsNotNone(limits.admit(IPv6Address("TCP", "::ffff:198.51.100.1", 1)))

    def test_flood_logged_once_a_minute(self):
        """Refused connections make one warning a minute, not one each."""
        limits = self.limits(total=1)
        limits.admit(tcp("198.51.100.1"))
        with capturedLogs() as events:
            for _ in range(100):
                limits.admit(tcp("198.51.100.2"))
            self.clock.advance(61)
            limits.admit(tcp("198.51.100.2"))
        self.assertEqual(len(events), 2)
        self.assertEqual(events[1]["count"], 100)


class UpstreamSlotTests(SynchronousTestCase):
    def test_slots(self):
        """A cap of two: the third waits for a release."""
        slots = UpstreamSlots(2)
        self.assertEqual([slots.acquire() for _ in range(3)], [True, True, False])
        slots.release()
        self.assertTrue(slots.acquire())

    def test_no_cap(self):
        """None: never refused."""
        slots = UpstreamSlots(None)
        self.assertTrue(all(slots.acquire() for _ in range(10000)))


class DefaultTests(SynchronousTestCase):
    def test_defaults_follow_the_descriptor_limit(self):
        """Half of what the reserve leaves for clients, half of that per
        address, the same for upstream requests; never below 16."""
        self.assertEqual(default_caps(20000), (9840, 4920, 9840))
        self.assertEqual(default_caps(1024), ((1024 - FD_RESERVE) // 2, 176, 352))
        self.assertEqual(default_caps(100), (16, 16, 16))

    def config(self, **env):
        return load_config({}, {"OPENAI_BASE_URL": "http://u.test", **env}, None)

    def test_settings(self):
        """Set caps are taken as given, 0 is no cap, an unset per-client cap
        is half a set total."""
        self.assertEqual(resolve_caps(self.config(
            MAX_CONNECTIONS="100", MAX_UPSTREAM_CONNECTIONS="0")), (100, 50, None))
        self.assertEqual(resolve_caps(self.config(
            MAX_CONNECTIONS="0", MAX_CONNECTIONS_PER_CLIENT="7"))[:2], (None, 7))

    def test_bad_values_name_the_setting(self):
        """A bad value stops start-up with one line naming the setting."""
        for env, value in (("MAX_CONNECTIONS", "-1"), ("MAX_CONNECTIONS_PER_CLIENT", "many"),
                           ("MAX_UPSTREAM_CONNECTIONS", "1.5"), ("REQUEST_HEAD_TIMEOUT", "0"),
                           ("REQUEST_BODY_TIMEOUT", "soon")):
            with self.assertRaises(ConfigError) as caught:
                self.config(**{env: value})
            self.assertIn(env, str(caught.exception))


class SettingSourceTests(SynchronousTestCase):
    def test_env_file_environment_and_option(self):
        """Each new setting is read from .env, the environment and its
        option, options winning."""
        from twisted_forward.tap import Options

        options = Options()
        options.parseOptions(["--max-connections", "5", "--request-body-timeout", "9"])
        config = load_config(
            options.setting_values(),
            {"MAX_CONNECTIONS_PER_CLIENT": "3", "MAX_CONNECTIONS": "6"},
            {"MAX_UPSTREAM_CONNECTIONS": "4", "REQUEST_HEAD_TIMEOUT": "8"},
        )
        self.assertEqual(
            (config.max_connections, config.max_connections_per_client,
             config.max_upstream_connections, config.request_head_timeout,
             config.request_body_timeout),
            (5, 3, 4, 8.0, 9.0),
        )


class RaiseDescriptorLimitTests(SynchronousTestCase):
    """The soft descriptor limit is raised at start-up as far as the hard
    limit allows, before the caps are derived from it."""

    def run_with(self, soft, hard, refuse=False):
        import resource

        from twisted_forward.limits import raise_descriptor_limit

        calls = []

        def getrlimit(which):
            self.assertEqual(which, resource.RLIMIT_NOFILE)
            return soft, hard

        def setrlimit(which, limits):
            calls.append(limits)
            if refuse:
                raise ValueError("not allowed")

        return raise_descriptor_limit(getrlimit, setrlimit), calls

    def test_raised_to_the_hard_limit(self):
        """1024 soft, 65536 hard: the soft limit becomes 65536."""
        result, calls = self.run_with(1024, 65536)
        self.assertEqual(result, (1024, 65536))
        self.assertEqual(calls, [(65536, 65536)])

    def test_already_at_the_hard_limit(self):
        """Nothing to raise: no call, the limit reported as it is."""
        result, calls = self.run_with(65536, 65536)
        self.assertEqual(result, (65536, 65536))
        self.assertEqual(calls, [])

    def test_unlimited_hard_limit(self):
        """An unlimited hard limit: aim for 2**20 descriptors."""
        import resource

        result, calls = self.run_with(1024, resource.RLIM_INFINITY)
        self.assertEqual(result, (1024, 1 << 20))
        self.assertEqual(calls, [(1 << 20, resource.RLIM_INFINITY)])

    def test_refused(self):
        """The system refuses: the limit stays as it was."""
        result, calls = self.run_with(1024, 4096, refuse=True)
        self.assertEqual(result, (1024, 1024))
        self.assertEqual(len(calls), 1)

    def test_caps_follow_the_raised_limit(self):
        """The caps derived after raising use the new limit."""
        self.assertEqual(default_caps(65536)[0], (65536 - FD_RESERVE) // 2)
