"""
The C{octo} subsystem's channel: the TCP transport's 4-byte length-prefixed
frames, one L{octotwist.codec} message each, over one SSH session channel.

SSH has authenticated both ends before the subsystem opens, so there is no
HMAC handshake; instead the server's first frame is a hello::

    MAGIC + HMAC-SHA256(secret, "octo-ssh server" || SSH session id)

which a client uses when it has no other way to trust the host key (see
L{octotwist_ssh.client}).  The session id is unique to this connection and
bound to the host key by the key exchange, so the proof cannot be replayed
or relayed by someone in the middle.  No frame reaches the codec before the
subsystem is open (server) or the hello checked out (client).

Throughput: Conch's own C{SSHChannel.write} keeps the unsent rest of a
write as one C{bytes} and re-slices it on every window adjust, which makes a
large blob crawl.  L{FramedChannel} queues frames as memoryviews and sends
at most the remote window (in packets of the remote maximum) at a time,
topping up from L{addWindowBytes}; incoming frames come out of the core's
L{FrameBuffer}.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import SSHConnection
from twisted.conch.ssh.transport import DISCONNECT_PROTOCOL_ERROR
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure

from octotwist import codec, streams
from octotwist.errors import RemoteProtocolError
from octotwist.flow import Backpressure
from octotwist.framing import PREFIX, FrameBuffer, FrameTooLarge
from octotwist.messages import Message
from octotwist.transport import Accept, ChannelHandler, MessageChannel

SUBSYSTEM = b"octo"
MAGIC = b"OCTOTWIST-SSH/1 "
PROOF_SIZE = hashlib.sha256().digest_size
#: Frames allowed before the hello has been checked (client side).
HELLO_MAX_FRAME = 256
#: Limit on frames once open: the core's, for every stream transport.
MAX_FRAME = streams.MAX_FRAME
#: Our receive window: what the peer may send before we acknowledge.  Conch's
#: default (128 KiB) stalls the sender every few packets on a fast link.
LOCAL_WINDOW = 8 * 1024 * 1024
#: Largest data packet we accept.  RFC 4254 only promises 32 KiB, which is
#: what OpenSSH asks for; Conch peers (our client and server) can take more,
#: and fewer packets means less per-packet work in Python.
LOCAL_MAX_PACKET = 256 * 1024

#: L{MessageChannel.writable} waits while more than this is queued for the
#: channel (beyond the remote window, which is already in the SSH
#: connection's socket buffer): enough to keep the window full.
HIGH_WATER = 4 * 1024 * 1024

#: MACs in order of preference, for both ends.  Conch puts hmac-sha2-512
#: first; SHA-256 is twice as fast wherever the CPU has SHA extensions
#: (x86 since ~2017, ARMv8), and the MAC is the largest cost per byte here.
MACS = [b"hmac-sha2-256", b"hmac-sha2-512", b"hmac-sha2-384", b"hmac-sha1"]

_log = Logger()


class ConchLogging:
    """
    Mixin for our subclasses of Conch classes: keep Conch's own log events
    in the C{twisted.conch} namespace.  Twisted's C{Logger} descriptor names
    the namespace after the subclass, so Conch's chatter ("channel open",
    "connection lost") would otherwise look like ours and reach users.
    """

    if TYPE_CHECKING:
        # To mypy, the attribute of Conch's classes that this replaces (they
        # declare a writable one, which a read-only property may not override).
        _log: Logger
    else:

        @property
        def _log(self) -> Logger:
            return Logger(namespace=f"twisted.conch.{type(self).__name__}", source=self)


def session_proof(secret: bytes, role: bytes, session_id: bytes) -> bytes:
    """
    C{HMAC-SHA256(secret, "octo-ssh " + role + NUL + session_id)}: proof that
    the sender knows C{secret}, valid for this one SSH session only.
    """
    return hmac.new(secret, b"octo-ssh " + role + b"\0" + session_id, hashlib.sha256).digest()


def client_password(secret: bytes, session_id: bytes) -> bytes:
    """The SSH password a client sends when it authenticates with the shared secret."""
    return session_proof(secret, b"client", session_id).hex().encode("ascii")


def hello_frame(secret: bytes, session_id: bytes) -> bytes:
    return MAGIC + session_proof(secret, b"server", session_id)


class State(enum.Enum):
    PENDING = "pending"  # channel open, subsystem or hello not yet done
    OPEN = "open"
    CLOSING = "closing"  # close asked; draining what was queued
    CLOSED = "closed"


class _Messages(MessageChannel):
    """What the core holds: a thin face of a L{FramedChannel}."""

    def __init__(self, channel: FramedChannel) -> None:
        self._channel = channel

    @property
    def peer(self) -> str:
        return self._channel.peer_name

    @property
    def peer_address(self) -> IAddress | None:
        return self._channel.peer_address

    def send(self, message: Message) -> None:
        self._channel.send_message(message)

    def close(self) -> None:
        self._channel.close_gracefully()

    def abort(self) -> None:
        self._channel.abort()

    def writable(self) -> Deferred[None]:
        return self._channel.writable()


class FramedChannel(ConchLogging, SSHChannel):
    """
    An SSH session channel carrying octotwist frames; the server and client
    subclasses decide what opens it (L{open_messages}).
    """

    #: Given when the connection opens the channel, before anything here runs.
    conn: SSHConnection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("localWindow", LOCAL_WINDOW)
        kwargs.setdefault("localMaxPacket", LOCAL_MAX_PACKET)
        super().__init__(*args, **kwargs)
        self.state = State.PENDING
        self.handler: ChannelHandler | None = None
        self.messages = _Messages(self)
        self.decoder = FrameBuffer(HELLO_MAX_FRAME)
        self.lost_reason = "connection closed"
        self._outgoing: deque[memoryview] = deque()
        self._offset = 0
        self._queued = 0
        self.pressure = Backpressure(HIGH_WATER + 1)
        self._user = ""

    # Naming

    @property
    def peer_address(self) -> IAddress | None:
        """The address of the SSH connection's other end, while connected."""
        try:
            # Either transport may be None (not yet, or no longer connected).
            return self.conn.transport.transport.getPeer()  # type: ignore[union-attr]
        except AttributeError:
            return None

    @property
    def peer_name(self) -> str:
        addr: Any = self.peer_address
        if addr is None:
            return "ssh:?"
        host = getattr(addr, "host", None)
        where = f"{host}:{addr.port}" if host is not None else "unix"
        return f"ssh:{self._user}@{where}" if self._user else f"ssh:{where}"

    # Receiving

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        self.decoder.feed(data)
        while self.state is not State.CLOSED:
            try:
                frame = self.decoder.next_frame()
            except FrameTooLarge as e:
                self.reject(str(e))
                return
            if frame is None:
                return
            self.frame_received(frame)

    def frame_received(self, frame: bytes) -> None:
        """One whole frame; in the open state, one message."""
        if self.state in (State.OPEN, State.CLOSING) and self.handler is not None:
            try:
                message = codec.decode_message(frame)
            except RemoteProtocolError as e:
                self.reject(str(e))
                return
            self.handler.message_received(message)
        else:
            self.pending_frame(frame)

    def pending_frame(self, frame: bytes) -> None:
        """A frame before the channel is open (the subclass decides)."""
        self.reject("data before the octo subsystem was opened")

    def open_messages(self, accept: Accept) -> None:
        """The channel is authenticated: hand it to the core; messages flow from now on."""
        self.state = State.OPEN
        self.decoder.max_frame = MAX_FRAME
        self.handler = accept(self.messages)

    # Sending

    def send_frame(self, frame: bytes) -> None:
        if self.state is State.CLOSED or self.localClosed:
            return
        self._outgoing.append(memoryview(PREFIX.pack(len(frame))))
        self._outgoing.append(memoryview(frame))
        self._queued += PREFIX.size + len(frame)
        self.pressure.update(self._queued)
        self._pump()

    def send_message(self, message: Message) -> None:
        if self.state is State.OPEN:
            self.send_frame(codec.encode_message(message))

    def _pump(self) -> None:
        """Send what the remote window allows, coalescing small frames into one packet."""
        while self._outgoing and not self.localClosed:
            room = min(self.remoteWindowLeft, self.remoteMaxPacket)
            if room <= 0:
                return
            pieces = []
            size = 0
            while self._outgoing and size < room:
                head = self._outgoing[0]
                take = min(len(head) - self._offset, room - size)
                pieces.append(head[self._offset : self._offset + take])
                size += take
                self._offset += take
                if self._offset == len(head):
                    self._outgoing.popleft()
                    self._offset = 0
            self.remoteWindowLeft -= size
            self._queued -= size
            self.conn.sendData(self, b"".join(pieces))
        self.pressure.update(self._queued)
        if self.state is State.CLOSING and not self._outgoing:
            self._finish()

    def writable(self) -> Deferred[None]:
        """Fires when no more than L{HIGH_WATER} bytes wait for the window."""
        return self.pressure.writable()

    def _drop_queue(self) -> None:
        self._outgoing.clear()
        self._offset = 0
        self._queued = 0
        self.pressure.stopProducing()

    def addWindowBytes(self, data: int) -> None:
        self.remoteWindowLeft += data
        self._pump()

    # Closing

    def close_gracefully(self) -> None:
        """Close once everything queued has been sent."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        self.state = State.CLOSING
        self._pump()

    def _finish(self) -> None:
        """Everything is sent: end the stream and close the channel."""
        self.state = State.CLOSED
        if not self.localClosed:
            self.end_stream()
            self.conn.sendEOF(self)
            self.conn.sendClose(self)

    def end_stream(self) -> None:
        """Hook for what goes before EOF (the server sends an exit status)."""

    def abort(self) -> None:
        """
        Drop the SSH connection under this channel at once, with what is
        queued unsent (its peer cannot be reached); where there is no socket
        to drop, close gracefully.
        """
        try:
            socket = self.conn.transport.transport  # type: ignore[union-attr]
        except AttributeError:
            socket = None
        abort = getattr(socket, "abortConnection", None)
        if abort is None:
            self.close_gracefully()
        else:
            self.state = State.CLOSED
            abort()

    def loseConnection(self) -> None:
        self.close_gracefully()

    def eofReceived(self) -> None:
        # The peer sends nothing more: our half is done too once drained.
        self.close_gracefully()

    def closeReceived(self) -> None:
        # The peer closed the channel: it reads nothing more from it.
        self._drop_queue()
        self.state = State.CLOSED
        if not self.localClosed:
            self.conn.sendClose(self)

    def reject(self, why: str) -> None:
        """The peer misbehaved: say why and drop the whole SSH connection."""
        if self.state is State.CLOSED:
            return
        _log.warn("closing SSH connection from {peer}: {why}", peer=self.peer_name, why=why)
        self.lost_reason = why
        self.state = State.CLOSED
        self._drop_queue()
        assert self.conn.transport is not None  # data arrived over it
        self.conn.transport.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, why.encode()[:200])

    def closed(self) -> None:
        self.state = State.CLOSED
        self._drop_queue()
        if self.handler is not None:
            handler, self.handler = self.handler, None
            handler.connection_lost(self.lost_reason)
        self.channel_closed()

    def channel_closed(self) -> None:
        """Hook: the channel is gone (both sides closed, or the connection dropped)."""

    def openFailed(self, reason: Failure | Exception) -> None:
        self.state = State.CLOSED
        self._drop_queue()
        self.channel_closed()
