"""
Length-prefixed frames for stream transports, fast for multi-megabyte frames.

L{FrameBuffer} is the parser, without I/O (as h11's): feed it bytes as they
arrive, take whole frames out, and it refuses a frame whose length prefix is
over its limit before buffering any of it.  Every transport over a byte
stream uses it: the TCP transport and the example plugin through
L{FrameReceiver}, the SSH channel, the HTTP bodies, and a worker's pipes to
its task processes.

It keeps a frame's chunks as they arrive and joins them once (a frame that
arrives in one read is not copied at all): Twisted's C{Int32StringReceiver}
re-joins everything it has buffered on every read, which is quadratic in the
frame size, so that a 4 MiB data part arriving in 64 KiB reads is copied
about 32 times over.

L{FrameReceiver} is a drop-in for C{Int32StringReceiver} (the same
C{MAX_LENGTH}, C{stringReceived}, C{lengthLimitExceeded}, C{sendString}),
whose C{sendString} hands the prefix and the frame to the transport
separately instead of concatenating them.  Nothing here is
octotwist-specific.
"""

from __future__ import annotations

import struct
from collections import deque

from twisted.internet.protocol import Protocol

from octotwist.errors import RemoteProtocolError

#: The length prefix: 4 bytes, big-endian.
PREFIX = struct.Struct("!I")


class FrameTooLarge(RemoteProtocolError):
    """
    A frame's length prefix is over the limit: the peer is refused before
    any of the frame is buffered.

    @ivar length: what the prefix announced.
    @ivar limit: the limit it is over.
    """

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame of {length} bytes is over the limit of {limit}")
        self.length = length
        self.limit = limit


class FrameBuffer:
    """
    Frames of a 4-byte big-endian length and that many bytes, out of a byte
    stream fed in pieces of any size.

    @ivar max_frame: the longest frame accepted.  Read at each frame's
        prefix, so a limit raised once a peer has authenticated applies
        from the next frame on, even within the same read.
    """

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # into _chunks[0]
        self._have = 0  # bytes buffered, from _offset on
        self._need: int | None = None  # length of the frame whose prefix was read

    def feed(self, data: bytes) -> None:
        """Add bytes from the stream; take the frames with L{next_frame}."""
        if data:
            self._chunks.append(data if type(data) is bytes else bytes(data))
            self._have += len(data)

    def next_frame(self) -> bytes | None:
        """
        The next whole frame, or C{None} until more bytes are fed.

        @raise FrameTooLarge: the next frame announces more than
            C{max_frame} bytes.  Nothing more comes out of this buffer
            until L{clear}.
        """
        if self._need is None:
            if self._have < PREFIX.size:
                return None
            (length,) = PREFIX.unpack(self._take(PREFIX.size))
            if length > self.max_frame:
                self.clear()
                raise FrameTooLarge(length, self.max_frame)
            self._need = length
        if self._have < self._need:
            return None
        frame = self._take(self._need)
        self._need = None
        return frame

    def frames(self) -> list[bytes]:
        """Every whole frame buffered, in order (L{next_frame} until C{None})."""
        out = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out

    @property
    def pending(self) -> bool:
        """Whether a frame has begun (its prefix, or part of it) but not ended."""
        return self._have > 0 or self._need is not None

    def clear(self) -> None:
        """Forget everything buffered, a partial frame included."""
        self._chunks.clear()
        self._offset = self._have = 0
        self._need = None

    def _take(self, n: int) -> bytes:
        """The next C{n} buffered bytes (there are that many): one copy at most."""
        if not n:
            return b""
        chunks = self._chunks
        head = chunks[0]
        start = self._offset
        self._have -= n
        if len(head) - start > n:
            self._offset = start + n
            return head[start : start + n]
        if len(head) - start == n:
            chunks.popleft()
            self._offset = 0
            return head if start == 0 else head[start:]
        pieces = [memoryview(head)[start:]]
        got = len(head) - start
        chunks.popleft()
        self._offset = 0
        while got < n:
            head = chunks[0]
            want = n - got
            if len(head) <= want:
                pieces.append(memoryview(head))
                got += len(head)
                chunks.popleft()
            else:
                pieces.append(memoryview(head)[:want])
                self._offset = want
                got = n
        return b"".join(pieces)


class FrameReceiver(Protocol):
    """
    Receives and sends frames of a 4-byte big-endian length then that many
    bytes (L{FrameBuffer}).

    @cvar MAX_LENGTH: the longest frame accepted; a longer one calls
        L{lengthLimitExceeded} and nothing more is read from the connection.
        A handler may raise it (once its peer authenticated): it holds
        from the next frame on.
    """

    MAX_LENGTH = 99_999
    _buffer: FrameBuffer | None = None
    _generation = 0  # bumped when a handler resets the receiver

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = FrameBuffer(self.MAX_LENGTH)
        buffer.feed(data)
        generation = self._generation
        while True:
            buffer.max_frame = self.MAX_LENGTH
            try:
                frame = buffer.next_frame()
            except FrameTooLarge as e:
                self._reset()
                self.lengthLimitExceeded(e.length)
                return
            if frame is None:
                return
            self.stringReceived(frame)
            if self._generation != generation:  # a handler reset us (closing, say)
                return

    def _reset(self) -> None:
        """Forget any partial frame; what is left of the current read is dropped."""
        if self._buffer is not None:
            self._buffer.clear()
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
        self.transport.writeSequence([PREFIX.pack(len(frame)), frame])
