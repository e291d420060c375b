"""
Flow control for a transport's channel: when may the core write again?

The core calls L{MessageChannel.writable} before each large message and
waits on what it returns, so that a worker that reads slowly (or not at
all) holds the server back to its own pace instead of filling the server's
memory with a job's inputs.  L{Backpressure} is the one object every
transport answers that with, on Twisted's own contract: it is an
C{IPushProducer}, so a transport over a Twisted stream connection registers
it (C{transport.registerProducer(backpressure, True)}) and Twisted pauses it
when the connection's write buffer passes its high-water mark and resumes it
once the buffer drains.  A transport with its own queue (an SSH channel's
window, HTTP's unacknowledged frames) calls L{Backpressure.update} with what
the queue holds instead.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class Backpressure:
    """
    Whether a connection's senders should wait, and their wait.

    @param high_water: for L{update}: senders wait while the queue holds
        this many bytes or more.
    @ivar paused: senders wait (L{writable} does not fire at once).
    @ivar stopped: the connection is gone: no one waits any more.
    """

    def __init__(self, high_water: int = 0) -> None:
        self.high_water = high_water
        self.paused = False
        self.stopped = False
        self._waiting: list[Deferred[None]] = []

    def writable(self) -> Deferred[None]:
        """Fires when senders may write: at once unless paused."""
        if not self.paused:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def update(self, queued: int) -> None:
        """The transport's own queue holds C{queued} bytes: pause or resume by L{high_water}."""
        if queued >= self.high_water:
            self.pauseProducing()
        else:
            self.resumeProducing()

    def pauseProducing(self) -> None:
        if not self.stopped:
            self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def stopProducing(self) -> None:
        """The connection is closed or lost: release every sender, for good."""
        self.stopped = True
        self.resumeProducing()
