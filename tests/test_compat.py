"""
The canary for twisted_forward/_compat.py: every private Twisted name the
proxy relies on, checked for existence, shape and (where cheap) behaviour.

When one of these fails after a Twisted upgrade, the message names the
private use that broke; fix it in _compat.py (and nowhere else), or keep the
Twisted bound in pyproject.toml below the release that broke it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from twisted.internet import base, tcp
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import client, http

import twisted
from twisted_forward import _compat


def _parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


class CanaryTests(SynchronousTestCase):
    """Each test names one private use; its failure message says what changed."""

    def broke(self, what: str) -> str:
        return (
            f"Twisted {twisted.__version__}: {what}. "
            "twisted_forward/_compat.py relies on it: adapt it there, or bound Twisted below this release."
        )

    def test_http11_client_factory(self) -> None:
        """twisted.web.client._HTTP11ClientFactory(quiescentCallback, metadata)
        still exists and builds HTTP11ClientProtocol(quiescentCallback)."""
        factory_class = getattr(client, "_HTTP11ClientFactory", None)
        self.assertIsNotNone(factory_class, self.broke("twisted.web.client._HTTP11ClientFactory is gone"))
        self.assertEqual(
            _parameters(factory_class.__init__)[1:],
            ["quiescentCallback", "metadata"],
            self.broke("_HTTP11ClientFactory.__init__ changed its parameters"),
        )
        self.assertEqual(
            _parameters(_compat.HTTP11ClientProtocol.__init__)[1:2],
            ["quiescentCallback"],
            self.broke("HTTP11ClientProtocol.__init__ no longer takes quiescentCallback first"),
        )
        protocol = factory_class(lambda p: None, "meta").buildProtocol(None)
        self.assertIsInstance(
            protocol,
            _compat.HTTP11ClientProtocol,
            self.broke("_HTTP11ClientFactory no longer builds HTTP11ClientProtocol"),
        )

    def test_pool_factory(self) -> None:
        """HTTPConnectionPool keeps the factory it builds connections with in
        _factory, and _newConnection still calls it."""
        from twisted.internet.testing import MemoryReactorClock

        pool = client.HTTPConnectionPool(MemoryReactorClock())
        self.assertIs(
            getattr(pool, "_factory", None),
            client._HTTP11ClientFactory,
            self.broke("HTTPConnectionPool._factory is gone or no longer _HTTP11ClientFactory"),
        )
        self.assertIn(
            "self._factory(",
            inspect.getsource(client.HTTPConnectionPool._newConnection),
            self.broke("HTTPConnectionPool._newConnection no longer calls self._factory"),
        )
        _compat.set_pool_factory(pool, _compat.HTTP11ClientFactory)
        self.assertIs(pool._factory, _compat.HTTP11ClientFactory)

    def _channel(
        self, kind: type[_compat.ChannelHooks] = _compat.ChannelHooks
    ) -> tuple[_compat.ChannelHooks, StringTransport]:
        """A ``kind`` channel (a subclass where a test listens to a hook) on
        a memory transport."""
        channel = kind()
        channel.requestFactory = http.Request  # type: ignore[assignment]  # Request's signature differs from the attribute's declared type
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_bad_request_hook(self) -> None:
        """Twisted's parser still reports a malformed request through
        HTTPChannel._respondToBadRequestAndDisconnect, routed to
        ChannelHooks.malformed_request."""
        self.assertTrue(
            callable(getattr(http.HTTPChannel, "_respondToBadRequestAndDisconnect", None)),
            self.broke("HTTPChannel._respondToBadRequestAndDisconnect is gone"),
        )
        seen: list[str] = []

        class Recording(_compat.ChannelHooks):
            def malformed_request(self) -> None:
                seen.append("malformed")

        channel, transport = self._channel(Recording)
        channel.dataReceived(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
        self.assertEqual(
            seen, ["malformed"], self.broke("a malformed header no longer calls _respondToBadRequestAndDisconnect")
        )

    def test_default_bad_request(self) -> None:
        """Without an override, malformed_request answers Twisted's 400."""
        channel, transport = self._channel()
        channel.dataReceived(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(transport.disconnecting)

    def test_chunked_trailers(self) -> None:
        """The chunked decoder still keeps a body's raw trailer lines in
        _trailerHeaders, reachable as HTTPChannel._transferDecoder until
        allContentReceived."""
        seen: list[tuple[bytes, ...]] = []

        class Trailers(_compat.ChannelHooks):
            def allContentReceived(self) -> None:
                seen.append(tuple(bytes(line) for line in self.chunked_trailers()))
                super().allContentReceived()

        channel, transport = self._channel(Trailers)
        channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"1\r\na\r\n0\r\nX-Trailer: yes\r\n\r\n"
        )
        self.assertEqual(
            seen,
            [(b"X-Trailer: yes",)],
            self.broke("HTTPChannel._transferDecoder._trailerHeaders no longer holds the trailer lines"),
        )

    def test_use_chunked_body(self) -> None:
        """Feeding the parser a synthetic Transfer-Encoding: chunked line
        after the real headers still makes it read the body as chunked."""
        bodies: list[bytes] = []
        test = self

        class Chunking(_compat.ChannelHooks):
            def allHeadersReceived(self) -> None:
                test.assertTrue(self.use_chunked_body(), test.broke("the synthetic chunked line was refused"))
                super().allHeadersReceived()

        channel, transport = self._channel(Chunking)

        class Recording(http.Request):
            def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
                self.content.seek(0)
                bodies.append(self.content.read())
                self.channel.transport.loseConnection()  # type: ignore[union-attr]  # set by then

        channel.requestFactory = Recording  # type: ignore[assignment]  # as in _channel
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        self.assertEqual(
            bodies,
            [b"abc"],
            self.broke("headerReceived(b'Transfer-Encoding: chunked') no longer installs a chunked decoder"),
        )

    def test_exit_signal(self) -> None:
        """Reactors still record the stopping signal in _exitSignal."""
        self.assertTrue(
            hasattr(base.ReactorBase, "_exitSignal"),
            self.broke("ReactorBase._exitSignal is gone (twistd's exit-by-signal)"),
        )
        self.assertIn(
            "self._exitSignal = number",
            inspect.getsource(base),
            self.broke("the reactor no longer records the stopping signal in _exitSignal"),
        )

        class Reactor:
            _exitSignal = 15

        reactor = Reactor()
        _compat.clear_exit_signal(reactor)
        self.assertIsNone(reactor._exitSignal)

    def test_accepts_per_read(self) -> None:
        """tcp.Port.doRead still reads its batch size from numberAccepts."""
        source = inspect.getsource(tcp.Port.doRead)
        self.assertIn(
            "self.numberAccepts",
            source,
            self.broke("tcp.Port.doRead no longer reads numberAccepts"),
        )
        self.assertEqual(_parameters(tcp.Port.doRead), ["self"], self.broke("tcp.Port.doRead takes arguments"))

        class Port:
            numberAccepts = 100
            calls: list[int] = []

            def doRead(self) -> None:
                self.calls.append(self.numberAccepts)
                self.numberAccepts += 20

        port = Port()
        _compat.limit_accepts_per_read(port, 1)  # type: ignore[arg-type]  # a stand-in port
        port.doRead()
        port.doRead()
        self.assertEqual(port.calls, [1, 1])

    def test_send_now_half_closed(self) -> None:
        """send_now still recognises a half-closed write side by
        FileDescriptor._writeDisconnecting (set by loseWriteConnection, read
        by doWrite once the buffer is empty) and leaves it to the reactor."""
        from twisted.internet import abstract
        from twisted.internet.testing import MemoryReactor

        self.assertIs(
            getattr(abstract.FileDescriptor, "_writeDisconnecting", None),
            False,
            self.broke("FileDescriptor._writeDisconnecting is gone or no longer a False default"),
        )
        self.assertIn(
            "self._writeDisconnecting",
            inspect.getsource(abstract.FileDescriptor.doWrite),
            self.broke("FileDescriptor.doWrite no longer reads _writeDisconnecting "
                       "(send_now's half-close guard would be stale)"),
        )
        self.assertEqual(
            _parameters(abstract.FileDescriptor.doWrite),
            ["self"],
            self.broke("FileDescriptor.doWrite takes arguments"),
        )
        sent: list[bytes] = []

        class Descriptor(abstract.FileDescriptor):
            connected = 1

            def writeSomeData(self, data: bytes) -> int:
                sent.append(bytes(data))
                return len(data)

            def fileno(self) -> int:
                return 99

        reactor = MemoryReactor()
        half_closed = Descriptor(reactor)  # type: ignore[arg-type]  # MemoryReactor provides what FileDescriptor uses
        half_closed.write(b"x")
        half_closed.loseWriteConnection()
        self.assertIs(
            getattr(half_closed, "_writeDisconnecting", None),
            True,
            self.broke("FileDescriptor.loseWriteConnection no longer sets _writeDisconnecting"),
        )
        _compat.send_now(half_closed)
        self.assertEqual(sent, [], self.broke("send_now wrote on a half-closed write side"))
        self.assertIn(half_closed, reactor.getWriters())
        open_descriptor = Descriptor(reactor)  # type: ignore[arg-type]  # as above
        open_descriptor.write(b"y")
        _compat.send_now(open_descriptor)
        self.assertEqual(
            sent, [b"y"], self.broke("FileDescriptor.doWrite no longer sends the buffered bytes")
        )
        self.assertNotIn(
            open_descriptor,
            reactor.getWriters(),
            self.broke("FileDescriptor.doWrite no longer stops the write watch once the buffer is empty"),
        )

    def test_trust_root_interface(self) -> None:
        """twisted.internet._sslverify.IOpenSSLTrustRoot, named in type hints
        only, still exists."""
        from twisted.internet import _sslverify

        self.assertTrue(
            hasattr(_sslverify, "IOpenSSLTrustRoot"),
            self.broke("twisted.internet._sslverify.IOpenSSLTrustRoot is gone"),
        )

    def test_quiet_connected(self) -> None:
        """txredisapi's ConnectionHandler still keeps its factory's Deferred
        as _connected; quiet_connected consumes its failure (an AUTH lost
        while the lazy pool connects), which trial would otherwise report
        as an unhandled error in a later test."""
        import txredisapi
        from twisted.internet.defer import Deferred

        self.assertIn(
            "self._connected = factory.deferred",
            inspect.getsource(txredisapi.ConnectionHandler.__init__),
            "txredisapi's ConnectionHandler no longer keeps factory.deferred as _connected; "
            "adapt twisted_forward._compat.quiet_connected",
        )

        class Factory:
            deferred: Deferred[None] = Deferred()

        pool = txredisapi.ConnectionHandler(Factory())
        self.assertIs(_compat.quiet_connected(pool), pool)
        Factory.deferred.errback(ValueError("Redis error: could not auth: Lost connection"))
        self.assertIsNone(self.successResultOf(Factory.deferred))
        other = object()
        self.assertIs(_compat.quiet_connected(other), other)

    def test_twistd_log_file(self) -> None:
        """twistd's SIGUSR1 handler is still a closure over its LogFile, which
        twistd_log_file finds."""
        from twisted.python.logfile import LogFile
        from twisted.scripts import _twistd_unix

        source = inspect.getsource(_twistd_unix.UnixAppLogger._getLogObserver)
        self.assertIn(
            "def rotateLog",
            source,
            self.broke("twistd's UnixAppLogger no longer installs a rotateLog closure for SIGUSR1"),
        )
        self.assertIn("logFile.rotate", source, self.broke("twistd's rotateLog no longer rotates logFile"))
        log_file = LogFile("test.log", self.mktemp_dir())

        def rotateLog(signal: object, frame: object) -> None:
            log_file.rotate()

        self.assertIs(_compat.twistd_log_file(rotateLog), log_file)
        self.assertIsNone(_compat.twistd_log_file(lambda s, f: None))
        log_file.close()

    def mktemp_dir(self) -> str:
        import os

        path = self.mktemp()
        os.makedirs(path)
        return path


class SlotNamesCanaryTests(SynchronousTestCase):
    """REQUEST_SLOTS and CHANNEL_SLOTS (with slot_defaults and
    fill_slot_defaults) name the instance attributes of Twisted's Request
    and HTTPChannel, private ones included."""

    def broke(self, what: str) -> str:
        return (
            f"Twisted {twisted.__version__}: {what}. "
            "twisted_forward/_compat.py slots it: adapt REQUEST_SLOTS/CHANNEL_SLOTS there."
        )

    def test_no_slot_hides_a_method(self) -> None:
        """No slotted name is a method or property of the Twisted class
        (a slot would hide it)."""
        from twisted.web.server import Request

        for owner, names in ((Request, _compat.REQUEST_SLOTS),
                             (_compat.ChannelHooks, _compat.CHANNEL_SLOTS),
                             (_compat.HTTP11ClientProtocol, _compat.CLIENT_PROTOCOL_SLOTS),
                             (_compat.HTTP11ClientFactory, _compat.CLIENT_FACTORY_SLOTS)):
            for name in names:
                value = getattr(owner, name, None)
                self.assertFalse(
                    isinstance(value, property)
                    or (callable(value) and not isinstance(value, type)),
                    self.broke(f"{owner.__name__}.{name} is now a method"),
                )

    def test_private_names_still_set(self) -> None:
        """The private channel names slotted are still ones Twisted sets on
        an HTTPChannel that has read a request (a name Twisted dropped only
        costs memory; this says which)."""
        channel = http.HTTPChannel()
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        private = [n for n in _compat.CHANNEL_SLOTS if n.startswith("_") and "__" not in n]
        # Set only while a producer is registered or an answer is written.
        private = [n for n in private if n not in ("_requestProducer",
                                                   "_requestProducerStreaming", "_savedTimeOut")]
        for name in private:
            self.assertIn(name, vars(channel), self.broke(f"HTTPChannel no longer sets {name}"))
        defaults = dict(_compat.slot_defaults(http.HTTPChannel, _compat.CHANNEL_SLOTS))
        self.assertEqual(defaults["_HTTPChannel__header"], b"")
        target = http.HTTPChannel()
        _compat.fill_slot_defaults(target, [("persistent", 0)])
        self.assertEqual(target.persistent, 0)


    def test_client_protocol_names(self) -> None:
        """CLIENT_PROTOCOL_SLOTS are exactly the names HTTP11ClientProtocol
        sets on an instance that has sent a request and is reading its
        answer's body; CLIENT_FACTORY_SLOTS, those _HTTP11ClientFactory sets
        on a started factory (a new name only costs memory; this says
        which)."""
        protocol, responses = _answer_head_in()
        self.assertEqual(len(responses), 1)
        self.assertEqual(
            sorted(vars(protocol)), sorted(_compat.CLIENT_PROTOCOL_SLOTS),
            self.broke("HTTP11ClientProtocol sets other instance attributes"),
        )
        defaults = dict(_compat.slot_defaults(_compat.HTTP11ClientProtocol,
                                              _compat.CLIENT_PROTOCOL_SLOTS))
        self.assertEqual(defaults["_state"], "QUIESCENT", self.broke("a new protocol's state"))
        self.assertIsNone(defaults["_parser"])

        factory = _compat.HTTP11ClientFactory(lambda p: None, "metadata")
        factory.doStart()
        self.assertEqual(
            sorted(vars(factory)), sorted(_compat.CLIENT_FACTORY_SLOTS),
            self.broke("_HTTP11ClientFactory sets other instance attributes"),
        )


def _answer_head_in() -> tuple[Any, list[Any]]:
    """An HTTP11ClientProtocol whose chunked answer's head has come:
    (the protocol, the answers it gave: one)."""
    from twisted.web._newclient import Request as ClientRequest
    from twisted.web.http_headers import Headers

    protocol = _compat.HTTP11ClientProtocol(lambda p: None)
    protocol.makeConnection(StringTransport())
    answers: list[Any] = []
    protocol.request(
        ClientRequest(b"GET", b"/", Headers({b"host": [b"x"]}), None, persistent=True)
    ).addCallback(answers.append)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    return protocol, answers


def _answer_mid_body() -> tuple[Any, Any]:
    """An HTTP11ClientProtocol reading a chunked answer's body: (its
    parser, the answer)."""
    protocol, answers = _answer_head_in()
    parser = protocol._parser
    answers[0].deliverBody(Protocol())
    protocol.dataReceived(b"5\r\ndata:\r\n")
    return parser, answers[0]


class ClearHeadersCanaryTests(SynchronousTestCase):
    """clear_headers relies on Headers keeping its fields in the dict
    ``_rawHeaders``."""

    def test_clear_headers(self) -> None:
        """The private dict is there and cleared; the Headers object still
        works after, and an object without it is emptied the public way."""
        from twisted.web.http_headers import Headers

        headers = Headers({b"a": [b"1"], b"b": [b"2", b"3"]})
        raw = getattr(headers, "_rawHeaders", None)
        self.assertIsInstance(
            raw, dict,
            f"Twisted {twisted.__version__}: Headers no longer keeps a _rawHeaders dict; "
            "adapt _compat.clear_headers",
        )
        _compat.clear_headers(headers)
        self.assertEqual(list(headers.getAllRawHeaders()), [])
        self.assertEqual(raw, {})
        headers.setRawHeaders(b"c", [b"4"])
        self.assertEqual(headers.getRawHeaders(b"c"), [b"4"])

        class Other:
            def __init__(self) -> None:
                self.fields = {b"a": [b"1"]}

            def getAllRawHeaders(self) -> Any:
                return iter(self.fields.items())

            def removeHeader(self, name: bytes) -> None:
                del self.fields[name]

        other = Other()
        _compat.clear_headers(other)
        self.assertEqual(other.fields, {})


class SetHeaderValuesCanaryTests(SynchronousTestCase):
    """set_header_values relies on Headers keeping its fields in the dict
    ``_rawHeaders``, keyed by the name setRawHeaders files them under."""

    PAIRS = [
        (b"x-ratelimit-limit-requests", b"60"),
        (b"x-ratelimit-remaining-requests", b"59"),
        (b"x-ratelimit-reset-requests", b"1m0s"),
        (b"Retry-After", b"3"),
        (b"etag", b"abc"),  # a name Twisted spells its own way (ETag)
        (b"x-ratelimit-limit-requests", b"61"),  # set again: replaced in its place
    ]

    def test_same_fields_as_set_raw_headers(self) -> None:
        """On an empty Headers and on one holding some of the names already
        (an upstream's own ``x-ratelimit-*``), the fields, their order and
        the value lists are what setRawHeaders makes; the names are looked
        up by both spellings after."""
        from twisted.web.http_headers import Headers

        self.assertIsInstance(
            getattr(Headers(), "_rawHeaders", None), dict,
            f"Twisted {twisted.__version__}: Headers no longer keeps a _rawHeaders dict; "
            "adapt _compat.set_header_values",
        )
        for before in ({}, {b"Content-Type": [b"a"], b"X-RateLimit-Remaining-Requests": [b"7"],
                            b"date": [b"d"]}):
            ours, theirs = Headers(before), Headers(before)
            _compat.set_header_values(ours, self.PAIRS)
            for name, value in self.PAIRS:
                theirs.setRawHeaders(name, [value])
            self.assertEqual(list(ours.getAllRawHeaders()), list(theirs.getAllRawHeaders()))
            self.assertEqual(ours.getRawHeaders(b"X-RATELIMIT-RESET-REQUESTS"), [b"1m0s"])
            self.assertEqual(ours.getRawHeaders(b"x-ratelimit-limit-requests"), [b"61"])
            # Changed afterwards the public way, as any other field.
            ours.setRawHeaders(b"x-ratelimit-reset-requests", [b"2s"])
            ours.removeHeader(b"etag")
            self.assertEqual(ours.getRawHeaders(b"X-Ratelimit-Reset-Requests"), [b"2s"])
            self.assertFalse(ours.hasHeader(b"ETag"))

    def test_without_the_dict(self) -> None:
        """An object without the dict gets setRawHeaders calls."""

        class Other:
            def __init__(self) -> None:
                self.calls: list[tuple[bytes, list[bytes]]] = []

            def setRawHeaders(self, name: bytes, values: list[bytes]) -> None:
                self.calls.append((name, values))

        other = Other()
        _compat.set_header_values(other, self.PAIRS[:2])  # type: ignore[arg-type]  # duck-typed, as the fallback is
        self.assertEqual(other.calls, [(n, [v]) for n, v in self.PAIRS[:2]])

    def test_name_not_a_token(self) -> None:
        """A name setRawHeaders refuses is refused the same way."""
        from twisted.web.http_headers import Headers, InvalidHeaderName

        self.assertRaises(InvalidHeaderName, _compat.set_header_values, Headers(), [(b"a b", b"1")])


class LateAttributesCanaryTests(TestCase):
    """LATE_ATTRIBUTES names what Twisted sets on its upstream-side objects
    (a name it adds only costs memory again; these say which)."""

    def names(self, cls: type) -> set[str]:
        return {n for c, names in _compat.LATE_ATTRIBUTES if c is cls for n in names}

    def test_names_are_plain_attributes(self) -> None:
        """No primed name is a property or slot of its class (priming skips
        those, so the table would not get it)."""
        for cls, names in _compat.LATE_ATTRIBUTES:
            for name in names:
                self.assertFalse(
                    hasattr(type(getattr(cls, name, None)), "__set__"),
                    f"Twisted {twisted.__version__}: {cls.__name__}.{name} is a descriptor now",
                )

    def test_parser_and_answer(self) -> None:
        """Mid-body, the parser and the answer carry only primed names."""
        from twisted.web._newclient import HTTPClientParser, Response

        parser, answer = _answer_mid_body()
        for obj, cls in ((parser, HTTPClientParser), (answer, Response)):
            self.assertLessEqual(
                set(vars(obj)), self.names(cls),
                f"Twisted {twisted.__version__}: {cls.__name__} sets other attributes; "
                "add them to _compat.LATE_ATTRIBUTES",
            )

    def test_tcp_client_and_connector(self) -> None:
        """A connected TCP client transport and its connector (real loopback
        connection) carry only primed names."""
        from twisted.internet import reactor
        from twisted.internet.protocol import ClientFactory, Factory

        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        made: Deferred[Any] = Deferred()

        class Client(Protocol):
            def connectionMade(self) -> None:
                made.callback(self.transport)

        lost: Deferred[None] = Deferred()

        class Factory_(ClientFactory):
            protocol = Client

            def clientConnectionLost(self, connector: Any, reason: Any) -> None:
                lost.callback(None)

        factory = Factory_()
        connector = reactor.connectTCP("127.0.0.1", port.getHost().port, factory)

        def check(transport: Any) -> Any:
            for obj, cls in ((transport, tcp.Client), (connector, tcp.Connector)):
                self.assertLessEqual(
                    set(vars(obj)), self.names(cls),
                    f"Twisted {twisted.__version__}: {cls.__name__} sets other attributes; "
                    "add them to _compat.LATE_ATTRIBUTES",
                )
            transport.loseConnection()
            return lost

        return made.addCallback(check)

    def test_prime_fills_the_table(self) -> None:
        """prime_instance_layouts sets each name on a throwaway instance:
        a class primed with a name keeps working as before."""

        class Fresh:
            value = 1
            late: int

        _compat.prime_instance_layouts([(Fresh, ("late", "value"))])
        fresh = Fresh()
        self.assertEqual(fresh.value, 1)
        self.assertFalse(hasattr(fresh, "late"))
        fresh.late = 2
        self.assertEqual(vars(fresh), {"late": 2})


class CanaryCoverageTests(SynchronousTestCase):
    """Every private use _compat.py fences has its canary above."""

    def test_every_export_has_a_canary(self) -> None:
        """Each name _compat exports is in its __all__ and named by a canary
        in this module (a new private use needs its own test here)."""
        import ast
        import sys

        with open(_compat.__file__, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        defined = {
            node.name
            for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
        }
        self.assertEqual(
            sorted(defined - set(_compat.__all__)), [], "defined in _compat.py but not in its __all__"
        )
        source = inspect.getsource(sys.modules[__name__])
        canaries = source[: source.index("class CanaryCoverageTests")]
        self.assertEqual(
            [name for name in _compat.__all__ if name not in canaries],
            [],
            "exported by _compat.py with no canary in tests/test_compat.py",
        )

    def test_no_private_use_outside_compat(self) -> None:
        """Outside _compat.py the package touches no private name it does not
        define itself: no ``x._name`` of Twisted's or treq's, no
        ``getattr(x, "_name")``, no import from a private module or of a
        private name (``os._exit`` is documented public API)."""
        import ast
        import os

        package = os.path.dirname(_compat.__file__)
        own: set[str] = set()
        uses: list[tuple[str, int, str]] = []
        for folder, _, names in os.walk(package):
            for name in names:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
                where = os.path.relpath(path, os.path.dirname(package))
                if name == "_compat.py":
                    # What it sets (pool._factory, reactor._exitSignal) is
                    # Twisted's, not ours.
                    continue
                for node in ast.walk(tree):
                    own.update(_private_definitions(node))
                    uses.extend((where, node.lineno, use) for use in _private_uses(node))
        foreign = [u for u in uses if u[2] not in own | {"_exit"}]
        self.assertEqual(foreign, [], "private names used outside twisted_forward/_compat.py")

    def test_no_private_use_in_the_tests(self) -> None:
        """The tests, too, reach no private name of Twisted's or treq's
        (this module, the canary, excepted): they may use the package's own
        private names, not those a Twisted release may rename."""
        import ast
        import os

        here = os.path.dirname(os.path.abspath(__file__))
        package = os.path.dirname(_compat.__file__)
        own: set[str] = set()
        uses: list[tuple[str, int, str]] = []
        for folder, _, names in [*os.walk(package), (here, [], sorted(os.listdir(here)))]:
            for name in names:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    own.update(_private_definitions(node))
                    if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                        own.add(node.attr)  # set on a test's own object
                if folder == here and name != os.path.basename(__file__):
                    uses.extend((name, node.lineno, use)
                                for node in ast.walk(tree) for use in _private_uses(node))
        foreign = [u for u in uses if u[2] not in own | {"_exit"}]
        self.assertEqual(foreign, [], "tests using private Twisted names (fence them in _compat.py)")


def _private_definitions(node: Any) -> list[str]:
    """The private names ``node`` defines that other objects may reach: a
    function, method or class named ``_x``, or a module or class variable.
    (An attribute set on ``self`` is reached through ``self`` only.)"""
    import ast

    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        return [node.id]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _private_uses(node: Any) -> list[str]:
    """The private names ``node`` reads from elsewhere: ``x._name``,
    ``getattr(x, "_name")``, and imports from Twisted's or treq's private
    modules or of their private names."""
    import ast

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    if isinstance(node, ast.Attribute) and private(node.attr):
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            return []
        return [node.attr]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
        and private(node.args[1].value)
    ):
        return [node.args[1].value]
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("twisted", "treq"):
        parts = (node.module or "").split(".")
        return [p for p in parts if private(p)] + [a.name for a in node.names if private(a.name)]
    return []
