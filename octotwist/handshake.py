"""
The shared secret's handshake for stream transports, with no I/O: a mutual
challenge-response that ends in a L{SecureChannel} on each side.

Three frames, none of them ever decoded as a message::

    server -> client   MAGIC + server_nonce
    client -> server   client_nonce + HMAC(secret, C + server_nonce + client_nonce)
    server -> client   HMAC(secret, S + client_nonce + server_nonce)

where C{C} is C{"client " + context + NUL} and C{S} is C{"server " + context
+ NUL}.

Both ends then derive the channel's keys from the secret and both nonces
(L{octotwist.secure.channel_keys}), so every later frame is sealed with
keys that exist only for this connection.  Someone who relays the three
frames unchanged learns nothing he can use: without the secret he cannot
read or forge a single frame after them.

A transport feeds the frames it receives in and sends the ones it gets back
(the TCP transport, over length-prefixed frames; any stream transport can
do the same).  Until the handshake is over, frames are at most
L{MAX_FRAME} bytes; a peer without the secret can make us allocate no more
and decode nothing.

The client proves itself first, so a server that does not have the secret
(a fake one) learns one HMAC of it, which it could attack offline: that is
why L{octotwist.auth} refuses secrets shorter than
L{octotwist.auth.MIN_SECRET_LENGTH} characters (C{octo secret} prints a good
one).
"""

from __future__ import annotations

from octotwist import auth
from octotwist.errors import AuthenticationError, RemoteProtocolError
from octotwist.secure import SecureChannel

#: What a server's first frame starts with; the number is the protocol's version.
MAGIC = b"OCTOTWIST/2 "
_FAMILY = b"OCTOTWIST/"
#: Longest frame either side accepts before the handshake is over.
MAX_FRAME = 256


def _role(role: bytes, context: bytes) -> bytes:
    return role + b" " + context + b"\0"


class ServerHandshake:
    """
    The server's side.

    @param secret: the shared secret.
    @param context: names the transport and its version (C{b"tcp/2"}); the
        same on both sides, and different for every protocol, so that a
        proof made for one protocol is worth nothing in another.
    """

    def __init__(self, secret: bytes, context: bytes) -> None:
        self._secret = secret
        self._context = context
        self._nonce = auth.new_nonce()

    def challenge(self) -> bytes:
        """The first frame, sent as soon as the connection is made."""
        return MAGIC + self._nonce

    def receive(self, frame: bytes) -> tuple[bytes, SecureChannel]:
        """
        The client's answer to the challenge.

        @return: the frame to send back (our own proof) and the channel.
        @raise AuthenticationError: the client does not know the secret.
        @raise RemoteProtocolError: the frame is not an answer at all.
        """
        n = auth.NONCE_SIZE
        if len(frame) != n + auth.DIGEST_SIZE:
            raise RemoteProtocolError("malformed authentication response")
        client_nonce, got = frame[:n], frame[n:]
        role = _role(b"client", self._context)
        if not auth.check_proof(self._secret, role, self._nonce, client_nonce, got):
            raise AuthenticationError("authentication failed (wrong secret)")
        reply = auth.proof(self._secret, _role(b"server", self._context), client_nonce, self._nonce)
        channel = SecureChannel.create(
            self._secret,
            initiator=False,
            initiator_nonce=client_nonce,
            responder_nonce=self._nonce,
            context=self._context,
        )
        return reply, channel


class ClientHandshake:
    """The client's side (see L{ServerHandshake} for the parameters)."""

    def __init__(self, secret: bytes, context: bytes) -> None:
        self._secret = secret
        self._context = context
        self._nonce = auth.new_nonce()
        self._server_nonce: bytes | None = None

    @property
    def proved(self) -> bool:
        """Whether we have sent our proof (a refusal after it means a wrong secret)."""
        return self._server_nonce is not None

    def respond(self, frame: bytes) -> bytes:
        """
        Our answer to the server's challenge frame.

        @raise RemoteProtocolError: the frame is no octotwist challenge of
            this version.
        """
        if not frame.startswith(MAGIC) or len(frame) != len(MAGIC) + auth.NONCE_SIZE:
            if frame.startswith(_FAMILY):
                version = frame[: frame.find(b" ")].decode("ascii", "replace")
                raise RemoteProtocolError(
                    f"the server speaks {version}, this client {MAGIC.decode().strip()}: "
                    "run the same octotwist version on the server and its workers"
                )
            raise RemoteProtocolError("the server does not speak the octotwist protocol")
        self._server_nonce = server_nonce = frame[len(MAGIC) :]
        role = _role(b"client", self._context)
        return self._nonce + auth.proof(self._secret, role, server_nonce, self._nonce)

    def confirm(self, frame: bytes) -> SecureChannel:
        """
        The server's proof; the channel if it checks out.

        @raise AuthenticationError: the server does not know the secret.
        """
        server_nonce = self._server_nonce
        if server_nonce is None:
            raise RemoteProtocolError("a confirmation before the challenge")
        role = _role(b"server", self._context)
        if not auth.check_proof(self._secret, role, self._nonce, server_nonce, frame):
            raise AuthenticationError("the server did not prove it knows the secret")
        return SecureChannel.create(
            self._secret,
            initiator=True,
            initiator_nonce=self._nonce,
            responder_nonce=server_nonce,
            context=self._context,
        )
