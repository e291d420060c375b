"""
Length-prefixed frames for stream transports, fast for multi-megabyte frames.

L{FrameReceiver} is a drop-in for Twisted's C{Int32StringReceiver} (same
C{MAX_LENGTH}, C{stringReceived}, C{lengthLimitExceeded}, C{sendString}).
Twisted's receiver re-joins everything it has buffered on every read, which
is quadratic in the frame size: a 4 MiB data part arriving in 64 KiB reads is
copied about 32 times over.  This one keeps a frame's chunks as they arrive
and joins them once (a frame that arrives in one read is not copied at
all); C{sendString} hands the prefix and the frame to the transport
separately instead of concatenating them.

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
    _header = b""
    _need: int | None = None  # bytes of the current frame still to come
    _chunks: list[bytes] | None = None
    _generation = 0  # bumped when a handler resets the receiver

    def dataReceived(self, data: bytes) -> None:
        # The chunks of a frame are kept as they came and joined once: a
        # 4 MiB frame read 64 KiB at a time is copied once, not re-grown.
        generation = self._generation
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._need is None:
                take = min(_PREFIX.size - len(self._header), end - pos)
                self._header += bytes(view[pos : pos + take])
                pos += take
                if len(self._header) < _PREFIX.size:
                    return
                (length,) = _PREFIX.unpack(self._header)
                self._header = b""
                if length > self.MAX_LENGTH:
                    self._reset()
                    self.lengthLimitExceeded(length)
                    return
                self._need, self._chunks = length, []
                if length:
                    continue
            else:
                take = min(self._need, end - pos)
                assert self._chunks is not None
                self._chunks.append(data if take == end else bytes(view[pos : pos + take]))
                pos += take
                self._need -= take
                if self._need:
                    return
            chunks = self._chunks or [b""]
            self._need, self._chunks = None, None
            self.stringReceived(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            if self._generation != generation:  # a handler reset us (closing, say)
                return

    def _reset(self) -> None:
        """Forget any partial frame; what is left of the current read is dropped."""
        self._header, self._need, self._chunks = b"", None, None
        self._generation += 1

    def stringReceived(self, frame: bytes) -> None:
        """A whole frame arrived."""
        raise NotImplementedError

    def lengthLimitExceeded(self, length: int) -> None:
        """A frame longer than C{MAX_LENGTH} was announced: drop the connection."""
        assert self.transport is not None  # data arrived: connected
        self.transport.loseConnection()

    def sendString(self, frame: bytes) -> None:
        """Send one frame."""
        if len(frame) >= 2**32:
            raise ValueError(f"a frame of {len(frame)} bytes does not fit a 4-byte length")
        assert self.transport is not None, "not connected"
        self.transport.writeSequence([_PREFIX.pack(len(frame)), frame])
