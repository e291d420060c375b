"""
The channel layer: every frame after authentication, in both directions, is
encrypted and authenticated, so that nobody on the path can read, alter,
inject, replay, reorder or drop a frame without the peer noticing.

A transport authenticates its peer its own way (the shared secret's
challenge-response in L{octotwist.handshake}, HTTP headers, the kernel's
word for a Unix socket's user), and ends up with key material both ends
share and nobody else has.  It then builds one L{SecureChannel} per
connection and puts every message through it:

    frame = channel.encode(message)      # to send
    message = channel.decode(frame)      # on receipt; raises IntegrityError

What it does:

  - B{keys}: HKDF-SHA256 over the key material (the shared secret, say),
    salted with both peers' fresh nonces, with a label naming the transport
    (L{channel_keys}); one key per direction, new for every connection, so
    a frame of one connection or direction means nothing in another.
  - B{frames}: AES-256-GCM (an AEAD from C{cryptography}; AES-NI and VAES
    make it several GB/s per core), with the frame's sequence number in its
    direction as the nonce, over a message's header and payload
    (L{octotwist.codec.message_parts}).  A frame decrypts only as the next one expected:
    an altered frame, a replayed one, one out of order, or the frame after a
    dropped one fails its tag, and the receiver closes the connection with an
    L{IntegrityError}.  A sealed frame is the plaintext plus 20 bytes
    (L{OVERHEAD}): the header's length and the tag.

What it does not do: hide the size and timing of frames, or keep a peer
that holds the secret from doing what the trust model lets it do (run code
as the server's user; docs/guide.md, "Security").  Dropping the I{last}
frames of a connection and then the connection itself cannot be told from
a connection that broke; the core treats both as a lost worker.

Why a sequence number and not a random nonce: both ends know it, so it
costs no bytes; it makes replay and reordering fail by construction; and
with a fresh key per connection and direction it can never repeat.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from octotwist import codec
from octotwist.errors import IntegrityError
from octotwist.messages import Message

_TAG = 16
_LENGTH = struct.Struct("!I")  # the header's length, before the ciphertext
#: Bytes a sealed frame has beyond its header and payload: the header's
#: length and the GCM tag.
OVERHEAD = _LENGTH.size + _TAG
KEY_SIZE = 32
#: Payloads from this size on are encrypted in place rather than joined to
#: their header first: a copy saved per 4 MiB part, a few microseconds lost
#: on small ones (GCM's streaming interface costs more to set up).
_STREAM_FROM = 64 * 1024
#: The version of this layer, mixed into every key.
_LABEL = b"octotwist/2 channel "
_NONCE = struct.Struct("!4xQ")  # 96 bits: 32 zero bits, then the sequence number
_MAX_SEQUENCE = 2**64 - 1


def channel_keys(
    key_material: bytes, *, initiator_nonce: bytes, responder_nonce: bytes, context: bytes
) -> tuple[bytes, bytes]:
    """
    The two keys of one connection: C{(initiator -> responder, responder ->
    initiator)}.  The initiator is the side that connected (the worker).

    @param key_material: what both ends know and nobody else does: the
        shared secret, or the result of a key exchange.
    @param initiator_nonce: the initiator's fresh random bytes for this
        connection; with the responder's, they make every connection's keys
        new even under the same secret.
    @param context: names the transport and its version (C{b"tcp/2"}), so
        that keys of one protocol are never keys of another.
    """
    if not key_material:
        raise ValueError("no key material: a channel needs a secret or an exchanged key")
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=2 * KEY_SIZE,
        salt=initiator_nonce + responder_nonce,
        info=_LABEL + context,
    ).derive(key_material)
    return okm[:KEY_SIZE], okm[KEY_SIZE:]


class FrameSealer:
    """
    One direction, sending side: seals frames numbered 0, 1, 2, ...

    A sealed frame is the header's length (4 bytes, in the clear but
    authenticated), then the header and the payload encrypted as one GCM
    message, then the tag.  A large payload is encrypted as it is, without
    first being joined to its header (GCM's streaming interface gives the
    same bytes as the one-shot call, so the receiver need not know which
    was used).
    """

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._aead = AESGCM(key)
        #: The sequence number the next frame gets.
        self.sequence = 0

    def seal(self, header: bytes, payload: bytes = b"") -> bytes:
        """Encrypt and authenticate the next frame."""
        seq = self.sequence
        if seq >= _MAX_SEQUENCE:
            raise OverflowError("2**64 frames on one connection: reconnect")
        self.sequence = seq + 1
        nonce = _NONCE.pack(seq)
        length = _LENGTH.pack(len(header))
        if len(payload) < _STREAM_FROM:
            return length + self._aead.encrypt(nonce, header + payload, length)
        encryptor = Cipher(algorithms.AES(self._key), modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(length)
        pieces = [length, encryptor.update(header), encryptor.update(payload)]
        encryptor.finalize()
        pieces.append(encryptor.tag)
        return b"".join(pieces)


class FrameOpener:
    """One direction, receiving side: opens frames numbered 0, 1, 2, ... in order."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._aead = AESGCM(key)
        #: The sequence number the next frame must have.
        self.sequence = 0

    def open(self, frame: bytes) -> tuple[bytes, bytes]:
        """
        Check and decrypt the next frame.

        @return: its header and payload (see L{FrameSealer}).
        @raise IntegrityError: it is not the next frame the peer sealed
            (altered, injected, replayed, out of order, or one went missing
            before it).  Nothing is returned and the sequence stays where it
            was: the caller closes the connection.
        """
        seq = self.sequence
        if len(frame) < OVERHEAD:
            raise IntegrityError(
                f"integrity check failed on frame {seq}: {len(frame)} bytes is too short "
                "for a sealed frame; the connection was tampered with (or the peer is broken)"
            )
        (n,) = _LENGTH.unpack_from(frame)
        body = len(frame) - OVERHEAD
        nonce = _NONCE.pack(seq)
        try:
            if n > body:
                raise InvalidTag()  # the length was altered: the tag would say so
            if body - n < _STREAM_FROM:
                plain = self._aead.decrypt(nonce, memoryview(frame)[_LENGTH.size :], frame[:4])
                header, payload = plain[:n], plain[n:]
            else:
                view = memoryview(frame)
                tag = bytes(view[-_TAG:])
                decryptor = Cipher(algorithms.AES(self._key), modes.GCM(nonce, tag)).decryptor()
                decryptor.authenticate_additional_data(frame[: _LENGTH.size])
                end = _LENGTH.size + n
                header = decryptor.update(view[_LENGTH.size : end])
                payload = decryptor.update(view[end:-_TAG])
                decryptor.finalize()
        except InvalidTag:
            raise IntegrityError(
                f"integrity check failed on frame {seq}: it was altered, injected, replayed, "
                "reordered or a frame before it was dropped on the way; someone on the path "
                "is tampering with the connection"
            ) from None
        self.sequence = seq + 1
        return header, payload


class SecureChannel:
    """
    Both directions of one authenticated connection, and the message codec:
    what a transport calls to turn messages into frames and back.

    Build it with L{SecureChannel.create} once the peer has authenticated.
    It does no I/O and keeps no buffers: a transport may call L{encode}
    ahead of time and send the frames later (HTTP queues them for polls),
    as long as it sends them in the order they were encoded, and calls
    L{decode} once per received frame, in order.
    """

    def __init__(self, send_key: bytes, receive_key: bytes) -> None:
        self.sealer = FrameSealer(send_key)
        self.opener = FrameOpener(receive_key)

    @classmethod
    def create(
        cls,
        key_material: bytes,
        *,
        initiator: bool,
        initiator_nonce: bytes,
        responder_nonce: bytes,
        context: bytes,
    ) -> SecureChannel:
        """
        The channel of one end of a connection (see L{channel_keys}).

        @param initiator: this end connected (the worker), rather than
            accepted the connection (the server).
        """
        forward, backward = channel_keys(
            key_material,
            initiator_nonce=initiator_nonce,
            responder_nonce=responder_nonce,
            context=context,
        )
        return cls(forward, backward) if initiator else cls(backward, forward)

    def seal(self, header: bytes, payload: bytes = b"") -> bytes:
        """Seal raw parts as the next outgoing frame (L{encode} seals a message)."""
        return self.sealer.seal(header, payload)

    def open(self, frame: bytes) -> tuple[bytes, bytes]:
        """Open the next incoming frame. @raise IntegrityError: see L{FrameOpener.open}."""
        return self.opener.open(frame)

    def encode(self, message: Message) -> bytes:
        """The next outgoing frame: C{message}, encoded and sealed."""
        return self.sealer.seal(*codec.message_parts(message))

    def decode(self, frame: bytes) -> Message:
        """
        The message in the next incoming frame, checked and decoded.

        @raise IntegrityError: the frame failed its integrity check.
        @raise RemoteProtocolError: it checked out but holds no valid message
            (a broken peer that has the key).
        """
        return codec.message_from_parts(*self.opener.open(frame))
