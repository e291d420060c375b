"""
One peer cannot wedge the job (security review, issue 12, finding 3).

An authenticated peer that sends nonsense values (a Hello with no slots,
output for an attempt it was never given) or a sequence the core refuses
(a second Hello, a TaskDone for an attempt never assigned) is closed, alone;
so is one whose message makes the core raise anything at all.  The job goes
on with the honest workers, its timers keep ticking, and the status page
keeps answering.  The worker treats a server that makes no sense the same
way.

First the server and worker cores in memory (a L{Clock}, channels that
record), then real processes: a raw client that authenticates over a real
socket with the handshake's own sans-IO classes and then misbehaves, and a
raw server that does the same to a real C{octo client}.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import finish, free_port, parse_tsv, start, wait_for_port
from test_end_to_end import job
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from octotwist import messages
from octotwist.client import WorkerSession
from octotwist.handshake import ClientHandshake, ServerHandshake
from octotwist.job import load_job
from octotwist.messages import TaskId, TaskKind
from octotwist.secure import SecureChannel
from octotwist.server import MAX_SLOTS, JobServer
from octotwist.transport import MessageChannel
from octotwist_tcp.protocol import CONTEXT

SECRET = "robustness-secret-0123456789"
M0, M5, R0 = TaskId(TaskKind.MAP, 0), TaskId(TaskKind.MAP, 5), TaskId(TaskKind.REDUCE, 0)

N = 12
WORDS = f"""
source = {{i: " ".join(f"w{{(i * j) % 7}}" for j in range(1, 6)) for i in range({N})}}
def mapfn(key, value):
    for w in value.split():
        yield w, 1
def reducefn(key, values):
    return key, len(values)
reduce_tasks = 3
"""
EXPECTED = Counter(f"w{(i * j) % 7}" for i in range(N) for j in range(1, 6))


def hello(name: str = "raw", **fields: Any) -> messages.Hello:
    values: dict[str, Any] = {"host": "h", "pid": 1, "slots": 1, "prefetch": 0} | fields
    return messages.Hello(name, values["host"], values["pid"], values["slots"], values["prefetch"])


# In memory


class Channel(MessageChannel):
    """The core's side of a connection, recording what it is sent."""

    def __init__(self, name: str = "test") -> None:
        self.name = name
        self.sent: list[messages.Message] = []
        self.closed = False

    @property
    def peer(self) -> str:
        return self.name

    def send(self, message: messages.Message) -> None:
        self.sent.append(message)

    def close(self) -> None:
        self.closed = True

    def assigned(self) -> list[tuple[TaskId, int]]:
        return [(m.task, m.attempt) for m in self.sent if isinstance(m, messages.Assign)]


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def new_server(tmp_path: Path, clock: Clock | None = None) -> JobServer:
    server = JobServer(load_job(job(tmp_path, WORDS)), clock or Clock(), progress_interval=0)
    server.start()
    return server


def connect(server: JobServer, name: str = "test") -> tuple[Any, Channel]:
    channel = Channel(name)
    return server.accept(channel), channel


def hang_up(session: Any, channel: Channel) -> None:
    """What a transport does once the core closed its channel."""
    assert channel.closed
    session.connection_lost("closed by the server")


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (hello(slots=0), "slots must be 1 to"),
        (hello(slots=-3), "slots must be 1 to"),
        (hello(slots=MAX_SLOTS + 1), "slots must be 1 to"),
        (hello(slots=2**63), "slots must be 1 to"),
        (hello(prefetch=-1), "prefetch must be 0 to"),
        (hello(prefetch=2**64 - 1), "prefetch must be 0 to"),
        (hello(""), "empty worker name"),
        (hello("evil\nworker joined"), "not a printable name"),
        (hello("x" * 10_000), "not a printable name"),
        (hello(pid=-1), "not a process id"),
        (messages.Heartbeat(), "expected Hello"),
        (messages.TaskDone(M0, 1), "expected Hello"),
    ],
)
def test_a_nonsense_hello_is_refused_and_leaves_no_ghost(
    tmp_path: Path, logged: list, message: messages.Message, why: str
) -> None:
    server = new_server(tmp_path)
    session, channel = connect(server, "bad")
    session.message_received(message)
    assert channel.closed and channel.assigned() == []
    warnings = [e for e in logged if e.get("log_level") == LogLevel.warn]
    assert any(why in e.get("error", "") for e in warnings), warnings
    assert server.scheduler.workers() == [] and server.status()["workers"] == []
    hang_up(session, channel)
    # An honest worker gets every task the bad one could have taken.
    good, good_channel = connect(server, "good")
    good.message_received(hello("good", slots=2))
    assert good_channel.assigned() == [(TaskId(TaskKind.MAP, 0), 1), (TaskId(TaskKind.MAP, 1), 1)]
    assert [w["name"] for w in server.status()["workers"]] == ["good"]


def test_reports_on_attempts_never_given_close_the_peer(tmp_path: Path) -> None:
    clock = Clock()
    server = new_server(tmp_path, clock)
    sequences: list[list[messages.Message]] = [
        [hello(), hello()],  # a second Hello
        [hello(), messages.TaskDone(M0, 7)],  # never assigned
        [hello(), messages.TaskDone(M5, 1)],  # another worker's attempt
        [hello(), messages.TaskOutput(M0, 2, 0, b"x")],  # an attempt never given
        [hello(), messages.TaskOutput(TaskId(TaskKind.MAP, 999), 1, 0, b"x")],  # no such task
        [hello(), messages.TaskOutput(M0, -1, 0, b"x")],  # negative attempt
        [hello(), messages.TaskOutput(M0, 1, -1, b"x")],  # negative partition
        [hello(), messages.TaskOutput(M0, 1, 3, b"x")],  # partition out of range
        [hello(), messages.TaskFailed(R0, 1, None, "E", "tb")],  # no reduce task yet
        [hello(), messages.Welcome("j", b"", 1, 1.0)],  # a server's message
    ]
    other, other_channel = connect(server, "other")
    other.message_received(hello("other", slots=6))  # runs map 0 to 5
    for sequence in sequences:
        session, channel = connect(server, "bad")
        for message in sequence:
            session.message_received(message)
        assert channel.closed, sequence
        hang_up(session, channel)
        assert server.scheduler.workers() == ["other"], sequence
    assert not other_channel.closed
    # Late output of a cancelled attempt is no fault: dropped, not refused.
    slow, slow_channel = connect(server, "slow")
    slow.message_received(hello("slow"))
    ((task, attempt),) = slow_channel.assigned()
    for _ in range(35):  # past the lease: every silent worker's attempts are cancelled
        clock.advance(1)
    assert messages.Cancel(task, attempt) in slow_channel.sent
    slow.message_received(messages.TaskOutput(task, attempt, 0, b"late"))
    assert not slow_channel.closed and server.store.in_memory == 0


def test_any_exception_closes_that_peer_alone_and_logs_one_traceback(
    tmp_path: Path, logged: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = new_server(tmp_path)
    good, good_channel = connect(server, "good")
    good.message_received(hello("good"))
    real_add_part = server.store.add_part

    def add_part(task: TaskId, attempt: int, partition: int, *args: Any) -> None:
        if partition == 2:  # what the bad peers send
            raise KeyError("a bug somewhere")
        real_add_part(task, attempt, partition, *args)

    monkeypatch.setattr(server.store, "add_part", add_part)
    for n in range(3):  # the same bug, three peers
        session, channel = connect(server, f"bad{n}")
        session.message_received(hello(f"bad{n}"))
        ((task, attempt),) = channel.assigned()
        session.message_received(messages.TaskOutput(task, attempt, 2, b"x"))
        assert channel.closed
        hang_up(session, channel)
    failures = [e for e in logged if e.get("log_failure") is not None]
    visible = [f for f in failures if f["log_level"] >= LogLevel.warn]
    assert len(visible) == 1  # one traceback; the others at debug
    errors = [e for e in logged if e.get("log_level") == LogLevel.error and "error" in e]
    assert len(errors) == 3 and all("KeyError" in e["error"] for e in errors)
    # The job goes on: the good worker finishes its task and gets the next.
    (task, attempt) = good_channel.assigned()[0]
    good.message_received(messages.TaskDone(task, attempt))
    assert not good_channel.closed and len(good_channel.assigned()) == 2


def test_timers_and_the_status_survive_any_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    server = JobServer(load_job(job(tmp_path, WORDS)), clock, progress_interval=5)
    server.start()
    session, channel = connect(server)
    session.message_received(hello())
    real_handle = server.scheduler.handle

    def handle(event: Any) -> Any:
        if type(event).__name__ == "Tick":
            raise RuntimeError("tick broke")
        return real_handle(event)

    monkeypatch.setattr(server.scheduler, "handle", handle)
    monkeypatch.setattr(server.scheduler, "running", lambda name: 1 / 0)
    clock.advance(1)
    clock.advance(5)
    assert server._ticker.running and server._progress.running
    status = server.status()  # one broken worker line does not break the page
    assert [w["name"] for w in status["workers"]] == ["raw"]
    monkeypatch.undo()
    for _ in range(35):  # past the lease: the silent worker's task is requeued
        clock.advance(1)
    assert server._ticker.running
    assert server.status()["workers"][0]["running"] == []
    assert not channel.closed


def test_a_failure_sending_work_drops_that_worker_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = new_server(tmp_path)
    good, good_channel = connect(server, "good")
    good.message_received(hello("good"))
    real_send = server._send_task

    def send_task(session: Any, *args: Any) -> None:
        if session.name == "bad":
            raise ValueError("cannot send")
        real_send(session, *args)

    monkeypatch.setattr(server, "_send_task", send_task)
    bad, bad_channel = connect(server, "bad")
    bad.message_received(hello("bad"))
    assert bad_channel.closed and not good_channel.closed
    hang_up(bad, bad_channel)
    (task, attempt) = good_channel.assigned()[0]
    good.message_received(messages.TaskDone(task, attempt))
    assert len(good_channel.assigned()) == 2


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (messages.Assign(M0, 1), "expected Welcome, got Assign"),
        (messages.TaskInput(M0, 1, b"x"), "expected Welcome, got TaskInput"),
        (messages.Welcome("j", b"", 0, 1.0), "0 reduce tasks"),
        (messages.Welcome("j", b"", 1, 0.0), "heartbeat interval of 0.0 s"),
    ],
)
def test_the_worker_hangs_up_on_a_server_making_no_sense(
    logged: list, message: messages.Message, why: str
) -> None:
    channel = Channel("server")
    session = WorkerSession(Clock(), channel, "w", 1)
    session.message_received(message)
    assert channel.closed and session.refused is not None and why in session.refused
    lines = [e for e in logged if e.get("log_level") == LogLevel.error]
    assert len(lines) == 1 and why in lines[0]["why"]
    session.message_received(messages.Assign(M0, 1))  # not read any more
    assert len([e for e in logged if e.get("log_level") == LogLevel.error]) == 1


# Real processes


class Frames:
    """4-byte big-endian length-prefixed frames over a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""

    def write(self, frame: bytes) -> None:
        self.sock.sendall(struct.pack("!I", len(frame)) + frame)

    def read(self) -> bytes | None:
        """The next frame, or C{None} once the peer closed."""
        while True:
            if len(self._buffer) >= 4:
                (length,) = struct.unpack("!I", self._buffer[:4])
                if len(self._buffer) >= 4 + length:
                    frame, self._buffer = self._buffer[4 : 4 + length], self._buffer[4 + length :]
                    return frame
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self._buffer += chunk

    def closed_by_peer(self, timeout: float = 30) -> bool:
        """Read (and drop) frames until the peer closes: C{False} if it does not in time."""
        self.sock.settimeout(timeout)
        try:
            while self.read() is not None:
                pass
        except TimeoutError:
            return False
        return True


class RawWorker:
    """An authenticated worker that sends whatever it is told to."""

    def __init__(self, port: int, secret: str = SECRET) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.frames = Frames(sock)
        handshake = ClientHandshake(secret.encode(), CONTEXT)
        self.frames.write(handshake.respond(self._read()))
        self.channel: SecureChannel = handshake.confirm(self._read())
        welcome = self.channel.decode(self._read())
        assert isinstance(welcome, messages.Welcome)

    def _read(self) -> bytes:
        frame = self.frames.read()
        assert frame is not None, "the server closed the connection"
        return frame

    def send(self, message: messages.Message | bytes) -> None:
        if isinstance(message, bytes):
            self.frames.write(self.channel.seal(message))  # raw junk, well sealed
        else:
            self.frames.write(self.channel.encode(message))

    def close(self) -> None:
        self.frames.sock.close()


class StatusPoller:
    """GETs status.json over and over in a thread; remembers every answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[int | str] = []
        self.last: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=10) as r:
                    self.last = json.loads(r.read())
                    self.answers.append(r.status)
            except urllib.error.HTTPError as e:
                self.answers.append(e.code)
            except OSError as e:  # the server went away at the end
                self.answers.append(f"{type(e).__name__}: {e}")
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def wait_until(predicate: Callable[[], Any], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {timeout} s: {what}")
        time.sleep(0.05)


#: What a misbehaving, authenticated worker sends, and what the server says.
ABUSE: list[tuple[list[messages.Message | bytes], str]] = [
    ([hello(slots=0)], "slots must be 1 to"),
    ([hello(slots=10**12)], "slots must be 1 to"),
    ([hello(prefetch=-1)], "prefetch must be 0 to"),
    ([hello("")], "empty worker name"),
    ([hello("evil\nline")], "not a printable name"),
    ([messages.Heartbeat()], "expected Hello, got Heartbeat"),
    ([hello(), hello()], "a second Hello"),
    ([hello(), messages.TaskDone(M0, 97)], "is not running map 0 #97"),
    ([hello(), messages.TaskOutput(M0, 99, 0, b"x")], "is not running map 0 #99"),
    ([hello(), messages.TaskOutput(TaskId(TaskKind.MAP, 999), 1, 0, b"x")], "unknown task"),
    ([hello(), messages.TaskOutput(M0, -1, 0, b"x")], "attempt -1"),
    ([hello(), messages.TaskFailed(R0, 1, None, "E", "tb")], "unknown task reduce 0"),
    ([hello(), messages.Welcome("j", b"", 1, 1.0)], "unexpected Welcome"),
    ([b"\x92\xa5Hello\x01"], "malformed Hello: 1 fields"),
]


def test_authenticated_nonsense_closes_that_connection_and_the_job_finishes(
    env: dict, tmp_path: Path
) -> None:
    env = {**env, "OCTO_SECRET": SECRET}
    port, web = free_port(), free_port()
    out = tmp_path / "out.tsv"
    # Map tasks wait for the gate, so that both honest workers join before
    # the job can end (a job done by the first leaves the second no server).
    gate = tmp_path / "gate"
    gated = f"import os, time\nGATE = {str(gate)!r}\n" + WORDS.replace(
        "def mapfn(key, value):\n",
        "def mapfn(key, value):\n    while not os.path.exists(GATE):\n        time.sleep(0.05)\n",
    )
    server = start(
        "server", str(job(tmp_path, gated)), "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--web", f"tcp:{web}:interface=127.0.0.1", "-o", str(out), env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    wait_for_port(web, server)
    poller = StatusPoller(f"http://127.0.0.1:{web}/status.json")
    try:
        for sequence, _ in ABUSE:
            raw = RawWorker(port)
            for message in sequence:
                raw.send(message)
            assert raw.frames.closed_by_peer(), f"the server kept the connection open: {sequence}"
            raw.close()
            with urllib.request.urlopen(poller.url, timeout=10) as r:  # and in between
                assert r.status == 200
                json.loads(r.read())
        # No ghost is left behind, and every task is back in the queue.
        wait_until(
            lambda: poller.last.get("workers") == [] and poller.last["map"]["running"] == 0,
            what=f"the bad workers gone from the status page: {poller.last}",
        )
        workers = [
            start("client", f"127.0.0.1:{port}", "--name", f"honest{i}", env=env) for i in range(2)
        ]
        wait_until(lambda: len(poller.last.get("workers", [])) == 2, what="both honest workers in")
        gate.touch()
        code, _, err = finish(server)
        for w in workers:
            wcode, _, werr = finish(w)
            assert wcode == 0, werr
    finally:
        poller.stop()
    assert code == 0, err
    assert parse_tsv(out.read_text()) == EXPECTED
    for _, why in ABUSE:
        assert why in err, f"{why!r} not logged:\n{err}"
    assert err.count("closing connection from tcp:127.0.0.1:") >= len(ABUSE)
    assert "Traceback" not in err and "Unhandled" not in err, err
    assert "worker honest0 joined" in err and "worker honest1 joined" in err
    # 200 throughout; once the job is over, the page goes with the server.
    answers = poller.answers
    last_ok = max(i for i, a in enumerate(answers) if a == 200)
    assert answers[: last_ok + 1] == [200] * (last_ok + 1), answers
    assert all(not isinstance(a, int) for a in answers[last_ok + 1 :]), answers


def test_a_worker_hangs_up_on_a_bad_server_message_and_carries_on(env: dict) -> None:
    """A raw server sends an octo client nonsense, then the job's end."""
    env = {**env, "OCTO_SECRET": SECRET}
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(30)
    port = listener.getsockname()[1]
    client = start("client", f"127.0.0.1:{port}", env=env)

    def accept() -> tuple[Frames, SecureChannel]:
        sock, _ = listener.accept()
        sock.settimeout(30)
        frames = Frames(sock)
        handshake = ServerHandshake(SECRET.encode(), CONTEXT)
        frames.write(handshake.challenge())
        answer = frames.read()
        assert answer is not None
        reply, channel = handshake.receive(answer)
        frames.write(reply)
        return frames, channel

    try:
        for nonsense in (
            messages.Assign(M0, 1),  # before the Welcome
            messages.Welcome("j", b"", 1, 0.0),  # no heartbeat interval
        ):
            frames, channel = accept()
            frames.write(channel.encode(nonsense))
            assert frames.closed_by_peer(), f"the worker kept the connection open: {nonsense}"
            frames.sock.close()
        frames, channel = accept()
        frames.write(channel.encode(messages.Shutdown(True, "")))
        code, _, err = finish(client, timeout=60)
        frames.sock.close()
    finally:
        listener.close()
    assert code == 0, err
    assert "closing the connection to the server" in err
    assert "expected Welcome, got Assign" in err and "heartbeat interval of 0.0 s" in err
    assert "reconnecting to the server in" in err
    assert "Traceback" not in err and "Unhandled" not in err, err
