"""The Outbox keeps order and cuts blobs into parts only as the channel drains."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

from octotwist import codec, messages
from octotwist.messages import Message, TaskId, TaskKind
from octotwist.outbox import Outbox
from octotwist.transport import MessageChannel

TASK = TaskId(TaskKind.MAP, 3)


class Recording(MessageChannel):
    """A channel that records what it is sent and drains when told to."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.full = False
        self.waiting: list[Deferred[None]] = []

    @property
    def peer(self) -> str:
        return "test"

    def send(self, message: Message) -> None:
        self.sent.append(message)

    def close(self) -> None:
        pass

    def writable(self) -> Deferred[None]:
        if not self.full:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.waiting.append(d)
        return d

    def drain(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)


def part(data: bytes, end: bool) -> Message:
    return messages.TaskOutput(TASK, 1, 0, data, end)


def test_parts_go_out_only_as_the_channel_drains() -> None:
    channel = Recording()
    outbox = Outbox(channel)
    blob = bytes(range(256)) * (3 * codec.PART_SIZE // 256 + 1)  # four parts
    channel.full = True
    outbox.send_blob(blob, part)
    outbox.send(messages.TaskDone(TASK, 1))
    assert channel.sent == []  # nothing cut or queued while the channel is full
    for n in range(1, 4):
        channel.drain()
        assert len(channel.sent) == n
    channel.full = False
    channel.drain()
    kinds = [type(m).__name__ for m in channel.sent]
    assert kinds == ["TaskOutput"] * 4 + ["TaskDone"]  # the Done after every part
    assert b"".join(m.data for m in channel.sent[:4]) == blob
    assert [m.end for m in channel.sent[:4]] == [False, False, False, True]


def test_a_small_message_goes_at_once_when_nothing_is_queued() -> None:
    channel = Recording()
    outbox = Outbox(channel)
    outbox.send(messages.Heartbeat())
    assert channel.sent == [messages.Heartbeat()]


def test_clear_drops_what_is_queued() -> None:
    channel = Recording()
    outbox = Outbox(channel)
    channel.full = True
    outbox.send_blob(b"x" * (2 * codec.PART_SIZE), part)
    outbox.clear()
    outbox.send(messages.Shutdown(True))
    channel.full = False
    channel.drain()
    assert channel.sent == [messages.Shutdown(True)]


def test_blobs_are_made_only_as_the_channel_drains() -> None:
    channel = Recording()
    outbox = Outbox(channel)
    made: list[int] = []

    def blobs(n: int):
        made.append(n)
        yield bytes(10)

    channel.full = True
    outbox.send_blobs(blobs(1), part)
    outbox.send_blobs(blobs(2), part)
    assert made == []  # nothing made while the channel cannot take it
    channel.drain()
    assert made == [1]
    channel.drain()
    assert made == [1, 2]
    assert len(channel.sent) == 2


def test_a_blob_that_cannot_be_made_drops_what_depends_on_it() -> None:
    channel = Recording()
    told: list[tuple[str, str]] = []

    def on_error(failure, peer: str) -> None:
        told.append((failure.getErrorMessage(), peer))
        outbox.send(messages.Shutdown(False, "no input", False))

    outbox = Outbox(channel, on_error)

    def broken():
        yield bytes(10)
        raise ValueError("the source is gone")

    channel.full = True
    outbox.send_blobs(broken(), part)
    outbox.send(messages.Assign(TASK, 1))  # needs the input: must not go out
    channel.drain()  # the first blob's part
    channel.drain()  # the source raises
    assert told == [("the source is gone", "test")]
    assert [type(m) for m in channel.sent] == [messages.TaskOutput, messages.Shutdown]
    # The outbox still works afterwards.
    outbox.send(messages.TaskDone(TASK, 1))
    channel.full = False
    channel.drain()
    assert type(channel.sent[-1]) is messages.TaskDone
