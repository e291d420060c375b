"""L{TaskServer} and L{TaskClient} over any Twisted stream endpoint."""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred
from twisted.internet.endpoints import _parse, clientFromString, serverFromString
from twisted.internet.interfaces import IListeningPort

from octotwist.endpoints import with_backlog
from octotwist.errors import UsageError
from octotwist.streams import server_endpoint
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
    State,
)

#: When the server stops: seconds to wait for peers to hang up, then to
#: close their connections ourselves, then to abort what still lingers.
PEER_CLOSE_TIMEOUT = 5.0
CLOSE_TIMEOUT = 10.0


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
        """
        Stop listening; let each authenticated peer close first (it does so
        when it reads the final Shutdown), then close what is left.

        Closing our end first while a peer is still sending (a heartbeat,
        say) would leave unread bytes on our socket; the kernel then resets
        the connection, and the peer may lose the Shutdown we just wrote.
        """
        if self._port is not None:
            port, self._port = self._port, None
            await maybeDeferred(port.stopListening)
        if self._factory is None:
            return
        self._factory.refusals.flush()
        protocols = list(self._factory.protocols)
        for protocol in protocols:
            if protocol.state is not State.OPEN:
                protocol.lose_connection()
        closed = DeferredList([p.closed for p in protocols])
        timers = [
            self.reactor.callLater(PEER_CLOSE_TIMEOUT, _close_all, protocols),
            self.reactor.callLater(CLOSE_TIMEOUT, _abort_all, protocols),
        ]
        await closed
        for timer in timers:
            if timer.active():
                timer.cancel()


def _close_all(protocols: list) -> None:
    for protocol in protocols:
        protocol.lose_connection()


def _abort_all(protocols: list) -> None:
    for protocol in protocols:
        protocol.transport.abortConnection()


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
