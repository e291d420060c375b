"""
Sending large blobs without holding them twice: an L{Outbox} puts messages on
a L{MessageChannel} in order, and cuts a blob into its 4 MiB parts only as
the channel can take them (L{MessageChannel.writable}).

Without it, sending a 200 MB blob would queue all fifty encoded parts in the
transport's buffer at once, next to the blob itself.  With it, a connection
holds the blob plus a part or two, however large the blob.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from octotwist import codec
from octotwist.messages import Message
from octotwist.transport import MessageChannel

_log = Logger()

#: Makes the message that carries one part: C{(data, end) -> message}.
PartMessage = Callable[[bytes, bool], Message]


def _log_failure(failure: Failure, peer: str) -> None:
    _log.failure("sending to {peer}", failure, peer=peer)


class Outbox:
    """
    Everything sent to one peer, in the order given.

    Blobs may be made as they are sent (L{send_blobs} takes an iterable):
    if making one raises, what is queued is dropped, since the messages
    after it may need it (an C{Assign} after its task's input), and
    C{on_error} is told, with the failure and the peer's name.  It may
    queue more (a C{Shutdown}, say): the outbox goes on sending that.
    """

    def __init__(
        self,
        channel: MessageChannel,
        on_error: Callable[[Failure, str], None] = _log_failure,
    ) -> None:
        self.channel = channel
        self.on_error = on_error
        self._queue: deque[Iterator[Message]] = deque()
        self._pumping = False

    def send(self, message: Message) -> None:
        """Send C{message} after everything queued before it."""
        if not self._queue and not self._pumping:
            self.channel.send(message)
        else:
            self._enqueue(iter((message,)))

    def send_blob(self, blob: bytes, message: PartMessage) -> None:
        """
        Send C{blob} as parts, C{message(data, end)} each, waiting for the
        channel to drain between parts.
        """
        self.send_blobs((blob,), message)

    def send_blobs(self, blobs: Iterable[bytes], message: PartMessage) -> None:
        """
        Send each of C{blobs} as L{send_blob} does, taking the next blob from
        C{blobs} only when the previous one is sent and the channel is
        writable: a lazy iterable keeps memory down to one blob, however
        much is queued for a peer that reads slowly.
        """
        self._enqueue(message(data, end) for blob in blobs for data, end in codec.parts(blob))

    def clear(self) -> None:
        """Forget what is queued (the job is over, or the peer is gone)."""
        self._queue.clear()

    def _enqueue(self, messages: Iterator[Message]) -> None:
        self._queue.append(messages)
        if not self._pumping:
            self._pumping = True
            Deferred.fromCoroutine(self._pump()).addErrback(self._failed)

    async def _pump(self) -> None:
        # Wait first, then make the next message: a blob is made only when
        # the channel can take its first part.  (Writable, and nothing sent
        # since: no need to wait again.)
        ready = False
        try:
            while self._queue:
                messages = self._queue[0]
                if not ready:
                    await self.channel.writable()
                    ready = True
                    if not self._queue or self._queue[0] is not messages:
                        continue  # cleared while we waited
                try:
                    message = next(messages, None)
                except Exception:
                    self._queue.clear()
                    self._failed(Failure())
                    continue
                if message is None:
                    self._queue.popleft()
                else:
                    self.channel.send(message)
                    ready = False
        finally:
            self._pumping = False

    def _failed(self, failure: Failure) -> None:
        try:
            peer = self.channel.peer
        except Exception:
            peer = "?"
        try:
            self.on_error(failure, peer)
        except Exception:
            _log.failure("handling a failure to send to {peer}", peer=peer)
