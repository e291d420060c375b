"""L{TaskServer} and L{TaskClient} over any Twisted stream endpoint."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IListeningPort

from octotwist.transport import Accept, MessageChannel, TaskClient, TaskServer
from octotwist_tcp.protocol import MAX_FRAME, ClientFactory, ClientProtocol, ServerFactory

#: Seconds to wait for connections to flush and close when the server stops.
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
            endpoint = serverFromString(self.reactor, self.settings.listen)
        except Exception as e:
            return fail(e)
        d = endpoint.listen(self._factory)
        d.addCallback(self._listening)
        return d

    def _listening(self, port: IListeningPort) -> str:
        self._port = port
        addr = port.getHost()
        if isinstance(addr, IPv6Address):
            return f"tcp:{addr.host.replace(':', chr(92) + ':')}:{addr.port}"
        if isinstance(addr, IPv4Address):
            return f"tcp:{addr.host}:{addr.port}"
        if isinstance(addr, UNIXAddress):
            return f"unix:{addr.name.decode() if isinstance(addr.name, bytes) else addr.name}"
        return str(addr)

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """Stop listening, then close each connection once what was sent on it
        (the final Shutdown, say) is written; abort any that linger."""
        if self._port is not None:
            port, self._port = self._port, None
            await maybeDeferred(port.stopListening)
        if self._factory is None:
            return
        protocols = list(self._factory.protocols)
        for protocol in protocols:
            protocol.transport.loseConnection()
        closed = DeferredList([p.closed for p in protocols])
        timer = self.reactor.callLater(CLOSE_TIMEOUT, _abort_all, protocols)
        await closed
        if timer.active():
            timer.cancel()


def _abort_all(protocols: list) -> None:
    for protocol in protocols:
        protocol.transport.abortConnection()


class TCPTaskClient(TaskClient):
    """Connects to C{settings.connect}, a client endpoint string."""

    default_port = 18125

    def connect(self, accept: Accept) -> Deferred[MessageChannel]:
        factory = ClientFactory(
            self.reactor, self.settings.secret, accept, _max_frame(dict(self.settings.options))
        )
        endpoint = clientFromString(self.reactor, self.settings.connect)
        d = endpoint.connect(factory)

        def connected(protocol: ClientProtocol) -> Deferred[MessageChannel]:
            return protocol.ready

        return d.addCallback(connected)
