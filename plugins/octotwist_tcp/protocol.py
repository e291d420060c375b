"""
The TCP transport's wire protocol: 4-byte length-prefixed frames; the core's
shared-secret handshake (L{octotwist.handshake}) before anything is decoded;
then one message per frame, sealed by the core's channel layer
(L{octotwist.secure}): encrypted and authenticated with keys only this
connection has, numbered per direction.

Until the handshake completes, frames are limited to L{HANDSHAKE_MAX_FRAME}
bytes and no frame reaches the codec, so a peer without the secret can make us
allocate at most a few hundred bytes and decode nothing.  A wrong proof
closes the connection on both sides; so does a frame that fails its
integrity check later (someone on the path altered, injected, replayed,
reordered or dropped one), with an "integrity" error in the log.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IConsumer, IDelayedCall, ITCPTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from octotwist import handshake, limits, secure, streams
from octotwist.errors import AuthenticationError, RemoteProtocolError
from octotwist.flow import Backpressure
from octotwist.framing import FrameReceiver
from octotwist.messages import Message
from octotwist.streams import peer_name
from octotwist.transport import Accept, ChannelHandler, IReactor, MessageChannel, no_delay

MAGIC = handshake.MAGIC
HANDSHAKE_MAX_FRAME = handshake.MAX_FRAME
#: Names this protocol in the handshake's proofs and the channel's keys.
CONTEXT = b"octotwist-tcp/2"
#: Default limit for frames after the handshake (the core's, for every stream transport).
MAX_FRAME = streams.MAX_FRAME
HANDSHAKE_TIMEOUT = 15.0

_log = Logger()


if TYPE_CHECKING:

    class _IStreamTransport(ITCPTransport, IConsumer):
        """
        What this protocol's transport provides, over TCP, TLS or a Unix
        socket alike: C{abortConnection}, and a consumer's producer
        registration (L{ITransport} says neither).
        """


class State(enum.Enum):
    AWAIT_CHALLENGE = "await challenge"  # client
    AWAIT_RESPONSE = "await response"  # server
    AWAIT_CONFIRM = "await confirm"  # client
    OPEN = "open"
    CLOSED = "closed"


class _Channel(MessageChannel):
    def __init__(self, protocol: _FramedProtocol) -> None:
        self._protocol = protocol

    @property
    def peer(self) -> str:
        return self._protocol.peer_name

    @property
    def peer_address(self) -> IAddress | None:
        transport = self._protocol.transport
        return None if transport is None else transport.getPeer()

    def send(self, message: Message) -> None:
        self._protocol.send_message(message)

    def close(self) -> None:
        self._protocol.close()

    def abort(self) -> None:
        transport = self._protocol.transport
        if transport is not None:
            transport.abortConnection()

    def writable(self) -> Deferred[None]:
        return self._protocol.flow.writable()


class _FramedProtocol(FrameReceiver):
    MAX_LENGTH = HANDSHAKE_MAX_FRAME

    state: State
    role = b""
    factory: _Factory
    #: Set when connected, before any of the methods below runs.
    transport: _IStreamTransport

    #: Our place among the connections that have not authenticated (server side).
    slot: limits.Slot | None = None

    def __init__(self) -> None:
        self.handler: ChannelHandler | None = None
        self.channel = _Channel(self)
        self.closed: Deferred[None] = Deferred()
        # Paused by Twisted while the socket's write buffer is full (a
        # separate producer: the receiver's own pauseProducing is for reading).
        self.flow = Backpressure()
        self._producing = False
        self._timeout: IDelayedCall | None = None
        self.lost_reason = "connection closed"
        self.secure: secure.SecureChannel | None = None

    @property
    def peer_name(self) -> str:
        return peer_name(self.transport.getPeer())

    def connectionMade(self) -> None:
        self.factory.protocols.add(self)
        no_delay(self.transport)
        self.transport.registerProducer(self.flow, True)
        self._producing = True
        self._timeout = self.factory.reactor.callLater(HANDSHAKE_TIMEOUT, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        self._timeout = None
        self.reject(f"no authentication within {HANDSHAKE_TIMEOUT:.0f} s")

    def _opened(self, channel: secure.SecureChannel) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        if self.slot is not None:
            self.slot.release()
        self.secure = channel
        self.state = State.OPEN
        self.MAX_LENGTH = self.factory.max_frame + secure.OVERHEAD
        self.handler = self.factory.accept(self.channel)

    def stringReceived(self, frame: bytes) -> None:
        if self.state is State.OPEN:
            assert self.secure is not None and self.handler is not None
            try:
                message = self.secure.decode(frame)
            except RemoteProtocolError as e:
                self.reject(str(e))
                return
            self.handler.message_received(message)
        elif self.state is not State.CLOSED:
            self.handshake_frame(frame)

    def handshake_frame(self, frame: bytes) -> None:
        raise NotImplementedError

    def lengthLimitExceeded(self, length: int) -> None:
        self.reject(f"frame of {length} bytes is over the limit of {self.MAX_LENGTH}")

    def reject(self, why: str) -> None:
        """The peer misbehaved: say so and drop the connection now."""
        if self.state is State.CLOSED:
            return
        refusals: limits.RefusalLog | None = getattr(self.factory, "refusals", None)
        if self.secure is None and refusals is not None:  # anyone can make us say this
            refusals.emit(
                LogLevel.warn, "closing connection from {peer}: {why}", peer=self.peer_name, why=why
            )
        else:
            _log.warn("closing connection from {peer}: {why}", peer=self.peer_name, why=why)
        self.lost_reason = why
        self.state = State.CLOSED
        self.transport.abortConnection()

    def send_message(self, message: Message) -> None:
        if self.state is State.OPEN:
            assert self.secure is not None
            self.sendString(self.secure.encode(message))

    def close(self) -> None:
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.lose_connection()

    def lose_connection(self) -> None:
        """Close once what was written is sent, whatever the state."""
        # A transport does not close while a producer is registered.
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        self.flow.resumeProducing()
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.slot is not None:
            self.slot.release()
        self.factory.protocols.discard(self)
        self.flow.stopProducing()
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self.state = State.CLOSED
        if self.handler is not None:
            handler, self.handler = self.handler, None
            handler.connection_lost(self.lost_reason)
        self.closed.callback(None)


class ServerProtocol(_FramedProtocol):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.state = State.AWAIT_RESPONSE
        self._handshake = handshake.ServerHandshake(self.factory.secret, CONTEXT)
        self.sendString(self._handshake.challenge())

    def handshake_frame(self, frame: bytes) -> None:
        try:
            reply, channel = self._handshake.receive(frame)
        except RemoteProtocolError as e:
            self.reject(str(e))
            return
        self.sendString(reply)
        self._opened(channel)


class ClientProtocol(_FramedProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.ready: Deferred[MessageChannel] = Deferred()

    def connectionMade(self) -> None:
        super().connectionMade()
        self.state = State.AWAIT_CHALLENGE
        self._handshake = handshake.ClientHandshake(self.factory.secret, CONTEXT)

    def handshake_frame(self, frame: bytes) -> None:
        try:
            if self.state is State.AWAIT_CHALLENGE:
                answer = self._handshake.respond(frame)
                self.state = State.AWAIT_CONFIRM
                self.sendString(answer)
                return
            channel = self._handshake.confirm(frame)
        except RemoteProtocolError as e:
            self._fail(e)
            return
        self._opened(channel)
        self.ready.callback(self.channel)

    def _fail(self, error: Exception) -> None:
        self.reject(str(error))
        if not self.ready.called:
            self.ready.errback(error)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        if not self.ready.called:
            if self._handshake.proved:
                error: Exception = AuthenticationError(
                    "the server closed the connection during authentication: "
                    "it does not have the same secret (check --secret-file / OCTO_SECRET)"
                )
            elif _is_tls_failure(reason.value):
                # Final: the same certificate will be refused again.
                error = AuthenticationError(
                    f"the server's TLS certificate was refused ({_tls_reason(reason.value)}): "
                    "trustRoots= must name a directory holding the certificate of the CA "
                    "that signed it (or the server's own), and the host name you connect "
                    "to must be one it names"
                )
            else:
                error = ConnectionError(
                    f"connection closed before authentication: {reason.value}"
                    + (
                        " (a TLS port? connect with --connect tls:HOST:PORT:trustRoots=DIR)"
                        if "non-clean" in str(reason.value)
                        else ""
                    )
                )
            self.ready.errback(error)


def _is_tls_failure(error: BaseException) -> bool:
    """A certificate or TLS handshake refusal (pyOpenSSL's, service_identity's)."""
    return type(error).__module__.split(".")[0] in ("OpenSSL", "service_identity")


def _tls_reason(error: BaseException) -> str:
    """C{[('SSL routines', '', 'certificate verify failed')]} as C{certificate verify failed}."""
    args = error.args[0] if error.args else None
    if isinstance(args, list) and args and all(isinstance(a, tuple) for a in args):
        return "; ".join(str(a[-1]) for a in args)
    return str(error) or type(error).__name__


class _Factory(Factory):
    noisy = False

    def __init__(self, reactor: IReactor, secret: bytes, accept: Accept, max_frame: int) -> None:
        self.reactor = reactor
        self.secret = secret
        self.accept = accept
        self.max_frame = max_frame
        self.protocols: set[_FramedProtocol] = set()


# Twisted types Factory.protocol as making a protocol whose `factory` is a
# Factory of that very protocol (Factory[P], generic in recent Twisted, which
# a base class here cannot subscript at runtime on the oldest we support);
# ours declare `factory: _Factory`, which serves both roles.
class ServerFactory(_Factory):
    protocol = ServerProtocol  # type: ignore[assignment]

    def __init__(self, reactor: IReactor, secret: bytes, accept: Accept, max_frame: int) -> None:
        super().__init__(reactor, secret, accept, max_frame)
        self.refusals = limits.RefusalLog(reactor)
        self.pending = limits.PreAuthLimit(self.refusals)

    def buildProtocol(self, addr: Any) -> ServerProtocol | None:  # type: ignore[override]
        """A protocol for a new connection, or C{None} (Twisted closes it) when too many wait."""
        slot = self.pending.take(addr)
        if slot is None:
            return None
        protocol = super().buildProtocol(addr)
        assert isinstance(protocol, ServerProtocol)
        protocol.slot = slot
        return protocol


class ClientFactory(_Factory):
    protocol = ClientProtocol  # type: ignore[assignment]  # as ServerFactory's
