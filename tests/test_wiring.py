"""
How the pieces are wired: extension points are zope interfaces their
implementations provide, the site hands each channel its settings at
construction, and no two modules of the package import each other.
"""

from __future__ import annotations

import ast
import importlib
import io
import json
import os
import pkgutil
from types import ModuleType
from typing import Iterable

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from zope.interface import implementedBy
from zope.interface.interface import InterfaceClass
from zope.interface.verify import verifyObject

from twisted_forward.admin.limits import PolicyLimits
from twisted_forward.chat.recorder import (
    ChatRecorder,
    ExchangeInfo,
    FanOut,
    FanOutTap,
    IExchangeTap,
    IRecorder,
    NullRecorder,
    RequestBody,
)
from twisted_forward.config import load_config
from twisted_forward.exchange import _BothTaps
from twisted_forward.framing import ChannelSettings, ForwardChannel
from twisted_forward.ledger import MemoryLedger
from twisted_forward.ledger.feed import CountingRecorder
from twisted_forward.metrics import Metrics
from twisted_forward.site import Built, ForwardSite, build_root

from .processes import ROOT

PACKAGE = "twisted_forward"


def exchange(path: str = "/v1/chat/completions") -> ExchangeInfo:
    """One exchange's facts, as the proxy hands them to a recorder."""
    return ExchangeInfo(
        request_id="id-1", route="/", method="POST", path=path, client="10.0.0.9",
        key_label="team-a", started=100.0, body=RequestBody(io.BytesIO(b"{}")),
    )


class RecorderInterfaceTests(SynchronousTestCase):
    """The recorders and their taps provide IRecorder / IExchangeTap."""

    def test_recorders_provide_irecorder(self):
        """Every recorder the proxy can be given verifies as an IRecorder."""
        clock = Clock()
        chat = ChatRecorder(clock)
        counting = CountingRecorder(MemoryLedger(), clock)
        for recorder in (NullRecorder(), chat, counting, FanOut([chat, counting])):
            self.assertTrue(verifyObject(IRecorder, recorder), recorder)

    def test_taps_provide_iexchangetap(self):
        """The taps recorders hand out verify as IExchangeTap."""
        clock = Clock()
        chat_tap = ChatRecorder(clock).begin(exchange())
        counting_tap = CountingRecorder(MemoryLedger(), clock, covered=lambda info: False).begin(
            exchange("/v1/models")
        )
        self.assertIsNotNone(chat_tap)
        self.assertIsNotNone(counting_tap)
        for tap in (
            chat_tap,
            counting_tap,
            FanOutTap([chat_tap, counting_tap]),
            _BothTaps(chat_tap, counting_tap),
        ):
            self.assertTrue(verifyObject(IExchangeTap, tap), tap)

    def test_fan_out_hands_one_tap_per_exchange(self):
        """FanOut gives one tap feeding both recorders' taps."""
        clock = Clock()
        tap = FanOut([ChatRecorder(clock), CountingRecorder(MemoryLedger(), clock,
                                                            covered=lambda info: False)]).begin(
            exchange()
        )
        self.assertIsInstance(tap, FanOutTap)
        tap.response(200, Headers())
        tap.end("complete")


def package_modules() -> Iterable[ModuleType]:
    """Every module of the package, imported (``__main__`` scripts aside)."""
    import twisted_forward

    for info in pkgutil.walk_packages(twisted_forward.__path__, PACKAGE + "."):
        if not info.name.endswith(".__main__"):
            yield importlib.import_module(info.name)


def package_interfaces() -> set[InterfaceClass]:
    """Every zope interface the package defines."""
    return {
        value
        for module in package_modules()
        for value in vars(module).values()
        if isinstance(value, InterfaceClass) and value.__module__ == module.__name__
    }


def declared_implementations() -> set[tuple[InterfaceClass, type]]:
    """``(interface, class)`` for every package class declaring (with
    ``@implementer``) one of the package's interfaces."""
    interfaces = package_interfaces()
    return {
        (interface, value)
        for module in package_modules()
        for value in vars(module).values()
        if isinstance(value, type) and value.__module__ == module.__name__
        for interface in implementedBy(value).declared
        if interface in interfaces
    }


class ExtensionPointTests(SynchronousTestCase):
    """Every extension point of the package (upstream, recorder, exchange
    tap, policy store, ledger, cache store, head checks, ...) is a zope
    interface, and each implementation verifies against it."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.temp = os.path.abspath(self.mktemp())
        os.makedirs(self.temp)

    def built(self) -> Built:
        """A tree with every optional part on: policy, cache, admin."""
        config = load_config({}, {
            "OPENAI_BASE_URL": "http://upstream.test",
            "OPENAI_API_KEY": "sk-default-000000000",
            "FORWARD_KEY": "alice:fk-alice-00000000",
            "KEY_POLICY": json.dumps({"alice": {"rpm": 10}}),
            "CACHE_OPENAI": "true",
            "ADMIN_KEY": "admin-key-0123456789",
            "IP_WHITELIST": "10.0.0.0/8",
            "LOG_CHAT": "false",
        })
        return build_root(config, self.clock, ledger=MemoryLedger())

    def providers(self) -> list[tuple[InterfaceClass, object]]:
        """One instance of every implementation, with what it provides."""
        from twisted_forward.admin.limits import IKeyLimits
        from twisted_forward.admin.live import LiveTally
        from twisted_forward.cache.hook import StoringTap
        from twisted_forward.cache.interfaces import ICacheStore, IExchangeCache
        from twisted_forward.cache.lmdb_store import LMDBStore
        from twisted_forward.cache.memory import MemoryStore as MemoryCacheStore
        from twisted_forward.cache.redis_store import RedisStore as RedisCacheStore
        from twisted_forward.headcheck import IHeadCheck
        from twisted_forward.ledger import ILedger
        from twisted_forward.ledger.batching import BatchingLedger
        from twisted_forward.ledger.database import DirectDatabase
        from twisted_forward.ledger.feed import CountingRecorder
        from twisted_forward.ledger.sql import sqlite_dialect
        from twisted_forward.policies.amp_store import SupervisorStore
        from twisted_forward.policies.failover import GuardedStore
        from twisted_forward.policies.gate import IExchangePolicy
        from twisted_forward.policies.memory import MemoryStore as MemoryPolicyStore
        from twisted_forward.policies.redis_store import RedisStore as RedisPolicyStore
        from twisted_forward.policies.store import IImmediateStore, IKeyHealth, IPolicyStore, IStoreInfo
        from twisted_forward.redis_link import RedisTarget
        from twisted_forward.upstream import IUpstream, Upstream

        built = self.built()
        assert built.policy is not None and built.cache is not None
        assert built.admin is not None
        chat = ChatRecorder(self.clock)
        counting = CountingRecorder(MemoryLedger(), self.clock, covered=lambda info: False)
        chat_tap = chat.begin(exchange())
        counting_tap = counting.begin(exchange("/v1/models"))
        lmdb = LMDBStore(self.clock, os.path.join(self.temp, "cache"), 1 << 20)
        self.addCleanup(lmdb.close)
        stores = [
            MemoryPolicyStore(),
            GuardedStore(MemoryPolicyStore(), self.clock),
            SupervisorStore(self.clock, timeout=1.0),
            RedisPolicyStore(lambda: None, self.clock, timeout=1.0),
            built.policy.store,
        ]
        return [
            (IUpstream, built.upstream),
            (IUpstream, Upstream(self.clock, 1.0)),
            *((IRecorder, r) for r in (NullRecorder(), chat, counting, FanOut([chat, counting]))),
            *((IExchangeTap, t) for t in (
                chat_tap, counting_tap, FanOutTap([chat_tap, counting_tap]),
                _BothTaps(chat_tap, counting_tap),
            )),
            *((i, s) for s in stores for i in (IPolicyStore, IKeyHealth, IStoreInfo)),
            (IImmediateStore, MemoryPolicyStore()),
            (IExchangePolicy, built.policy),
            (IKeyLimits, PolicyLimits(built.policy, self.clock)),
            (ILedger, MemoryLedger()),
            (ILedger, LiveTally(MemoryLedger())),
            (ILedger, BatchingLedger(
                self.clock, DirectDatabase(sqlite_dialect(os.path.join(self.temp, "l.db")))
            )),
            (ICacheStore, built.cache.store),
            (ICacheStore, MemoryCacheStore(self.clock, 60, 1000)),
            (ICacheStore, lmdb),
            (ICacheStore, RedisCacheStore(
                self.clock, RedisTarget("127.0.0.1", 1), 60, 1000, 1.0
            )),
            (IExchangeCache, built.cache),
            (IExchangeTap, StoringTap(built.cache, b"key")),
            *((IHeadCheck, check) for check in built.head_checks),
            *((IHeadCheck, proxy) for proxy in built.proxies),
        ]

    def test_every_provider_verifies(self):
        """Each implementation (as the proxy builds it, and each alternative)
        verifies against its interface: methods, signatures, attributes."""
        for interface, provider in self.providers():
            self.assertTrue(verifyObject(interface, provider), (interface, provider))

    def test_every_interface_is_checked_here(self):
        """No interface of the package is left out of the check above."""
        checked = {interface for interface, _ in self.providers()}
        self.assertEqual(sorted(i.__identifier__ for i in package_interfaces() - checked), [])

    def test_every_declared_implementation_is_checked_here(self):
        """Every class declaring a package interface has an instance above
        (a new implementation must be added to the check)."""
        checked = {(interface, type(p)) for interface, p in self.providers()}
        missing = declared_implementations() - checked
        self.assertEqual(
            sorted(f"{cls.__module__}.{cls.__qualname__}: {i.__name__}" for i, cls in missing), []
        )

    def test_upstream_passed_through_constructors(self):
        """build_root hands the upstream it is given to every route's
        exchange resource: one client, chosen by the caller."""
        from twisted_forward.upstream import Upstream

        upstream = Upstream(self.clock, 1.0)
        config = load_config({}, {"FORWARD_CONFIG": json.dumps([
            {"base_url": "http://a.test", "route": "/a", "type": "openai"},
            {"base_url": "http://b.test", "route": "/b", "type": "general"},
        ])})
        built = build_root(config, self.clock, upstream=upstream)
        self.assertIs(built.upstream, upstream)
        self.assertEqual([p.upstream for p in built.proxies], [upstream, upstream])


class ChannelSettingsTests(SynchronousTestCase):
    """The site builds each channel with its settings, set nowhere else."""

    def site(self, **kwargs: object) -> ForwardSite:
        """A site on a test clock."""
        self.clock = Clock()
        return ForwardSite(Resource(), reactor=self.clock, **kwargs)

    def test_channel_gets_the_site_settings(self):
        """A built channel holds the site's settings object and its limits."""
        site = self.site(max_request_body=1234, max_headers=7, max_header_bytes=999,
                         head_timeout=3.0, body_timeout=4.0)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.assertIs(channel.settings, site.channel_settings)
        self.assertEqual(
            (channel.max_request_body, channel.maxHeaders, channel.totalHeadersSize,
             channel.head_timeout, channel.body_timeout),
            (1234, 7, 999, 3.0, 4.0),
        )

    def test_refusal_counted_and_dated_by_the_site(self):
        """A refusal is counted in the site's metrics, its Date from the site's clock."""
        metrics = Metrics()
        site = self.site(metrics=metrics, max_request_body=10)
        self.clock.advance(86400 * 365)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
        self.assertIn(b"413", transport.value().split(b"\r\n", 1)[0])
        self.assertIn(b"Date: Fri, 01 Jan 1971", transport.value())
        counted = metrics.refusals.labels("request_too_large")._value.get()
        self.assertEqual(counted, 1)
        channel.connectionLost(None)

    def test_channel_without_a_site(self):
        """A channel made alone has the defaults: no body cap, no checks."""
        channel = ForwardChannel()
        self.assertEqual(channel.settings, ChannelSettings())
        self.assertIsNone(channel.max_request_body)
        self.assertEqual(channel.head_checks, ())


def _imports(tree: ast.Module, module: str, is_package: bool) -> Iterable[str]:
    """The package's modules ``tree`` imports, at any depth, except under
    ``if TYPE_CHECKING:`` (never run)."""

    def visit(nodes: Iterable[ast.AST]) -> Iterable[str]:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                continue
            if isinstance(node, ast.Import):
                yield from (a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")[: None if is_package else -1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                yield target
                yield from (target + "." + a.name for a in node.names)
            else:
                yield from visit(ast.iter_child_nodes(node))

    return visit(tree.body)


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
    """Module name to the package modules it imports."""
    files: dict[str, tuple[str, bool]] = {}
    for folder, _, names in os.walk(os.path.join(root, PACKAGE)):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                is_package = name == "__init__.py"
                if is_package:
                    module = module[: -len(".__init__")]
                files[module] = (path, is_package)
    graph = {}
    for module, (path, is_package) in files.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        targets = set(_imports(tree, module, is_package))
        # Importing a.b.c runs a/__init__ and a/b/__init__ first: edges too,
        # except to the module's own packages (already running by then).
        targets |= {p for t in targets for p in _parents(t)} - set(_parents(module))
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def _parents(module: str) -> list[str]:
    """The packages above ``module``: ``a.b.c`` -> ``a``, ``a.b``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other (Tarjan's strongly
    connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


class ImportCycleTests(SynchronousTestCase):
    """No module of the package imports one that imports it back."""

    def test_no_import_cycles(self):
        """Imports inside functions count too; only TYPE_CHECKING ones do not."""
        self.assertEqual(cycles(import_graph()), [])

    def test_graph_covers_the_whole_package(self):
        """Every module and subpackage Python can import from the package is
        a node of the graph the cycle check walks (nothing is skipped)."""
        import pkgutil

        import twisted_forward

        importable = {PACKAGE} | {
            info.name
            for info in pkgutil.walk_packages(twisted_forward.__path__, PACKAGE + ".")
        }
        self.assertEqual(sorted(importable - set(import_graph())), [])
        self.assertEqual(sorted(set(import_graph()) - importable), [])

    def test_parent_package_import_counts(self):
        """Importing ``a.b.c`` from outside ``a.b`` is an edge to ``a.b``'s
        ``__init__`` too (Python runs it first); a module's own packages are
        not (they are being imported already)."""
        graph = import_graph()
        self.assertIn("twisted_forward.policies", graph["twisted_forward.site"])
        self.assertNotIn("twisted_forward.policies", graph["twisted_forward.policies.memory"])

    def test_cycle_is_found(self):
        """The check sees a cycle through three modules."""
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
        self.assertEqual(cycles(graph), [["a", "b", "c"]])

    def test_function_level_import_counts(self):
        """An import inside a function is an edge; one under TYPE_CHECKING is not."""
        tree = ast.parse(
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from .x import X\n"
            "def f():\n    from .y import g\n"
        )
        found = set(_imports(tree, "twisted_forward.m", False))
        self.assertIn("twisted_forward.y", found)
        self.assertNotIn("twisted_forward.x", found)


class SettingsDeclaredOnceTests(SynchronousTestCase):
    """Each setting is one SETTINGS row: env, option, parser and Config field."""

    #: Config fields made from several settings rather than filled by one.
    DERIVED = {"default_keys", "forward_keys", "routes", "cache", "policy"}

    def test_fields_exist(self):
        """Every row's field is a Config field, filled by no other row."""
        from dataclasses import fields

        from twisted_forward.config import SETTINGS, Config

        names = {f.name for f in fields(Config)}
        named = [s.field for s in SETTINGS if s.field is not None]
        self.assertEqual([n for n in named if n not in names], [])
        self.assertEqual(len(named), len(set(named)))

    def test_every_config_field_has_its_setting(self):
        """No Config field is left without a row (or a documented derivation)."""
        from dataclasses import fields

        from twisted_forward.config import SETTINGS, Config

        named = {s.field for s in SETTINGS}
        self.assertEqual(
            sorted(f.name for f in fields(Config) if f.name not in named | self.DERIVED), []
        )

    def test_names_unique(self):
        """No two rows share an environment variable or an option."""
        from twisted_forward.config import SETTINGS

        envs = [s.env for s in SETTINGS]
        options = [s.option for s in SETTINGS]
        self.assertEqual(len(envs), len(set(envs)))
        self.assertEqual(len(options), len(set(options)))

    def test_field_filled_from_its_row(self):
        """A setting given in the environment lands in its Config field."""
        from twisted_forward.config import load_config

        config = load_config({}, {"READ_TIMEOUT": "12", "LEDGER_RETENTION_DAYS": "3"})
        self.assertEqual((config.read_timeout, config.ledger_retention_days), (12.0, 3))
