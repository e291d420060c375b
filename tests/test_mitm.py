"""
Someone on the path: a relay between real `octo client` and `octo server`
processes that passes the handshake through untouched (it cannot do more:
it has no secret) and then rewrites, drops, replays, reorders or injects a
frame.  Each time the peer that received it must close the connection
with an "integrity" error, nothing the attacker sent may run (the marker
file an evil payload would create never appears), and the worker, which
reconnects through the relay (passing everything through from then on),
must still finish the job with the exact result.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import finish, free_port, parse_tsv, start, wait_for_port

from octotwist.testing.relay import (
    Editor,
    Frames,
    HTTPMessages,
    Relay,
    evil_pickle,
    evil_reduce_output,
    evil_welcome,
    flip,
    pass_through,
)
from octotwist.transport import TestSetup

SECRET = "a-secret-the-relay-does-not-know"

JOB = """
source = {i: " ".join("w%d" % ((i * 7 + j) % 23) for j in range(40 + i)) for i in range(12)}
def mapfn(key, value):
    for word in value.split():
        yield word, 1
def reducefn(key, values):
    return key, sum(values)
reduce_tasks = 2
"""


def expected() -> dict[str, int]:
    counts: Counter[str] = Counter()
    for i in range(12):
        counts.update(f"w{(i * 7 + j) % 23}" for j in range(40 + i))
    return dict(counts)


def run_through(
    tmp_path: Path,
    env: dict,
    transport: str,
    editors: Callable[[int], tuple[Editor, Editor]],
    address: Callable[[int], str] = lambda port: f"127.0.0.1:{port}",
) -> tuple[str, str, Relay]:
    """Serve JOB, run one client through a relay; return both logs once the job is done."""
    script = tmp_path / "job.py"
    script.write_text(JOB)
    out = tmp_path / "out.tsv"
    port = free_port()
    env = dict(env, OCTO_SECRET=SECRET)
    server = start(
        "server",
        str(script),
        "--transport",
        transport,
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "-o",
        str(out),
        env=env,
    )
    wait_for_port(port, server)
    relay = Relay(port, editors)
    try:
        client = start("client", address(relay.port), "--transport", transport, env=env)
        client_code, _, client_err = finish(client, timeout=90)
        server_code, _, server_err = finish(server, timeout=30)
    finally:
        relay.close()
    assert server_code == 0, server_err
    assert client_code == 0, client_err
    assert parse_tsv(out.read_text()) == expected()
    return client_err, server_err, relay


def first_connection(upward: Editor, downward: Editor) -> Callable[[int], tuple[Editor, Editor]]:
    """Tamper with the first connection only; pass the later ones through."""
    return lambda n: (upward, downward) if n == 0 else pass_through(n)


def assert_caught(log: str, marker: Path, relay: Relay) -> None:
    assert "integrity check failed" in log, log
    assert not marker.exists(), "the attacker's code ran"
    assert relay.connections >= 2  # the worker noticed, and came back


# tcp: server -> client frames are 0 challenge, 1 proof, 2 Welcome, 3... task
# inputs and Assigns; client -> server frames are 0 its proof, 1 Hello, 2...


def _replace(at: int, new: Callable[[bytes], list[bytes]]) -> Callable[[int, bytes], list[bytes]]:
    return lambda i, frame: new(frame) if i == at else [frame]


def _swap(at: int) -> Callable[[int, bytes], list[bytes]]:
    held: list[bytes] = []

    def edit(i: int, frame: bytes) -> list[bytes]:
        if i == at:
            held.append(frame)
            return []
        if i == at + 1:
            return [frame, *held]
        return [frame]

    return edit


TCP_DOWNWARD = {
    # The review's exploit: the Welcome replaced by one whose functions run a command.
    "welcome replaced": lambda marker: _replace(2, lambda f: [evil_welcome(marker)]),
    "welcome bit flipped": lambda marker: _replace(2, lambda f: [flip(f)]),
    "frame dropped": lambda marker: _replace(3, lambda f: []),
    "frame replayed": lambda marker: _replace(3, lambda f: [f, f]),
    "frames reordered": _swap,
    "frame injected": lambda marker: _replace(3, lambda f: [evil_pickle(marker), f]),
}


@pytest.mark.parametrize("attack", sorted(TCP_DOWNWARD))
def test_tcp_worker_refuses_frames_rewritten_on_the_way(
    tmp_path: Path, env: dict, attack: str
) -> None:
    marker = tmp_path / "pwned"
    make = TCP_DOWNWARD[attack]
    edit = make(3) if attack == "frames reordered" else make(marker)
    client_err, _, relay = run_through(
        tmp_path, env, "tcp", first_connection(Editor(), Frames(edit))
    )
    assert_caught(client_err, marker, relay)


@pytest.mark.parametrize(
    "attack",
    ["hello bit flipped", "reduce output replaced", "frame dropped"],
)
def test_tcp_server_refuses_frames_rewritten_on_the_way(
    tmp_path: Path, env: dict, attack: str
) -> None:
    marker = tmp_path / "pwned"
    edit = {
        "hello bit flipped": _replace(1, lambda f: [flip(f)]),
        # What the review's attacker did to reach code on the server: a
        # reduce result whose data the server unpickles when it writes it.
        "reduce output replaced": _replace(2, lambda f: [evil_reduce_output(marker)]),
        "frame dropped": _replace(2, lambda f: []),
    }[attack]
    _, server_err, relay = run_through(
        tmp_path, env, "tcp", first_connection(Frames(edit), Editor())
    )
    assert_caught(server_err, marker, relay)


def test_tcp_honest_worker_through_a_pass_through_relay_gets_the_exact_result(
    tmp_path: Path, env: dict
) -> None:
    client_err, server_err, relay = run_through(tmp_path, env, "tcp", pass_through)
    assert relay.connections == 1
    assert "integrity" not in client_err + server_err


# http: the relay rewrites a body; the HTTP around it stays well-formed.


def _first_body(kind: bytes, new: Callable[[bytes], bytes]) -> Callable[[bytes, bytes], bytes]:
    """Rewrite the body of the first message whose head contains C{kind}."""
    done = []

    def edit(head: bytes, body: bytes) -> bytes:
        if done or kind not in head or not body:
            return body
        done.append(True)
        return new(body)

    return edit


def _frame_body(frame: bytes) -> bytes:
    return len(frame).to_bytes(4, "big") + frame


HTTP = "http://127.0.0.1:{}/"


def test_http_worker_refuses_a_rewritten_welcome(tmp_path: Path, env: dict) -> None:
    marker = tmp_path / "pwned"
    # The first poll answer (200, from frame 0) carries the Welcome, on
    # whichever connection the worker polls (it uploads its Hello first).
    edit = _first_body(b"Octo-First: 0", lambda body: _frame_body(evil_welcome(marker)))
    client_err, _, relay = run_through(
        tmp_path,
        env,
        "http",
        lambda n: (Editor(), HTTPMessages(edit)),
        address=HTTP.format,
    )
    assert_caught(client_err, marker, relay)


def test_http_server_refuses_a_rewritten_upload(tmp_path: Path, env: dict) -> None:
    marker = tmp_path / "pwned"
    # The request MAC covers the request line, not the body: swap the body.
    edit = _first_body(b"messages?first=", lambda body: _frame_body(evil_reduce_output(marker)))
    _, server_err, _ = run_through(
        tmp_path,
        env,
        "http",
        lambda n: (HTTPMessages(edit), Editor()),
        address=HTTP.format,
    )
    assert "integrity check failed" in server_err
    assert not marker.exists()


def test_http_poll_answer_with_a_bit_flipped_is_refused(tmp_path: Path, env: dict) -> None:
    edit = _first_body(b"Octo-First: 0", flip)
    client_err, _, relay = run_through(
        tmp_path,
        env,
        "http",
        lambda n: (Editor(), HTTPMessages(edit)),
        address=HTTP.format,
    )
    assert_caught(client_err, tmp_path / "pwned", relay)


def test_http_honest_worker_through_a_pass_through_relay_gets_the_exact_result(
    tmp_path: Path, env: dict
) -> None:
    client_err, server_err, _ = run_through(
        tmp_path, env, "http", pass_through, address=HTTP.format
    )
    assert "integrity" not in client_err + server_err


# ssh: Conch's own MACs catch it; the test shows the transport still holds.


class _FlipAfter(Editor):
    """Flip one bit of the first chunk that starts past C{offset} bytes (past the key exchange)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.seen = 0
        self.done = False

    def feed(self, data: bytes) -> bytes:
        start, self.seen = self.seen, self.seen + len(data)
        if self.done or self.seen <= self.offset:
            return data
        self.done = True
        return flip(data, max(0, self.offset - start))


def test_ssh_refuses_a_bit_flipped_after_the_key_exchange(
    transport: str, tmp_path: Path, env: dict, peers: TestSetup
) -> None:
    if transport != "ssh":
        pytest.skip("the ssh transport's own test")
    # The server's SSH version line, KEXINIT and key exchange reply fit well
    # within 8 KiB; the job's Welcome alone is larger than that.
    client_err, _, relay = run_through(
        tmp_path,
        dict(env, **peers.env),
        "ssh",
        first_connection(Editor(), _FlipAfter(8192)),
        address=lambda port: peers.address.format(port=port),
    )
    assert relay.connections >= 2, client_err
    assert "reconnecting" in client_err
