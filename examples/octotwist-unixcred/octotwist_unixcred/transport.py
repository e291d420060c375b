"""
The unixcred transport: octotwist messages in 4-byte length-prefixed frames
over a Unix-domain socket.

Authentication is the kernel's: each side reads the other's user id from
the socket (C{SO_PEERCRED}) as soon as it connects.  The server drops a
peer whose user id it does not allow without reading from it, and
otherwise sends one C{ACCEPTED} frame with a fresh X25519 public key; the
client checks that the server runs as its own user (or root) and answers
with its own.  Both derive the connection's keys from the exchange and
build the core's L{SecureChannel} (L{octotwist.secure}): after that, every
frame is one message, encrypted and authenticated by the core, exactly as
on the built-in transports.

Nobody can sit in the middle of a Unix socket the kernel vouches for, so
what the channel adds here is the core's integrity guarantees (a frame
cannot be altered, replayed, reordered or dropped unnoticed) at no cost in
code: a third-party transport gets them by calling the core, whatever way
it authenticates.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from octotwist import secure
from octotwist.errors import AuthenticationError
from octotwist.streams import StreamConnection, server_endpoint, stop_serving
from octotwist.transport import Accept, MessageChannel, TaskClient, TaskServer

ACCEPTED = b"octotwist-unixcred/2 accepted "
#: Names this protocol in the channel's keys.
CONTEXT = b"octotwist-unixcred/2"
PUBLIC_KEY_SIZE = 32


def default_socket() -> str:
    """Where the server listens, and clients connect, unless told otherwise."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/octotwist-{os.getuid()}"
    os.makedirs(runtime, mode=0o700, exist_ok=True)
    return os.path.join(runtime, "octotwist.sock")


def peer_uid(transport: Any) -> int:
    """The user id of the process at the other end of a Unix socket."""
    sock = transport.getHandle()
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class Connection(StreamConnection):
    """
    One connection, either side; it is also the channel the core sees.
    L{StreamConnection} does the frames, their limits, the channel layer,
    flow control and closing: what is left is the handshake.
    """

    def __init__(self, accept: Accept, allowed: set[int], is_server: bool) -> None:
        super().__init__()
        self.accept = accept
        self.allowed = allowed
        self.is_server = is_server
        self.ready: Deferred[MessageChannel] = Deferred()
        self.uid: int | None = None
        self._key = X25519PrivateKey.generate()

    @property
    def peer(self) -> str:
        return f"unix:uid={self.uid}"

    def connectionMade(self) -> None:
        super().connectionMade()
        self.uid = peer_uid(self.transport)
        if self.uid not in self.allowed:
            self.refuse(f"user id {self.uid} is not allowed")
        elif self.is_server:
            self.sendString(ACCEPTED + _public(self._key))

    def handshake_frame(self, frame: bytes) -> None:
        mine = _public(self._key)
        if self.is_server:  # the client's public key
            if len(frame) != PUBLIC_KEY_SIZE:
                self.refuse("malformed key exchange")
                return
            self._open(frame, frame, mine)
            return
        if not frame.startswith(ACCEPTED) or len(frame) != len(ACCEPTED) + PUBLIC_KEY_SIZE:
            self.refuse("the server does not speak unixcred/2")
            return
        theirs = frame[len(ACCEPTED) :]
        self.sendString(mine)
        if self._open(theirs, mine, theirs):
            self.ready.callback(self)

    def _open(self, peer_public: bytes, initiator_public: bytes, responder_public: bytes) -> bool:
        """
        Derive the channel from the exchange, and hand it to the core.

        @return: whether it opened: a key of low order (all zeros, say)
            gives no shared secret, and C{cryptography} raises for it.
        """
        try:
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:
            self.refuse("malformed key exchange (a key of low order)")
            return False
        channel = secure.SecureChannel.create(
            shared,
            initiator=not self.is_server,
            initiator_nonce=initiator_public,
            responder_nonce=responder_public,
            context=CONTEXT,
        )
        self.open(channel, self.accept)
        return True

    def lost(self, reason: Failure) -> None:
        if not self.is_server and not self.ready.called:
            self.ready.errback(
                AuthenticationError(
                    f"the server (user id {self.uid}) closed the connection: it does not allow "
                    f"our user id {os.getuid()} (it takes --allow-uid)"
                )
            )


class UnixCredServer(TaskServer):
    """Listens on a C{unix:} endpoint; allows the users C{--allow-uid} names."""

    _port: IListeningPort | None = None

    def listen(self) -> Deferred[str]:
        if not self.settings.listen.startswith("unix:"):
            return fail(ValueError("unixcred listens on unix: endpoints, e.g. unix:/tmp/octo.sock"))
        option = self.settings.options.get("allow-uid")
        allowed = {int(u) for u in option.split(",")} if option else {os.getuid()}
        self.connections: set[Connection] = set()

        def build() -> Connection:
            connection = Connection(self.accept, allowed, is_server=True)
            self.connections.add(connection)
            connection.closed.addCallback(lambda _: self.connections.discard(connection))
            return connection

        d = serverFromString(self.reactor, self.settings.listen).listen(Factory.forProtocol(build))
        return d.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> str:
        self._port = port
        return server_endpoint(port.getHost())

    async def _stop(self) -> None:
        port, self._port = self._port, None
        await stop_serving(self.reactor, port, self.connections)

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())


class UnixCredClient(TaskClient):
    """Connects to a C{unix:} endpoint; trusts a server of our own user (or root)."""

    @classmethod
    def address_to_endpoint(cls, address: str) -> str:
        if address in ("", "localhost"):
            return f"unix:{default_socket()}"
        if not address.startswith("unix:"):
            raise ValueError("unixcred connects to unix:PATH (a Unix socket), not to a host")
        return address

    def connect(self, accept: Accept) -> Deferred[MessageChannel]:
        factory = Factory.forProtocol(lambda: Connection(accept, {os.getuid(), 0}, False))
        d = clientFromString(self.reactor, self.settings.connect).connect(factory)
        return d.addCallback(lambda connection: connection.ready)
