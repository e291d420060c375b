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

from octotwist import codec
from octotwist.messages import Message
from octotwist.transport import MessageChannel

_log = Logger()

#: Makes the message that carries one part: C{(data, end) -> message}.
PartMessage = Callable[[bytes, bool], Message]


class Outbox:
    """Everything sent to one peer, in the order given."""

    def __init__(self, channel: MessageChannel) -> None:
        self.channel = channel
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
        C{blobs} only when the previous one is sent (a lazy iterable keeps
        memory down to one blob).
        """
        self._enqueue(message(data, end) for blob in blobs for data, end in codec.parts(blob))

    def clear(self) -> None:
        """Forget what is queued (the job is over, or the peer is gone)."""
        self._queue.clear()

    def _enqueue(self, messages: Iterator[Message]) -> None:
        self._queue.append(messages)
        if not self._pumping:
            self._pumping = True
            Deferred.fromCoroutine(self._pump()).addErrback(
                lambda f: _log.failure("sending to {peer}", f, peer=self.channel.peer)
            )

    async def _pump(self) -> None:
        try:
            while self._queue:
                messages = self._queue[0]
                for message in messages:
                    await self.channel.writable()
                    if not self._queue or self._queue[0] is not messages:
                        break  # cleared while we waited
                    self.channel.send(message)
                else:
                    self._queue.popleft()
        finally:
            self._pumping = False
