"""
The in-process channel of C{octo run}: order, no re-entrance, backpressure
and an orderly close, driven by a L{Clock}; whole jobs over it run in
test_end_to_end (every C{octo run} without C{--transport}).
"""

from __future__ import annotations

from twisted.internet.task import Clock

from octotwist import embedded, messages
from octotwist.embedded import HIGH_WATER, EmbeddedClient, EmbeddedServer
from octotwist.messages import TaskId, TaskKind
from octotwist.transport import ClientSettings, MessageChannel, ServerSettings

T = TaskId(TaskKind.MAP, 0)


class _Handler:
    def __init__(self, channel: MessageChannel, reply: bool = False) -> None:
        self.channel = channel
        self.reply = reply
        self.got: list[messages.Message] = []
        self.lost: list[str] = []
        self.at_reply: list[int] = []  # what the peer had received as we replied
        self.peer_handler: _Handler | None = None

    def message_received(self, message: messages.Message) -> None:
        self.got.append(message)
        if self.reply:
            self.channel.send(messages.Heartbeat(()))
            self.at_reply.append(len(self.peer_handler.got) if self.peer_handler else -1)

    def connection_lost(self, reason: str) -> None:
        self.lost.append(reason)


def _pair(clock: Clock, reply: bool = False) -> tuple[MessageChannel, _Handler, _Handler]:
    """A server and a client end, connected; returns the client's end and both handlers."""
    handlers: dict[str, _Handler] = {}

    def accept_server(channel: MessageChannel) -> _Handler:
        handlers["server"] = _Handler(channel, reply)
        return handlers["server"]

    def accept_client(channel: MessageChannel) -> _Handler:
        handlers["client"] = _Handler(channel)
        return handlers["client"]

    address = embedded.TRANSPORT.local_listen(None)  # type: ignore[arg-type]
    server = EmbeddedServer(clock, ServerSettings(address, b""), accept_server)  # type: ignore[arg-type]
    assert server.listen().result == address
    d = EmbeddedClient(clock, ClientSettings(address, b"")).connect(accept_client)  # type: ignore[arg-type]
    handlers["server"].peer_handler = handlers["client"]
    return d.result, handlers["server"], handlers["client"]


def test_messages_arrive_in_order_and_never_inside_send() -> None:
    clock = Clock()
    channel, server, client = _pair(clock, reply=True)
    sent = [messages.Heartbeat(((T, n),)) for n in range(5)]
    for m in sent:
        channel.send(m)
    assert server.got == []  # a handler is never called from inside send()
    clock.advance(0)
    assert server.got == sent
    # The server replied to each as it came; the replies were delivered after
    # the server's handler returned, not inside its send(): all five arrive,
    # and none of them while the server was still handling the batch.
    assert len(client.got) == 5
    assert server.at_reply == [0, 0, 0, 0, 0]


def test_writable_waits_while_too_much_task_data_is_on_its_way() -> None:
    clock = Clock()
    channel, server, _ = _pair(clock)
    part = b"x" * (HIGH_WATER // 2)
    channel.send(messages.TaskInput(T, 1, part, end=False))
    assert channel.writable().called
    channel.send(messages.TaskInput(T, 1, part, end=True))
    waiting = channel.writable()
    assert not waiting.called
    clock.advance(0)
    assert waiting.called and len(server.got) == 2


def test_close_delivers_what_was_sent_then_tells_both_sides_once() -> None:
    clock = Clock()
    channel, server, client = _pair(clock)
    channel.send(messages.Heartbeat(()))
    channel.close()
    channel.close()
    channel.send(messages.Heartbeat(()))  # after close: dropped
    clock.advance(0)
    clock.advance(0)
    assert server.got == [messages.Heartbeat(())]
    assert server.lost == client.lost == ["connection closed"]


def test_connecting_to_no_server_is_refused() -> None:
    client = EmbeddedClient(Clock(), ClientSettings("embedded:nowhere", b""))  # type: ignore[arg-type]
    errors: list = []
    client.connect(lambda channel: _Handler(channel)).addErrback(errors.append)
    assert errors[0].check(ConnectionRefusedError)


def test_a_handler_that_raises_drops_the_connection_instead_of_stalling_it() -> None:
    clock = Clock()
    channel, server, client = _pair(clock)

    calls: list[messages.Message] = []

    def boom(message: messages.Message) -> None:
        calls.append(message)
        raise RuntimeError("a bug")

    server.message_received = boom  # type: ignore[method-assign]
    channel.send(messages.TaskInput(T, 1, b"x" * HIGH_WATER, end=True))
    for _ in range(2):
        channel.send(messages.Heartbeat(()))
    waiting = channel.writable()
    assert not waiting.called  # a full high-water mark on its way
    clock.advance(0)
    clock.advance(0)
    assert len(calls) == 1  # nothing more after it raised
    assert server.lost == client.lost == ["connection closed"]
    assert waiting.called  # the sender is not left waiting on a dead connection


def test_a_failing_accept_fails_the_connect_instead_of_raising() -> None:
    clock = Clock()
    address = embedded.TRANSPORT.local_listen(None)  # type: ignore[arg-type]

    def refuse(channel: MessageChannel) -> _Handler:
        raise RuntimeError("no")

    server = EmbeddedServer(clock, ServerSettings(address, b""), refuse)  # type: ignore[arg-type]
    server.listen()
    errors: list = []
    d = EmbeddedClient(clock, ClientSettings(address, b"")).connect(_Handler)  # type: ignore[arg-type]
    d.addErrback(errors.append)
    assert errors[0].check(RuntimeError)
    server.stop()
