"""
The base of a transport over a Twisted stream connection (TCP, TLS, a Unix
socket): L{StreamConnection}, and how such addresses are written.

Every such transport needs the same plumbing around its own authentication:
length-prefixed frames (L{octotwist.framing}), a small frame limit until the
peer has authenticated and the real one after, every message through the
core's channel layer (L{octotwist.secure}), flow control on Twisted's
producer contract (L{octotwist.flow}), a graceful close that does not hang on
a registered producer, a refusal that drops only the peer that misbehaved,
and the core told exactly once that the connection is gone.  Written once
here, a transport is its handshake: the example plugin
(C{examples/octotwist-unixcred}) is one subclass and two small classes.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IListeningPort,
    IReactorTime,
    ITCPTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from octotwist import handshake, secure
from octotwist.errors import RemoteProtocolError
from octotwist.flow import Backpressure
from octotwist.framing import FrameReceiver
from octotwist.messages import Message
from octotwist.transport import Accept, ChannelHandler, MessageChannel, no_delay

#: The limit on a frame once the peer has authenticated: a 4 MiB data part
#: and its header fit many times over, as does a job's pickled functions.
MAX_FRAME = 64 * 1024 * 1024

_log = Logger()

if TYPE_CHECKING:

    class _IStreamTransport(ITCPTransport, IConsumer):
        """
        What a stream connection's transport provides, over TCP, TLS or a
        Unix socket alike: C{abortConnection}, and a consumer's producer
        registration (L{ITransport} says neither).
        """


def peer_name(address: IAddress | None) -> str:
    """
    How logs name a peer: C{tcp:HOST:PORT} for an IP address (either
    family), C{unix:PATH} (C{unix:peer} for an unnamed Unix socket).
    """
    host = getattr(address, "host", None)
    if host is not None:
        return f"tcp:{host}:{getattr(address, 'port', '?')}"
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return f"unix:{name or 'peer'}"


def server_endpoint(address: IAddress) -> str:
    """
    The server endpoint string of where a port listens: what
    C{TaskServer.listen} returns for the log (C{tcp:HOST:PORT}, with an
    IPv6 address's colons escaped as endpoint strings want; C{unix:PATH}).
    """
    if isinstance(address, IPv6Address):
        return f"tcp:{address.host.replace(':', chr(92) + ':')}:{address.port}"
    if isinstance(address, IPv4Address):
        return f"tcp:{address.host}:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    return str(address)


class StreamConnection(FrameReceiver, MessageChannel):
    """
    One connection of a stream transport, either side, which is also the
    L{MessageChannel} the core sees once it is open.

    A subclass authenticates the peer: L{handshake_frame} gets every frame
    that arrives before the channel is open (at most L{MAX_LENGTH} bytes
    each, so a stranger makes us hold a few hundred bytes), and once the
    peer has proved itself the subclass calls L{open} with the core's
    L{secure.SecureChannel}.  From then on each frame is checked and
    decrypted by the channel layer and handed to the core; one that fails
    drops this connection, with the reason in the log.

    @cvar MAX_LENGTH: the frame limit before L{open}.
    @ivar max_frame: the limit on a message after L{open}.
    @ivar flow: paused by Twisted while the connection's write buffer is
        full; the core waits on it (L{writable}) before large messages.
    """

    MAX_LENGTH = handshake.MAX_FRAME
    #: Set when connected, before anything here runs.
    transport: _IStreamTransport

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.flow = Backpressure()
        self.secure: secure.SecureChannel | None = None
        self.handler: ChannelHandler | None = None
        #: Fires once the connection is gone, whatever ended it.
        self.closed: Deferred[None] = Deferred()
        #: What the core hears when the connection is gone.
        self.lost_reason = "connection closed"
        #: Closed or refused by us: nothing more is sent, nothing more reaches the core.
        self.closing = False
        self._producing = False

    # The channel the core sees.

    @property
    def peer(self) -> str:
        return peer_name(self.peer_address)

    @property
    def peer_address(self) -> IAddress | None:
        return None if self.transport is None else self.transport.getPeer()

    @property
    def serving(self) -> bool:
        """Whether the channel is open (L{open}) and not closing."""
        return self.secure is not None and not self.closing

    def send(self, message: Message) -> None:
        if self.connected and self.secure is not None and not self.closing:
            self.sendString(self.secure.encode(message))

    def close(self) -> None:
        """Close once what was written is sent, whatever the state."""
        self.closing = True
        if self.transport is None:
            return
        # A transport does not close while a producer is registered.
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        self.flow.resumeProducing()
        self.transport.loseConnection()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def writable(self) -> Deferred[None]:
        return self.flow.writable()

    # The connection.

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.transport.registerProducer(self.flow, True)
        self._producing = True

    def open(self, channel: secure.SecureChannel, accept: Accept) -> None:
        """The peer has authenticated: seal every frame with C{channel}, hand us to the core."""
        self.secure = channel
        self.MAX_LENGTH = self.max_frame + secure.OVERHEAD
        self.handler = accept(self)

    def stringReceived(self, frame: bytes) -> None:
        if self.closing:
            return
        if self.secure is None:
            self.handshake_frame(frame)
            return
        try:
            message = self.secure.decode(frame)
        except RemoteProtocolError as e:
            self.refuse(str(e))
            return
        if self.handler is not None:
            self.handler.message_received(message)

    def handshake_frame(self, frame: bytes) -> None:
        """A frame before L{open}: the subclass's handshake."""
        raise NotImplementedError

    def lengthLimitExceeded(self, length: int) -> None:
        self.refuse(f"frame of {length} bytes is over the limit of {self.MAX_LENGTH}")

    def refuse(self, why: str) -> None:
        """The peer misbehaved: say why, and drop this connection now."""
        if self.closing:
            return  # refused already, or closing on purpose
        self.log_refusal(why)
        self.lost_reason = why
        self.closing = True
        self._reset()  # nothing more of what it sent is read
        self.abort()

    def log_refusal(self, why: str) -> None:
        """
        Hook: log a refusal.  Anyone can make a server refuse them before
        they authenticate: a server logs those through a
        L{limits.RefusalLog}, which a flood cannot fill the log with.
        """
        _log.warn("closing connection from {peer}: {why}", peer=self.peer, why=why)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.flow.stopProducing()
        if self.handler is not None:
            handler, self.handler = self.handler, None
            handler.connection_lost(self.lost_reason)
        self.lost(reason)
        self.closed.callback(None)

    def lost(self, reason: Any) -> None:
        """Hook: the connection is gone (a client that never opened says why, say)."""


#: When a server stops: seconds to wait for authenticated peers to hang up
#: (they do when they read the core's Shutdown), then to close their
#: connections ourselves, then to abort what still lingers.
PEER_CLOSE_TIMEOUT = 5.0
CLOSE_TIMEOUT = 10.0


class Served(typing.Protocol):
    """What L{stop_serving} needs of a server's connection."""

    #: Fires once the connection is gone.
    closed: Deferred[None]

    @property
    def serving(self) -> bool:
        """Whether its peer has authenticated and the core holds it."""

    def close(self) -> None:
        """Close once what was written is sent."""

    def abort(self) -> None:
        """Drop it now."""


async def stop_serving(
    reactor: IReactorTime,
    port: IListeningPort | None,
    connections: Iterable[Served],
) -> None:
    """
    A stream server's graceful stop: stop listening; close the connections
    whose peers have not authenticated; let each peer that has close first,
    then close what is left, and abort what lingers past L{CLOSE_TIMEOUT}.

    Closing our end first while a peer is still sending (a heartbeat, say)
    would leave unread bytes on our socket; the kernel then resets the
    connection, and the peer may lose the Shutdown we just wrote.
    """
    if port is not None:
        await maybeDeferred(port.stopListening)
    connections = list(connections)
    for connection in connections:
        if not connection.serving:
            connection.close()
    closed = DeferredList([c.closed for c in connections])
    timers = [
        reactor.callLater(PEER_CLOSE_TIMEOUT, _each, connections, "close"),
        reactor.callLater(CLOSE_TIMEOUT, _each, connections, "abort"),
    ]
    await closed
    for timer in timers:
        if timer.active():
            timer.cancel()


def _each(connections: list[Served], method: str) -> None:
    for connection in connections:
        getattr(connection, method)()
