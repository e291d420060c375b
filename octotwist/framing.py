"""
Length-prefixed frames for stream transports, fast for multi-megabyte frames.

L{FrameReceiver} is a drop-in for Twisted's C{Int32StringReceiver} (same
C{MAX_LENGTH}, C{stringReceived}, C{lengthLimitExceeded}, C{sendString}).
Twisted's receiver re-joins everything it has buffered on every read, which
is quadratic in the frame size: a 4 MiB data part arriving in 64 KiB reads is
copied about 32 times over.  This one appends to a C{bytearray} and copies
each frame out once; C{sendString} hands the prefix and the frame to the
transport separately instead of concatenating them.

Transport plugins over Twisted stream connections use it for their wire
format (the TCP transport, the example plugin); it has nothing
octotwist-specific in it.
"""

from __future__ import annotations

import struct

from twisted.internet.protocol import Protocol

_PREFIX = struct.Struct("!I")


class FrameReceiver(Protocol):
    """
    Receives and sends frames of a 4-byte big-endian length then that many
    bytes.

    @cvar MAX_LENGTH: the longest frame accepted; a longer one calls
        L{lengthLimitExceeded} and nothing more is read from the connection.
    """

    MAX_LENGTH = 99_999
    _buffer: bytearray | None = None

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = bytearray()
        buffer += data
        while len(buffer) >= _PREFIX.size:
            (length,) = _PREFIX.unpack_from(buffer)
            if length > self.MAX_LENGTH:
                self._buffer = bytearray()
                self.lengthLimitExceeded(length)
                return
            end = _PREFIX.size + length
            if len(buffer) < end:
                return
            with memoryview(buffer) as view:
                frame = bytes(view[_PREFIX.size : end])
            del buffer[:end]  # cheap: a bytearray drops its head without moving the rest
            self.stringReceived(frame)
            if self._buffer is not buffer:  # a handler reset us (closing, say)
                return

    def stringReceived(self, frame: bytes) -> None:
        """A whole frame arrived."""
        raise NotImplementedError

    def lengthLimitExceeded(self, length: int) -> None:
        """A frame longer than C{MAX_LENGTH} was announced: drop the connection."""
        self.transport.loseConnection()

    def sendString(self, frame: bytes) -> None:
        """Send one frame."""
        if len(frame) >= 2**32:
            raise ValueError(f"a frame of {len(frame)} bytes does not fit a 4-byte length")
        self.transport.writeSequence([_PREFIX.pack(len(frame)), frame])
