"""
The in-process channel behind C{octo run}'s default: the server and the
local workers' reactor share one process, so their messages can be handed
over as objects instead of being pickled, framed, sent through the loopback
interface, received, parsed and unpickled again.

It is a L{TaskServer}/L{TaskClient} pair like any transport's, so the core
cannot tell the difference, but it is not a plugin: it reaches nothing
outside its own process, and C{octo run -t NAME} still runs the local
workers over a real transport (to try one out, or to test it).

Messages are delivered in order, each from its own reactor turn rather than
from inside C{send()}, as a socket would deliver them: a handler that sends
while it handles a message never re-enters the other side.  C{writable()}
holds a sender back while the messages on their way carry more than
L{HIGH_WATER} bytes of task data, which keeps C{Outbox}'s promise that a
large blob is never queued whole.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from octotwist.flow import Backpressure
from octotwist.messages import Message
from octotwist.transport import (
    Accept,
    ChannelHandler,
    IReactor,
    MessageChannel,
    ServerSettings,
    TaskClient,
    TaskServer,
    Transport,
)

#: Bytes of task data (two 4 MiB parts) that may be on their way before
#: C{writable()} makes a sender wait.
HIGH_WATER = 8 * 1024 * 1024

#: What C{octo run} listens on by default; nothing outside this process.
ADDRESS_PREFIX = "embedded:"

_log = Logger()
_servers: dict[str, EmbeddedServer] = {}
_numbers = itertools.count(1)


def _size(message: Message) -> int:
    data = getattr(message, "data", None)
    return len(data) if isinstance(data, bytes) else 0


class _End(MessageChannel):
    """One end of an in-process connection: what it sends, the other end receives."""

    def __init__(self, reactor: IReactorTime, peer: str) -> None:
        self.reactor = reactor
        self._peer = peer
        self.other: _End
        self.handler: ChannelHandler | None = None
        self._inbox: deque[Message] = deque()  # for this end's handler
        self._inbox_bytes = 0
        self._delivery: Any = None  # the pending IDelayedCall
        # Our senders wait while the other end's inbox is full.
        self.pressure = Backpressure(HIGH_WATER)
        self.closed = False
        self._receiving = True  # False once this end's own side closed it
        self._lost = False

    @property
    def peer(self) -> str:
        return self._peer

    def send(self, message: Message) -> None:
        if self.closed:
            return
        other = self.other
        other._inbox.append(message)
        other._inbox_bytes += _size(message)
        self.pressure.update(other._inbox_bytes)
        other._schedule()

    def close(self) -> None:
        """
        Close both ends: the other end still gets what was sent to it, this
        end's handler nothing more (as a socket stops reading once it is
        closed); then each hears C{connection_lost} once.
        """
        self._receiving = False
        if self.closed:
            return
        self.closed = self.other.closed = True
        self.pressure.stopProducing()
        self.other.pressure.stopProducing()
        self.other._schedule()
        self._schedule()

    def writable(self) -> Deferred[None]:
        return self.pressure.writable()

    def _schedule(self) -> None:
        if self._delivery is None:
            self._delivery = self.reactor.callLater(0, self._deliver)

    def _deliver(self) -> None:
        """Hand this end's handler the messages that were waiting when this turn began."""
        self._delivery = None
        try:
            for _ in range(len(self._inbox)):
                message = self._inbox.popleft()
                self._inbox_bytes -= _size(message)
                if self.handler is not None and self._receiving and not self._lost:
                    try:
                        self.handler.message_received(message)
                    except Exception:
                        # What a socket transport does when its protocol
                        # raises: log it and drop the connection.
                        _log.failure("dropping the in-process connection: its handler raised")
                        self.close()
            if self._inbox:
                self._schedule()  # sent while we delivered: next turn
            elif self.closed and not self._lost:
                self._lost = True
                if self.handler is not None:
                    self.handler.connection_lost("connection closed")
        finally:
            self.other.pressure.update(self._inbox_bytes)


class EmbeddedServer(TaskServer):
    """Accepts L{EmbeddedClient}s of this process; listens on nothing."""

    def __init__(self, reactor: IReactor, settings: ServerSettings, accept: Accept) -> None:
        super().__init__(reactor, settings, accept)
        self.address = settings.listen
        self.ends: list[_End] = []

    @classmethod
    def needs_secret(cls, options: Any) -> bool:
        return False

    def listen(self) -> Deferred[str]:
        _servers[self.address] = self
        return succeed(self.address)

    def stop(self) -> Deferred[None]:
        _servers.pop(self.address, None)
        for end in self.ends:
            end.close()
        return succeed(None)


class EmbeddedClient(TaskClient):
    """Connects to an L{EmbeddedServer} of this process."""

    @classmethod
    def needs_secret(cls, options: Any) -> bool:
        return False

    @classmethod
    def address_to_endpoint(cls, address: str) -> str:
        return address

    def connect(self, accept: Accept) -> Deferred[MessageChannel]:
        server = _servers.get(self.settings.connect)
        if server is None:
            return fail(ConnectionRefusedError(f"no embedded server at {self.settings.connect}"))
        reactor = self.reactor
        ours, theirs = _End(reactor, "embedded:server"), _End(reactor, "embedded:local")
        ours.other, theirs.other = theirs, ours
        try:
            ours.handler = accept(ours)
            theirs.handler = server.accept(theirs)
        except Exception:
            ours.close()
            return fail()
        server.ends = [end for end in server.ends if not end.closed]
        server.ends.append(theirs)
        return succeed(ours)


class _EmbeddedTransport(Transport):
    def local_listen(self, directory: Any) -> str:
        return f"{ADDRESS_PREFIX}{next(_numbers)}"


#: What C{octo run} uses when no C{--transport} is given.
TRANSPORT = _EmbeddedTransport(
    name="embedded",
    description="in-process: octo run's server and its own workers, one process",
    server=EmbeddedServer,
    client=EmbeddedClient,
)
