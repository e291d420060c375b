"""L{TaskServer} and L{TaskClient} over any Twisted stream endpoint."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import _parse, clientFromString, serverFromString
from twisted.internet.interfaces import IListeningPort

from octotwist.endpoints import with_backlog
from octotwist.errors import UsageError
from octotwist.streams import server_endpoint, stop_serving
from octotwist.transport import (
    Accept,
    ClientSettings,
    IReactor,
    MessageChannel,
    TaskClient,
    TaskServer,
)
from octotwist_tcp.protocol import (
    MAX_FRAME,
    ClientFactory,
    ClientProtocol,
    ServerFactory,
)


def _max_frame(options: dict) -> int:
    return int(options.get("max_frame") or MAX_FRAME)


class TCPTaskServer(TaskServer):
    """Listens on C{settings.listen}; any stream server endpoint string works."""

    _port: IListeningPort | None = None
    _factory: ServerFactory | None = None

    def listen(self) -> Deferred[str]:
        self._factory = ServerFactory(
            self.reactor, self.settings.secret, self.accept, _max_frame(dict(self.settings.options))
        )
        try:
            endpoint = serverFromString(self.reactor, with_backlog(self.settings.listen))
        except Exception as e:
            return fail(e)
        d = endpoint.listen(self._factory)
        d.addCallback(self._listening)
        return d

    def _listening(self, port: IListeningPort) -> str:
        self._port = port
        return server_endpoint(port.getHost())

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """Stop listening, and close every connection gracefully (L{stop_serving})."""
        port, self._port = self._port, None
        if self._factory is not None:
            self._factory.refusals.flush()
        protocols = self._factory.protocols if self._factory is not None else ()
        await stop_serving(self.reactor, port, protocols)


class TCPTaskClient(TaskClient):
    """
    Connects to C{settings.connect}, a client endpoint string.

    @raise UsageError: it is an C{ssl:} endpoint that would check nothing
        about the server (see L{check_tls}).
    """

    default_port = 18125

    def __init__(self, reactor: IReactor, settings: ClientSettings) -> None:
        super().__init__(reactor, settings)
        check_tls(settings.connect, bool(settings.options.get("insecure-tls")))

    def connect(self, accept: Accept) -> Deferred[MessageChannel]:
        factory = ClientFactory(
            self.reactor, self.settings.secret, accept, _max_frame(dict(self.settings.options))
        )
        endpoint = clientFromString(self.reactor, self.settings.connect)
        d = endpoint.connect(factory)

        def connected(protocol: ClientProtocol) -> Deferred[MessageChannel]:
            return protocol.ready

        return d.addCallback(connected)


def check_tls(endpoint: str, insecure: bool) -> None:
    """
    Refuse an C{ssl:} client endpoint without C{hostname=}: Twisted then
    checks neither the server's name nor (without C{caCertsDir=}) its
    certificate, so anyone on the path can stand in for the server at the
    TLS level.  The shared secret still authenticates the server and seals
    every frame (L{octotwist.secure}), so such TLS adds nothing but a
    false sense of safety; a user who wants it anyway says so with
    C{--insecure-tls}.  C{tls:} endpoints always check both.

    @raise UsageError: refused; the message says what to write instead.
    """
    args, kwargs = _parse(endpoint)
    if not args or str(args[0]).lower() != "ssl" or "hostname" in kwargs or insecure:
        return
    raise UsageError(
        f"{endpoint} would not check the server's certificate or name (an ssl: client "
        "endpoint checks nothing without hostname=): use tls:HOST:PORT:trustRoots=DIR, "
        "or add :hostname=NAME (and :caCertsDir=DIR for a private CA); or pass "
        "--insecure-tls to accept any certificate (the shared secret still authenticates "
        "the server and encrypts every frame)"
    )
