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

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from octotwist import handshake, limits, secure, streams
from octotwist.errors import AuthenticationError, RemoteProtocolError
from octotwist.streams import StreamConnection
from octotwist.transport import Accept, IReactor, MessageChannel

MAGIC = handshake.MAGIC
HANDSHAKE_MAX_FRAME = handshake.MAX_FRAME
#: Names this protocol in the handshake's proofs and the channel's keys.
CONTEXT = b"octotwist-tcp/2"
#: Default limit for frames after the handshake (the core's, for every stream transport).
MAX_FRAME = streams.MAX_FRAME
HANDSHAKE_TIMEOUT = 15.0

_log = Logger()


class State(enum.Enum):
    AWAIT_CHALLENGE = "await challenge"  # client
    AWAIT_RESPONSE = "await response"  # server
    AWAIT_CONFIRM = "await confirm"  # client
    OPEN = "open"
    CLOSED = "closed"


class _FramedProtocol(StreamConnection):
    """
    Either side of a connection: the core's stream base
    (L{octotwist.streams.StreamConnection}: frames, their limits, the
    channel layer, flow control, closing), with the shared secret's
    handshake, its deadline, and a server's limit on the connections that
    have not authenticated yet.
    """

    state = State.CLOSED
    factory: _Factory

    #: Our place among the connections that have not authenticated (server side).
    slot: limits.Slot | None = None

    def __init__(self) -> None:
        super().__init__()
        self._timeout: IDelayedCall | None = None

    @property
    def peer_name(self) -> str:
        return self.peer

    def connectionMade(self) -> None:
        self.factory.protocols.add(self)
        super().connectionMade()
        self._timeout = self.factory.reactor.callLater(HANDSHAKE_TIMEOUT, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        self._timeout = None
        self.refuse(f"no authentication within {HANDSHAKE_TIMEOUT:.0f} s")

    def _opened(self, channel: secure.SecureChannel) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        if self.slot is not None:
            self.slot.release()
        self.state = State.OPEN
        self.max_frame = self.factory.max_frame
        self.open(channel, self.factory.accept)

    def log_refusal(self, why: str) -> None:
        refusals: limits.RefusalLog | None = getattr(self.factory, "refusals", None)
        if self.secure is None and refusals is not None:  # anyone can make us say this
            refusals.emit(
                LogLevel.warn, "closing connection from {peer}: {why}", peer=self.peer, why=why
            )
        else:
            super().log_refusal(why)

    def refuse(self, why: str) -> None:
        self.state = State.CLOSED
        super().refuse(why)

    def close(self) -> None:
        self.state = State.CLOSED
        super().close()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.slot is not None:
            self.slot.release()
        self.factory.protocols.discard(self)
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self.state = State.CLOSED
        super().connectionLost(reason)


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
            self.refuse(str(e))
            return
        self.sendString(reply)
        self._opened(channel)


class ClientProtocol(_FramedProtocol):
    def __init__(self) -> None:
        super().__init__()
        # Cancelled (the worker stops, or its attempt timed out), the
        # connection goes too: a handshake that finished later would
        # otherwise open a session nobody waits for.
        self.ready: Deferred[MessageChannel] = Deferred(lambda _: self.abort())

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
        self.ready.callback(self)

    def _fail(self, error: Exception) -> None:
        self.refuse(str(error))
        if not self.ready.called:
            self.ready.errback(error)

    def lost(self, reason: Failure) -> None:
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
class ServerFactory(limits.SlottedFactory, _Factory):
    protocol = ServerProtocol  # type: ignore[assignment]

    def __init__(self, reactor: IReactor, secret: bytes, accept: Accept, max_frame: int) -> None:
        super().__init__(reactor, secret, accept, max_frame)
        self.refusals = limits.RefusalLog(reactor)
        self.pending = limits.PreAuthLimit(self.refusals)


class ClientFactory(_Factory):
    protocol = ClientProtocol  # type: ignore[assignment]  # as ServerFactory's
